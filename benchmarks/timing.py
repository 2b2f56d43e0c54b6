"""Timing helpers shared by the benchmarks: medians over repeats after warm-up, peak memory.

Clock (:func:`clock`): on the CPU with one intra-op thread (the benchmarks' setting, see
``reproducibility.one_thread``) the CPU time of the calling thread (``time.thread_time``), so that
other processes sharing the cores do not inflate the numbers (a wall clock on a loaded 2-core
machine varied by 2x between runs; thread CPU time by a few percent); with several threads, or
around a CUDA synchronisation, the wall clock ``time.perf_counter``.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def clock(device: torch.device | str | None = None) -> Callable[[], float]:
    """The timer of this module's measurements (module docstring): seconds, as a float."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    if on_cpu and not torch.cuda.is_available() and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def round_order(fns: dict, i: int) -> list[tuple]:
    """The (name, fn) pairs of round ``i`` of an interleaved measurement, in an order drawn for that
    round (seeded by i): each candidate follows each other one equally often on average. A fixed or
    rotated order keeps the same neighbours, and a candidate timed right after a big one starts with
    cold caches every round."""
    items = list(fns.items())
    random.Random(i).shuffle(items)
    return items


def median_time(fn: Callable[[], object], repeats: int = 20, warmup: int = 3, device=None) -> float:
    """Median time of ``fn()`` in seconds (:func:`clock`) over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    now, times = clock(device), []
    for _ in range(repeats):
        t0 = now()
        fn()
        sync(device)
        times.append(now() - t0)
    return statistics.median(times)


def interleaved_median_times(
    fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3, device=None
) -> dict[str, float]:
    """Median seconds of each ``fns[name]()``, measured in interleaved rounds (a, b, c, a, b, c, ...).

    Interleaving makes the ratios between candidates robust to load that drifts during the run
    (other processes on a shared machine), which sequential blocks of repeats are not. The order
    is drawn anew each round (:func:`round_order`): a candidate timed right after a big one starts
    with cold caches, and a fixed (or rotated) order would charge that to the same candidate.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    now, times = clock(device), {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in round_order(fns, i):
            t0 = now()
            fn()
            sync(device)
            times[name].append(now() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(fn: Callable[[], object], device=None) -> float:
    """Peak memory added while ``fn()`` runs, in MiB, above what was resident before it.

    CUDA: ``torch.cuda.max_memory_allocated`` delta. CPU (Linux): the process's peak resident set
    (VmHWM), reset through /proc/self/clear_refs before the call, minus the resident set before.
    """
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark
    base = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - base) / 1024


def interleaved_step_times(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3, device=None
) -> dict[str, list[float]]:
    """Seconds of every call of each ``fns[name]()`` over ``repeats`` interleaved rounds.

    On CUDA each call is timed by CUDA events (device time between two records, one
    synchronisation per round, so a host sync inside a step shows as the device idling); on the
    CPU by :func:`clock`. Lists, not medians: with ``augment_every`` or a Q3R period the
    mean is what a run pays, and the median shows only the cheap steps.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    cuda = device is not None and torch.device(device).type == "cuda"
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        if cuda:
            events = {}
            for name, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[name] = (start, end)
            torch.cuda.synchronize()
            for name, (start, end) in events.items():
                times[name].append(start.elapsed_time(end) / 1e3)
        else:
            now = clock(device)
            for name, fn in round_order(fns, i):
                t0 = now()
                fn()
                times[name].append(now() - t0)
    return times
