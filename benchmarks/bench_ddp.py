"""DDP overhead of the low-rank machinery (issue #12): 2 processes, gloo, CPU, 1 thread each.

The same 2-process job (an MLP 784-512-512-512-10, global batch 128 = 64 per process) with
plain DDP + AdamW as the baseline, and with the low-rank optimizers / regularizer in its place:

- dense model: DDP + AdamW (baseline), DDP + GaLoreAdamW (rank 32, refresh every 50 steps),
  DDP + AdamW + Q3R (target rank 10%, reweighting every 5 steps), computed on every process or
  sharded (``shard_reweighting=True``: each process reweights half the matrices, then broadcasts);
- the same model factorized at rank 32 (``tlr.factorize``): DDP + AdamW (baseline),
  DDP + LowRankAdam at fixed rank (tau = 0), and rank adaptive (tau = 0.05: rank 0's rank decisions
  broadcast every step, the model re-wrapped in DDP after a rank change).

Steps of all arms are interleaved (one step of each in turn) so that load drift hits them alike;
a barrier precedes every timed step on both processes. Collectives issued from Python through
``torch.distributed`` (broadcasts, all-reduces, barriers: ours) are counted by wrapping those
functions in the worker processes of this benchmark; DDP's own bucketed gradient all-reduce runs in
its C++ reducer and is not in that count (it is the same for every arm of a model, one per bucket).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import torchlowrank as tlr
from torchlowrank.reproducibility import environment_info
from torchlowrank.results import Result, Table

WIDTHS = (784, 512, 512, 512, 10)
COUNTED = ("broadcast", "all_reduce", "barrier", "broadcast_object_list", "all_gather", "all_gather_object")


def _mlp(widths) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _Arm:
    """One model + optimizer (+ regularizer) trained under its own DDP wrapper."""

    def __init__(self, name: str, model: nn.Module, make_opt, reg=None):
        self.name, self.model, self.reg = name, model, reg
        self.opt = make_opt(model)
        self.ddp = nn.parallel.DistributedDataParallel(model)
        self.rewraps = 0

    def step(self, x, y) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.ddp(x), y).backward()
        if self.reg is not None:
            self.reg.step()
        self.opt.step()
        if getattr(self.opt, "ranks_changed", False):
            self.ddp = nn.parallel.DistributedDataParallel(self.model)
            self.rewraps += 1


def _arms(widths, rank: int) -> list[_Arm]:
    torch.manual_seed(0)
    dense = _mlp(widths)
    copies = [_mlp(widths) for _ in range(4)]
    for c in copies:
        c.load_state_dict(dense.state_dict())
    low = [_mlp(widths) for _ in range(3)]
    for c in low:
        c.load_state_dict(dense.state_dict())
        tlr.factorize(
            c, rank, targets=[str(i) for i in range(0, 2 * (len(widths) - 2), 2)]
        )  # all but the head
    q3r_model, sharded_model = copies[2], copies[3]
    reg = tlr.Q3R(q3r_model, target_rank=0.1, lam=0.1, period=5)
    sharded = tlr.Q3R(sharded_model, target_rank=0.1, lam=0.1, period=5, shard_reweighting=True)
    return [
        _Arm("dense: AdamW (baseline)", copies[0], lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)),
        _Arm(
            f"dense: GaLoreAdamW (rank {rank}, gap 50)",
            copies[1],
            lambda m: tlr.optim.GaLoreAdamW(m.parameters(), lr=1e-3, rank=rank, update_gap=50),
        ),
        _Arm(
            "dense: AdamW + Q3R (period 5)",
            q3r_model,
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
            reg,
        ),
        _Arm(
            "dense: AdamW + Q3R, sharded reweighting",
            sharded_model,
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
            sharded,
        ),
        _Arm(
            f"factorized r={rank}: AdamW (baseline)",
            low[0],
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
        ),
        _Arm(f"factorized r={rank}: LowRankAdam tau=0", low[1], lambda m: tlr.optim.LowRankAdam(m, lr=1e-3)),
        _Arm(
            f"factorized r={rank}: LowRankAdam tau=0.05 (rank sync)",
            low[2],
            lambda m: tlr.optim.LowRankAdam(m, lr=1e-3, tau=0.05),
        ),
    ]


def _count_collectives(counts: dict) -> None:
    """Wrap this process's torch.distributed collectives to count calls into ``counts[name]``."""
    for fname in COUNTED:
        original = getattr(dist, fname)

        def counted(*args, __f=original, __n=fname, **kwargs):
            counts[__n] = counts.get(__n, 0) + 1
            return __f(*args, **kwargs)

        setattr(dist, fname, counted)


