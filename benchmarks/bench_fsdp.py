"""FSDP2 (``fully_shard``): optimizer-state bytes per rank and step time, 1 and 2 gloo processes on the CPU (issue #23).

An MLP (784 -> 3 x 512 -> 10 in the full run), every linear layer ``fully_shard``-ed and then the
root, global batch 128 (split over the processes), float32, one thread per process. Arms:

- dense: AdamW (the baseline), GaLoreAdamW (rank 32, refresh every 25 steps, ``refresh="warm"``:
  projectors from all-reduced products of the row shards);
- the same widths factorized (``LowRankLinear``, rank 32): AdamW on the factors (the baseline of
  this model), LowRankAdam (fixed rank). An arm whose optimizer cannot be built or stepped under
  FSDP2 is reported as unsupported, with the error, instead of failing the benchmark.

Steps of all arms are interleaved (one step of each in turn, a barrier before every timed step), so
load drift on the shared machine hits them alike; the table reports medians and the ratio to the
baseline of the same model in the same run, and the mean (GaLore's refresh at step 25 falls in the
timed steps: the mean includes it, the median does not). State bytes: the bytes of this rank's local shards of
the optimizer state tensors (a replicated tensor counts in full on every rank), rank 0's.
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
from torchlowrank import sharded
from torchlowrank.reproducibility import environment_info
from torchlowrank.results import Result, Table

WIDTHS = (784, 512, 512, 512)
DENSE_BASE, LOW_BASE = "dense: AdamW (baseline)", "lowrank: AdamW on U, S, V (baseline)"


def _mlp(widths, rank: int | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b) if rank is None else tlr.LowRankLinear(a, b, rank), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 10))


def _sharded(model: nn.Sequential) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model


def _arm_specs(rank: int) -> list[tuple[str, int | None, object]]:
    return [
        (DENSE_BASE, None, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)),
        (
            f"dense: GaLoreAdamW (rank {rank}, gap 25)",
            None,
            lambda m: tlr.optim.GaLoreAdamW(m.parameters(), lr=1e-3, rank=rank, update_gap=25),
        ),
        (LOW_BASE, rank, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)),
        ("lowrank: LowRankAdam (fixed rank)", rank, lambda m: tlr.optim.LowRankAdam(m, lr=1e-3)),
    ]


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        sharded.local(v).numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if torch.is_tensor(v)
    )


def _agree(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (so all ranks drop a failing arm together)."""
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag) == 0


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _worker(rank: int, world: int, init_file: str, out: str, cfg: dict) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        local = cfg["batch"] // world
        x, y = torch.randn(local, cfg["widths"][0], generator=g), torch.randint(0, 10, (local,), generator=g)
        arms, unsupported = {}, {}
        for name, r, make in _arm_specs(cfg["rank"]):
            torch.manual_seed(0)
            model = _sharded(_mlp(cfg["widths"], r))
            error = None
            try:
                opt = make(model)
                for _ in range(cfg["warmup"]):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
            except Exception as e:  # an optimizer without FSDP2 support: recorded, not fatal
                error = _error(e)
            if _agree(error is None):
                arms[name] = (model, opt)
            else:
                unsupported[name] = error or "failed on another rank"
        times: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(cfg["steps"]):
            for name, (model, opt) in arms.items():
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
                times[name].append(time.perf_counter() - t0)
        if rank == 0:
            Path(out).write_text(
                json.dumps(
                    {
                        "times": times,
                        "bytes": {name: _state_bytes(opt) for name, (_, opt) in arms.items()},
                        "params": {
                            name: sum(sharded.local(p).numel() * p.element_size() for p in model.parameters())
                            for name, (model, _) in arms.items()
                        },
                        "unsupported": unsupported,
                    }
                )
            )
        dist.barrier()  # no process tears gloo down while another still has work queued (an abort)
    finally:
        dist.destroy_process_group()


def _measure(world: int, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp.json"
        mp.spawn(_worker, args=(world, str(Path(tmp) / "init"), str(out), cfg), nprocs=world, join=True)
        return json.loads(out.read_text())


def run(quick: bool = False) -> Result:
    t0 = time.perf_counter()
    cfg = {
        "widths": [64, 32, 32] if quick else list(WIDTHS),
        "rank": 4 if quick else 32,
        "batch": 8 if quick else 128,
        "steps": 2 if quick else 40,
        "warmup": 1 if quick else 5,
    }
    rows, metrics = [], {}
    for world in (1, 2):
        data = _measure(world, cfg)
        for name, _, _ in _arm_specs(cfg["rank"]):
            base = DENSE_BASE if name.startswith("dense") else LOW_BASE
            if name in data["unsupported"]:
                rows.append(
                    [world, name, "-", "-", "-", "-", "-", f"unsupported ({data['unsupported'][name]})"]
                )
                metrics[f"supported[{world}][{name}]"] = 0.0
                continue
            med, mean = statistics.median(data["times"][name]), statistics.fmean(data["times"][name])
            ratio = med / statistics.median(data["times"][base]) if base in data["times"] else float("nan")
            state = data["bytes"][name]
            state_ratio = state / data["bytes"][DENSE_BASE] if DENSE_BASE in data["bytes"] else float("nan")
            rows.append(
                [
                    world,
                    name,
                    med * 1e3,
                    mean * 1e3,
                    "-" if name == base else f"{ratio:.2f}x",
                    state / 2**10,
                    f"{state_ratio:.3f}",
                    "ok",
                ]
            )
            metrics[f"step_ms[{world}][{name}]"] = med * 1e3
            metrics[f"state_kib_per_rank[{world}][{name}]"] = state / 2**10
            metrics[f"supported[{world}][{name}]"] = 1.0
    setting = (
        f"MLP {'-'.join(map(str, cfg['widths']))}-10, every layer fully_shard-ed, global batch {cfg['batch']}, "
        f"float32, gloo, 1 thread per process, {cfg['steps']} interleaved steps per arm after {cfg['warmup']} warm-up"
    )
    return Result(
        name="fsdp",
        config={
            **cfg,
            "backend": "gloo",
            "threads_per_process": 1,
            "command": "python benchmarks/run.py fsdp" + (" --quick" if quick else ""),
        },
        metrics=metrics,
        tables=[
            Table(
                f"FSDP2 step time and optimizer state per rank, {setting}",
                [
                    "processes",
                    "run",
                    "median step (ms)",
                    "mean step (ms)",
                    "median vs its model's AdamW",
                    "optimizer state per rank (KiB)",
                    "state vs dense AdamW",
                    "status",
                ],
                rows,
            )
        ],
        notes=(
            "GaLoreAdamW keeps its moments in the projected shape sharded by rows like the parameter and its "
            "projector sharded (left, m < n: Q (m, r) by rows) or replicated (right: P (r, n)); its refresh "
            "all-reduces (n, k) and (k, k) products of the row shards, no full gradient is formed. Two processes "
            "on this machine share its cores with whatever else runs, so their step times show the collectives' "
            "overhead more than a speed-up."
        ),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )
