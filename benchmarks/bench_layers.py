"""LowRankLinear vs nn.Linear: forward + backward time (issue: foundation, DESIGN §4.2).

Measured: median seconds per forward+backward over repeats, the speedup over the dense layer
measured in the same run, the ideal FLOP ratio m n / (r (m + n)), and the fraction of the ideal
speedup achieved. Goal: >= 60% of the ideal for r <= 64 on CPU.
"""
from __future__ import annotations

import time

import torch
from torch import nn

import torchlowrank as tlr
from torchlowrank.reproducibility import environment_info
from torchlowrank.results import Plot, Result, Series, Table
from timing import interleaved_median_times


def fwd_bwd(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """One forward + backward with a dense upstream gradient, as inside a network (a ``.sum()``
    loss would hand both layers an expanded gradient that matmul must first copy)."""
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad_out)
    return step


def run(quick: bool = False) -> Result:
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = n = 1024
    batch = 512
    ranks = [16, 64] if quick else [16, 64, 256]
    repeats = 5 if quick else 30
    torch.manual_seed(0)
    x = torch.randn(batch, n, device=device, requires_grad=True)
    grad_out = torch.randn(batch, m, device=device)
    layers = {"dense": nn.Linear(n, m).to(device)}
    layers.update({r: tlr.LowRankLinear(n, m, r).to(device) for r in ranks})
    times = interleaved_median_times({k: fwd_bwd(l, x, grad_out) for k, l in layers.items()}, repeats=repeats, device=device)
    t_dense = times["dense"]
    rows, speedups, ideals = [["nn.Linear (baseline)", "-", t_dense * 1e3, 1.0, 1.0, "-"]], [], []
    for r in ranks:
        t = times[r]
        ideal = m * n / (r * (m + n))
        speedups.append(t_dense / t)
        ideals.append(ideal)
        rows.append([f"LowRankLinear r={r}", r, t * 1e3, t_dense / t, ideal, f"{100 * t_dense / t / ideal:.0f}%"])
    return Result(
        name="layers",
        config={"m": m, "n": n, "batch": batch, "ranks": ranks, "repeats": repeats, "device": device,
                "dtype": "float32", "threads": torch.get_num_threads()},
        metrics={f"speedup_r{r}": s for r, s in zip(ranks, speedups)},
        tables=[Table(f"Forward+backward, {m}x{n}, batch {batch}, float32, {device} (median of {repeats}, interleaved)",
                      ["layer", "rank", "time (ms)", "speedup vs dense", "ideal FLOP ratio", "% of ideal"], rows)],
        plots=[Plot("speedup", "LowRankLinear speedup over nn.Linear", "line",
                    [Series("measured", ranks, speedups, style="o-"), Series("ideal mn/(r(m+n))", ranks, ideals, style="--")],
                    xlabel="rank r", ylabel="speedup", logx=True, logy=True)],
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )
