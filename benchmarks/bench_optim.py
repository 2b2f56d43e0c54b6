"""Optimizers for low-rank training: step time and optimizer-state memory (issue: geometric optimizers).

Part 1 - LowRankAdam vs Adam on the factors of W = A B^T at the same rank, and dense AdamW: MLP
1024 -> 3 x (1024 x 1024) -> 10, batch 256, one full training step (zero_grad, forward, backward,
step), mean (and median) over interleaved steps (a multiple of 8, so every variant's mean covers
whole augmentation cycles). LowRankAdam with augment_every = 1 (the exact method) and 4 / 8 (S-steps in
between). Goal: LowRankAdam <= 1.3x factorized Adam's step.

Part 2 - GaLoreAdamW vs the galore-torch package (and dense AdamW): MLP 784 -> 4 x (1024 x 1024)
-> 10, batch 256, rank 128, update gap 200, scale 0.25; the candidates' steps are interleaved one by
one for ``steps`` steps (refreshes at step 0 and 200 included), reporting the mean step (what a run
pays, refreshes included) and the median step. Goal: the package's memory and a lower mean step.

Memory is the exact number of bytes in optimizer state tensors (not process memory); for the
package that includes the projector matrices it keeps outside its state tensors.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import torchlowrank as tlr
from torchlowrank.reproducibility import environment_info, one_thread
from torchlowrank.results import Result, Table


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix"):  # galore-torch's GaLoreProjector
                P = v.ortho_matrix
                mats = P if isinstance(P, list) else [P]
                total += sum(t.numel() * t.element_size() for t in mats if t is not None)
    return total


def _mlp(kind: str, widths: list[int], rank: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        if kind == "lowrank":
            layers.append(tlr.LowRankLinear(a, b, rank))
        elif kind == "factorized":
            layers.append(tlr.FactorizedLinear(a, b, rank))
        else:
            layers.append(nn.Linear(a, b))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers, nn.Linear(widths[-1], 10))


def _stepper(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def _interleaved(fns: dict, steps: int, warmup: int) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def part_lowrank(quick: bool) -> tuple[Table, dict]:
    width, rank, batch = 1024, 64, 256
    widths = [width] * 4
    repeats = 8 if quick else 32
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, width, generator=g), torch.randint(0, 10, (batch,), generator=g)
    models = {"dense AdamW": _mlp("dense", widths, rank, 0), "factorized Adam (A B^T)": _mlp("factorized", widths, rank, 0),
              "LowRankAdam": _mlp("lowrank", widths, rank, 0), "LowRankAdam augment_every=4": _mlp("lowrank", widths, rank, 0),
              "LowRankAdam augment_every=8": _mlp("lowrank", widths, rank, 0)}
    opts = {"dense AdamW": torch.optim.AdamW(models["dense AdamW"].parameters(), lr=1e-3),
            "factorized Adam (A B^T)": torch.optim.Adam(models["factorized Adam (A B^T)"].parameters(), lr=1e-3),
            "LowRankAdam": tlr.optim.LowRankAdam(models["LowRankAdam"], lr=1e-3),
            "LowRankAdam augment_every=4": tlr.optim.LowRankAdam(models["LowRankAdam augment_every=4"], lr=1e-3,
                                                                  augment_every=4),
            "LowRankAdam augment_every=8": tlr.optim.LowRankAdam(models["LowRankAdam augment_every=8"], lr=1e-3,
                                                                  augment_every=8)}
    times = _interleaved({k: _stepper(models[k], opts[k], x, y) for k in models}, repeats, warmup=8)
    med = {k: statistics.median(v) for k, v in times.items()}
    # the mean is what a run pays: with augment_every = k only every k-th step augments, and the
    # median would show the cheap in-between steps alone
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    base = mean["factorized Adam (A B^T)"]
    rows = []
    for k in models:
        rows.append([k, mean[k] * 1e3, med[k] * 1e3, mean[k] / base, mean[k] / mean["dense AdamW"],
                     state_bytes(opts[k]) / 2**20, state_bytes(opts[k]) / state_bytes(opts["dense AdamW"]),
                     sum(p.numel() for p in models[k].parameters())])
    table = Table(f"Training step, MLP {width} -> 3 x {width}^2 -> 10, rank {rank}, batch {batch}, float32, one thread "
                  f"({repeats} interleaved steps each)",
                  ["optimizer", "mean step (ms)", "median step (ms)", "mean x factorized Adam", "mean x dense AdamW",
                   "state (MiB)", "state x AdamW", "parameters"], rows)
    metrics = {"lowrank_adam_step_vs_factorized": mean["LowRankAdam"] / base,
               "lowrank_adam_k4_step_vs_factorized": mean["LowRankAdam augment_every=4"] / base,
               "lowrank_adam_k8_step_vs_factorized": mean["LowRankAdam augment_every=8"] / base,
               "lowrank_adam_state_bytes": state_bytes(opts["LowRankAdam"]),
               "factorized_adam_state_bytes": state_bytes(opts["factorized Adam (A B^T)"])}
    return table, metrics


def part_galore(quick: bool) -> tuple[Table, dict]:
    import warnings

    import galore_torch

    widths = [784] + [1024] * 4
    batch, rank, scale = 256, 128, 0.25
    gap = 20 if quick else 200
    steps = 45 if quick else 201  # refreshes at 0, gap, 2 gap, ... all inside the averaged steps
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
    models = {k: _mlp("dense", widths, rank, 0) for k in ("AdamW", "galore-torch GaLoreAdamW", "tlr GaLoreAdamW")}

    def split(model):
        mats = [p for n, p in model.named_parameters() if p.ndim == 2 and min(p.shape) > rank]
        rest = [p for p in model.parameters() if all(p is not q for q in mats)]
        return mats, rest

    mats, rest = split(models["galore-torch GaLoreAdamW"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pkg = galore_torch.GaLoreAdamW([{"params": rest}, {"params": mats, "rank": rank, "update_proj_gap": gap,
                                                           "scale": scale, "proj_type": "std"}], lr=1e-3,
                                       no_deprecation_warning=True)
    mats2, rest2 = split(models["tlr GaLoreAdamW"])
    ours = tlr.optim.GaLoreAdamW([{"params": rest2, "rank": None}, {"params": mats2}], lr=1e-3, rank=rank,
                                 update_gap=gap, scale=scale)
    opts = {"AdamW": torch.optim.AdamW(models["AdamW"].parameters(), lr=1e-3),
            "galore-torch GaLoreAdamW": pkg, "tlr GaLoreAdamW": ours}
    times = _interleaved({k: _stepper(models[k], opts[k], x, y) for k in models}, steps, warmup=0)
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    refresh = {k: max(v) for k, v in times.items()}
    rows = [[k, mean[k] * 1e3, med[k] * 1e3, refresh[k] * 1e3, mean[k] / mean["AdamW"], med[k] / med["AdamW"],
             state_bytes(opts[k]) / 2**20, state_bytes(opts[k]) / state_bytes(opts["AdamW"])] for k in models]
    table = Table(f"GaLore, MLP 784 -> 4 x 1024^2 -> 10, batch {batch}, rank {rank}, update gap {gap}, scale {scale}, "
                  f"{steps} interleaved steps (refreshes included), float32, one thread",
                  ["optimizer", "mean step (ms)", "median step (ms)", "slowest step (ms)", "mean x AdamW",
                   "median x AdamW", "state (MiB)", "state x AdamW"], rows)
    metrics = {"galore_mean_step_ours_vs_package": mean["tlr GaLoreAdamW"] / mean["galore-torch GaLoreAdamW"],
               "galore_median_step_ours_vs_package": med["tlr GaLoreAdamW"] / med["galore-torch GaLoreAdamW"],
               "galore_state_bytes_ours": state_bytes(ours), "galore_state_bytes_package": state_bytes(pkg)}
    return table, metrics


def run(quick: bool = False) -> Result:
    t0 = time.perf_counter()
    with one_thread():
        t1, m1 = part_lowrank(quick)
        t2, m2 = part_galore(quick)
    return Result(name="optim", config={"quick": quick, "threads": 1, "dtype": "float32",
                                         "command": "python benchmarks/run.py optim" + (" --quick" if quick else "")},
                  metrics={**m1, **m2}, tables=[t1, t2],
                  notes=("Shared 2-core machine: absolute times are noisy; the ratios are between candidates measured "
                         "interleaved in the same run. Memory: exact bytes of optimizer state tensors."),
                  wall_time_s=time.perf_counter() - t0, environment=environment_info())
