"""Launch a function in N CPU processes with the gloo backend, as torchrun would (shared test harness).

``run_ddp(worker, tmp_path, world_size=2, *args)`` spawns ``world_size`` processes; each calls
``worker(rank, world_size, out_dir, *args)`` inside an initialised process group and may write
files into ``out_dir`` (e.g. ``torch.save(state, out_dir / f"rank{rank}.pt")``) for the test to
compare. ``worker`` must be a module-level function of an importable module (a test file).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, out_dir: str, worker, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, Path(out_dir), *args)
        dist.barrier()  # no process tears gloo down while another still has work queued (an abort)
    finally:
        dist.destroy_process_group()


def run_ddp(worker, tmp_path: Path, world_size: int = 2, *args) -> Path:
    """Run ``worker`` on ``world_size`` gloo processes; returns the folder they wrote into."""
    out = Path(tmp_path) / "ddp_out"
    out.mkdir(parents=True, exist_ok=True)
    init_file = Path(tmp_path) / "ddp_init"
    if init_file.exists():
        init_file.unlink()
    mp.spawn(_entry, args=(world_size, str(init_file), str(out), worker, args), nprocs=world_size, join=True)
    return out
