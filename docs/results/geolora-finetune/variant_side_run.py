"""Side run: GeoLoRA variants at lr 3e-3, seed 0 (fixed rank 4 without budget; budget with rank_every=10).

PYTHONPATH=src python docs/results/geolora-finetune/variant_side_run.py nobudget|rank_every10
"""

import copy
import sys

import torchlowrank.experiments.geolora_finetune as gf
from torchlowrank.reproducibility import one_thread

variant = sys.argv[1]
cfg = gf.Config(seeds=(0,), lr=3e-3, geo_lr=3e-3)
if variant == "nobudget":

    def build(cfg, base):
        return gf.adapt(
            copy.deepcopy(base),
            gf.GeoLoRAConfig(r=4, tau=0.0, target_modules=gf.TARGETS, modules_to_save=["classifier"]),
        )

    gf.geolora_model = build
elif variant == "rank_every10":

    def build(cfg, base):
        return gf.adapt(
            copy.deepcopy(base),
            gf.GeoLoRAConfig(
                r=8,
                tau=0.01,
                rank_every=10,
                rank_budget=gf.budget_parameters(cfg, base),
                target_modules=gf.TARGETS,
                modules_to_save=["classifier"],
            ),
        )

    gf.geolora_model = build
with one_thread():
    task = gf.load_task(cfg, 0)
    run = gf.train("geolora", cfg, task, 0)
print(
    variant,
    "accuracy",
    run.accuracy,
    "total rank",
    sum(run.ranks.values()),
    "loss last10",
    sum(run.losses[-10:]) / 10,
    flush=True,
)