def _worker(rank: int, world: int, init_file: str, out: str, cfg: dict) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        arms = _arms(tuple(cfg["widths"]), cfg["rank"])
        g = torch.Generator().manual_seed(rank)
        half = cfg["batch"] // world
        x, y = torch.randn(half, cfg["widths"][0], generator=g), torch.randint(0, 10, (half,), generator=g)
        for _ in range(cfg["warmup"]):
            for arm in arms:
                arm.step(x, y)
        times = {a.name: [] for a in arms}
        calls = {a.name: {} for a in arms}
        counts: dict = {}
        _count_collectives(counts)
        for _ in range(cfg["steps"]):
            for arm in arms:
                dist.barrier()
                counts.clear()
                t0 = time.perf_counter()
                arm.step(x, y)
                times[arm.name].append(time.perf_counter() - t0)
                for k, v in counts.items():
                    calls[arm.name][k] = calls[arm.name].get(k, 0) + v
        if rank == 0:
            Path(out).write_text(
                json.dumps(
                    {
                        "times": times,
                        "calls": calls,
                        "rewraps": {a.name: a.rewraps for a in arms},
                        "ranks": {
                            a.name: [
                                getattr(m, "rank", None) for m in a.model if isinstance(m, tlr.LowRankLinear)
                            ]
                            for a in arms
                        },
                    }
                )
            )
        dist.barrier()  # no process tears gloo down while another still has work queued (an abort)
    finally:
        dist.destroy_process_group()


def run(quick: bool = False) -> Result:
    t0 = time.perf_counter()
    cfg = {
        "widths": [784, 128, 128, 10] if quick else list(WIDTHS),
        "rank": 8 if quick else 32,
        "batch": 32 if quick else 128,
        "steps": 8 if quick else 60,
        "warmup": 3 if quick else 5,
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        mp.spawn(_worker, args=(2, str(Path(tmp) / "init"), str(out), cfg), nprocs=2, join=True)
        data = json.loads(out.read_text())
    rows, metrics = [], {}
    steps = cfg["steps"]
    for name, ts in data["times"].items():
        base = (
            "dense: AdamW (baseline)"
            if name.startswith("dense")
            else next(k for k in data["times"] if k.startswith("factorized") and k.endswith("(baseline)"))
        )
        med, mean = statistics.median(ts), statistics.fmean(ts)
        ratio = med / statistics.median(data["times"][base])
        extra = data["calls"][name]
        per_step = ", ".join(f"{k} {v / steps:g}" for k, v in sorted(extra.items())) or "none"
        rows.append(
            [
                name,
                med * 1e3,
                mean * 1e3,
                "-" if name == base else f"{ratio:.2f}x",
                per_step,
                data["rewraps"][name],
            ]
        )
        metrics[f"ratio[{name}]"] = ratio
    r = cfg["rank"]
    setting = (
        f"MLP {'-'.join(map(str, cfg['widths']))}, global batch {cfg['batch']} (2 x {cfg['batch'] // 2}), "
        f"2 gloo processes x 1 thread, {steps} interleaved steps per arm after {cfg['warmup']} warm-up"
    )
    return Result(
        name="ddp",
        config={
            **cfg,
            "processes": 2,
            "backend": "gloo",
            "threads_per_process": 1,
            "command": "python benchmarks/run.py ddp" + (" --quick" if quick else ""),
        },
        metrics=metrics,
        tables=[
            Table(
                f"DDP step time and collectives beyond DDP's gradient all-reduce, {setting}",
                [
                    "run",
                    "median (ms)",
                    "mean (ms)",
                    "median vs its baseline",
                    "extra collectives per step (Python-level)",
                    "DDP re-wraps",
                ],
                rows,
            )
        ],
        notes=(
            f"Ranks of the rank-adaptive arm's layers at the end: "
            f"{data['ranks'].get(f'factorized r={r}: LowRankAdam tau=0.05 (rank sync)')}. "
            "Q3R computes its reweighting on every process from the same (replicated) weights (or, sharded, "
            "each process half of the matrices, then 2 all-reduces + 1 broadcast per matrix on reweighting steps), and "
            "GaLore its projector from DDP's all-reduced gradient with a generator seeded by step and "
            "parameter: neither needs a collective. LowRankAdam at tau = 0 takes the same step on every "
            "process from the all-reduced gradients (no collective); at tau > 0 one broadcast of the "
            "chosen ranks per step, plus, on the first step after a rank change only, two all-reduces "
            "(min / max of the resized layers' gradient sums) that refuse a stale DDP wrapper."
        ),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )
