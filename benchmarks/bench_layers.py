"""LowRankLinear vs FactorizedLinear vs nn.Linear: forward + backward time (DESIGN §4.2, issue 18).

Measured: median time per forward+backward over interleaved repeats, the speedup of each
factorized layer over the dense layer measured in the same rounds, the ideal FLOP ratio
m n / (r (m + n)), and the fraction of the ideal speedup achieved. CPU: float32, 1024x1024, 512
tokens, r in {16, 64, 256}, one thread. CUDA (when present): bf16 autocast on float32 parameters, timed with
CUDA events, the same case plus the issue's shapes (4096x4096 and 11008x4096 (out x in), 8192
tokens, r in {64, 256}) — GPU only, too slow on a CPU.
Goals: LowRankLinear >= FactorizedLinear at every r; >= 50% of the ideal speedup for
r <= min(m, n) / 16.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from timing import interleaved_median_times, interleaved_step_times
from torch import nn

import torchlowrank as tlr
from torchlowrank.reproducibility import environment_info, one_thread
from torchlowrank.results import Plot, Result, Series, Table


def fwd_bwd(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, autocast: bool = False):
    """One forward + backward with a dense upstream gradient, as inside a network (a ``.sum()``
    loss would hand both layers an expanded gradient that matmul must first copy)."""
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with ctx():
            y = layer(x)
        y.backward(grad_out)

    return step


def cuda_event_median_times(fns: dict, repeats: int, warmup: int = 5) -> dict[str, float]:
    """Median seconds of each ``fns[name]()``, interleaved rounds timed with CUDA events."""
    times = interleaved_step_times(fns, repeats, warmup, device="cuda")
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(m: int, n: int, tokens: int, ranks: list[int], repeats: int, device: str) -> dict:
    """Times (seconds) of nn.Linear and both factorized layers, (out, in) = (m, n), for each rank."""
    cuda = device == "cuda"
    torch.manual_seed(0)
    x = torch.randn(tokens, n, device=device, requires_grad=True)
    grad_out = torch.randn(tokens, m, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    layers: dict = {"dense": nn.Linear(n, m, device=device)}
    for r in ranks:
        layers[("LowRankLinear", r)] = tlr.LowRankLinear(n, m, r, device=device)
        layers[("FactorizedLinear", r)] = tlr.FactorizedLinear(n, m, r, device=device)
    fns = {k: fwd_bwd(layer, x, grad_out, autocast=cuda) for k, layer in layers.items()}
    if cuda:
        return cuda_event_median_times(fns, repeats)
    return interleaved_median_times(fns, repeats=repeats, device=device)


def rows_for(m: int, n: int, ranks: list[int], times: dict) -> tuple[list, dict]:
    t_dense = times["dense"]
    rows = [["nn.Linear (baseline)", "-", t_dense * 1e3, 1.0, 1.0, "-", "-"]]
    metrics = {}
    for r in ranks:
        ideal = m * n / (r * (m + n))
        lr, fa = times[("LowRankLinear", r)], times[("FactorizedLinear", r)]
        for name, t in (("LowRankLinear", lr), ("FactorizedLinear", fa)):
            rows.append(
                [
                    f"{name} r={r}",
                    r,
                    t * 1e3,
                    t_dense / t,
                    ideal,
                    f"{100 * t_dense / t / ideal:.0f}%",
                    f"{fa / t:.2f}" if name == "LowRankLinear" else "-",
                ]
            )
        metrics[f"r{r}"] = {
            "speedup": t_dense / lr,
            "factorized_speedup": t_dense / fa,
            "ideal": ideal,
            "lowrank_over_factorized": fa / lr,
        }
    return rows, metrics


COLUMNS = [
    "layer",
    "rank",
    "time (ms)",
    "speedup vs dense",
    "ideal FLOP ratio",
    "% of ideal",
    "LowRank speed / Factorized",
]


def run(quick: bool = False) -> Result:
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [(1024, 1024, 512, [16, 64] if quick else [16, 64, 256])]
    if device == "cuda":  # the shapes; minutes on a CPU
        cases += [(4096, 4096, 8192, [64, 256]), (11008, 4096, 8192, [64, 256])]
    repeats = 5 if quick else 30
    tables, metrics, plots = [], {}, []
    precision = "bf16 autocast, float32 parameters, CUDA events" if device == "cuda" else "float32"
    for m, n, tokens, ranks in cases:
        # one CPU thread: timed by the thread's CPU time (timing.clock), robust to other load
        with one_thread() if device == "cpu" else contextlib.nullcontext():
            times = measure(m, n, tokens, ranks, repeats, device)
        rows, case_metrics = rows_for(m, n, ranks, times)
        tables.append(
            Table(
                f"Forward+backward, {m}x{n} (out x in), {tokens} tokens, {precision}, {device} "
                f"(median of {repeats}, interleaved)",
                COLUMNS,
                rows,
            )
        )
        for r, v in case_metrics.items():
            key = "" if (m, n) == (1024, 1024) else f"_{m}x{n}"
            metrics[f"speedup_{r}{key}"] = v["speedup"]
            metrics[f"factorized_speedup_{r}{key}"] = v["factorized_speedup"]
            metrics[f"lowrank_over_factorized_{r}{key}"] = v["lowrank_over_factorized"]
        if (m, n) == (1024, 1024):
            plots.append(
                Plot(
                    "speedup",
                    "Speedup over nn.Linear, 1024x1024",
                    "line",
                    [
                        Series(
                            "LowRankLinear",
                            ranks,
                            [case_metrics[f"r{r}"]["speedup"] for r in ranks],
                            style="o-",
                        ),
                        Series(
                            "FactorizedLinear",
                            ranks,
                            [case_metrics[f"r{r}"]["factorized_speedup"] for r in ranks],
                            style="s-",
                        ),
                        Series(
                            "ideal mn/(r(m+n))",
                            ranks,
                            [case_metrics[f"r{r}"]["ideal"] for r in ranks],
                            style="--",
                        ),
                    ],
                    xlabel="rank r",
                    ylabel="speedup",
                    logx=True,
                    logy=True,
                )
            )
    return Result(
        name="layers",
        config={
            "cases": [{"m": m, "n": n, "tokens": t, "ranks": rs} for m, n, t, rs in cases],
            "repeats": repeats,
            "device": device,
            "dtype": precision,
            "threads": 1 if device == "cpu" else None,
        },
        metrics=metrics,
        tables=tables,
        plots=plots,
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )
