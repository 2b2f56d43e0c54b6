"""SpectrumTracker overhead: SmallViT training with and without the tracker, in one run.

The same number of AdamW steps (batch 64, 28x28 inputs, SmallViT(dim=64, depth=4)) is timed without a
tracker (baseline), and with ``SpectrumTracker(model, every=E)`` attached to the optimizer for E in
{50, 10}; the tracker's construction (the step-0 record) is inside the timed region. Runs are
interleaved (baseline, E=50, E=10, baseline, ...) so drift on a shared machine hits all of them;
the table gives medians over repeats and the ratio to the baseline (also the median of per-repeat
ratios). torch runs on one thread: on a loaded 2-core machine two threads contend and make step
times 10-30x noisier. The inputs are random tensors (timing does not depend on the data).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from torchlowrank.diagnostics import SpectrumTracker
from torchlowrank.models import SmallViT
from torchlowrank.reproducibility import environment_info, one_thread
from torchlowrank.results import Result, Table


def _train(model, batches, every):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = SpectrumTracker(model, every=every).attach(opt) if every else None
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return tracker


def run(quick: bool = False) -> Result:
    with one_thread():
        return _run(quick)


def _run(quick: bool) -> Result:
    steps, repeats = (100, 2) if quick else (250, 5)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
        for _ in range(steps)
    ]
    torch.manual_seed(0)
    base_model = SmallViT()
    configs = [("no tracker", 0), ("every=50", 50), ("every=10", 10)]
    _train(copy.deepcopy(base_model), batches[:5], 0)  # warm-up
    times = {name: [] for name, _ in configs}
    records = {}
    for _ in range(repeats):
        for name, every in configs:
            model = copy.deepcopy(base_model)
            t0 = time.perf_counter()
            tr = _train(model, batches, every)
            times[name].append(time.perf_counter() - t0)
            if tr is not None:
                records[name] = len({r["step"] for r in tr.history})
    # cost of one record (all 3 quantities, 26 layers) on the trained model with gradients present
    model = copy.deepcopy(base_model)
    tracker = _train(model, batches[:2], 1)
    rec_times = []
    for _ in range(5 if quick else 10):
        t0 = time.perf_counter()
        tracker.record()
        rec_times.append(time.perf_counter() - t0)
    base = statistics.median(times["no tracker"])
    step_time = base / steps
    rec = statistics.median(rec_times)
    rows = []
    for name, _every in configs:
        med = statistics.median(times[name])
        paired = statistics.median(t / b for t, b in zip(times[name], times["no tracker"]))
        rows.append([name, steps, records.get(name, 0), med, med / steps * 1e3, med / base, paired])
    est = [[e, rec / (e * step_time)] for e in (10, 50, 200)]
    return Result(
        name="tracker",
        config={
            "model": "SmallViT(dim=64, depth=4, heads=4, patch 7), 26 tracked layers",
            "batch_size": 64,
            "optimizer": "AdamW",
            "steps": steps,
            "repeats": repeats,
            "threads": 1,
            "track": ["weight", "update", "grad"],
        },
        metrics={
            "overhead_every_50": rows[1][5] - 1,
            "overhead_every_50_paired": rows[1][6] - 1,
            "overhead_every_50_estimated_long_run": rec / (50 * step_time),
            "overhead_every_10": rows[2][5] - 1,
            "record_ms": rec * 1e3,
            "step_ms": step_time * 1e3,
        },
        tables=[
            Table(
                "Training time with and without the tracker (median over repeats)",
                [
                    "config",
                    "steps",
                    "records",
                    "median time (s)",
                    "ms / step",
                    "ratio vs no tracker",
                    "median per-repeat ratio",
                ],
                rows,
            ),
            Table(
                "One record (weight + update + grad of 26 layers) vs one training step",
                ["every", "estimated overhead = record / (every x step)"],
                est,
            ),
        ],
        notes=(
            f"One record costs {rec * 1e3:.0f} ms against {step_time * 1e3:.0f} ms per training step; the "
            "estimated overhead of a long run is record / (every x step time). The measured runs also pay the "
            f"step-0 record made when the tracker is built ({steps} steps at every=50 make "
            f"{steps // 50 + 1} records, not {steps / 50:g})."
        ),
        environment=environment_info(),
    )
