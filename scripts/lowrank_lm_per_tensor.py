"""The lowrank-lm ablation's last arm (issue 19): factorized AdamW with ONE second moment per tensor.

LowRankAdam's default keeps one second moment per layer ("unit"); factorized AdamW keeps one per
coordinate of A and B. This arm gives the A B^T factors the per-tensor normalisation
(``experiments/per_tensor_adam.py::PerTensorAdamW``) with everything else as factorized AdamW: if it
lands near LowRankAdam (1.76) rather than near factorized AdamW (1.69), the gap on this language model
is Adam's per-coordinate step sizes, not the manifold step.

The long run's config (1000 steps, 25 %, seeds 0-2, same initialisation and batches), the fine
ladder (1, 2, 3, 5 per decade) starting at 5e-3, 1e-2, 2e-2 (a per-tensor normalised step wants a
larger rate, like LowRankAdam's), stepping outward while the best is at an end; seeds 1-2 at the
rate chosen on seed 0. Writes ``docs/results/lowrank-lm/lowrank-lm-ablation-per-tensor.*``.

    PYTHONPATH=src python scripts/lowrank_lm_per_tensor.py
"""

from __future__ import annotations

import dataclasses
import time

import torch

from torchlowrank.experiments import lowrank_lm
from torchlowrank.report import write_report

OUT = "docs/results/lowrank-lm"
COMMAND = "PYTHONPATH=src python scripts/lowrank_lm_per_tensor.py"
FINE_LADDER = tuple(round(m * 10.0**e, 12) for e in range(-4, -1) for m in (1, 2, 3, 5)) + (1e-1, 2e-1, 3e-1)
CONFIG = dataclasses.replace(
    lowrank_lm.LMConfig(),
    steps=1000,
    warmup=50,
    eval_every=50,
    fractions=(0.25,),
    methods=(lowrank_lm.PER_TENSOR,),
    lr_ladder=FINE_LADDER,
    lr_start=(5e-3, 1e-2, 2e-2),
)

if __name__ == "__main__":
    torch.set_num_threads(1)
    name = "lowrank-lm-ablation-per-tensor"
    t0 = time.perf_counter()
    result = lowrank_lm.lm_study(name, CONFIG, quick=False, progress=False)
    registered = result.config["command"]
    result.config["command"] = COMMAND
    result.notes = result.notes.replace(registered, COMMAND)
    paths = write_report(result, OUT)
    print(f"{name}: {time.perf_counter() - t0:.0f} s, wrote {sorted(map(str, paths.values()))}", flush=True)
