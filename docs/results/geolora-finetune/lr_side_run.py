"""Side run of geolora-finetune: the three arms at a larger learning rate, seed 0 only.

PYTHONPATH=src python docs/results/geolora-finetune/lr_side_run.py 3e-3 [arm ...]
The learning rate is read off the test snippets here (there is no validation split in this study):
a sensitivity check, not a tuned result.
"""

import sys

from torchlowrank.experiments.geolora_finetune import ARMS, Config, load_task, train
from torchlowrank.reproducibility import one_thread

lr = float(sys.argv[1])
arms = sys.argv[2:] or ARMS
cfg = Config(seeds=(0,), lr=lr, geo_lr=lr)
with one_thread():
    task = load_task(cfg, 0)
    for arm in arms:
        run = train(arm, cfg, task, 0)
        print(
            f"lr={lr:g} arm={arm} accuracy={run.accuracy:.4f} total_rank={sum(run.ranks.values())} "
            f"adapter_parameters={run.adapter_parameters} step_ms={run.step_ms:.1f}",
            flush=True,
        )
