"""Timing helpers shared by the benchmarks: medians over repeats after warm-up, peak memory."""
from __future__ import annotations

import statistics
import time
import tracemalloc
from collections.abc import Callable

import torch


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int = 20, warmup: int = 3, device=None) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_cpu_memory_mb(fn: Callable[[], object]) -> float:
    """Peak Python-tracked allocation during ``fn()`` (tracemalloc; torch CPU tensors included), in MiB."""
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20
