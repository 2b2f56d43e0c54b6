"""Small helpers over ``torch.distributed`` so that torchlowrank behaves under DDP (``torchrun``).

Nothing here starts or configures a process group: the caller does (``torchrun`` +
``torch.distributed.init_process_group``). Without an initialised group every helper is the
single-process identity, so library code can call them unconditionally.

- :func:`is_main_process` / :func:`rank` / :func:`world_size`;
- :func:`main_process_only`: run a function (a file write) on rank 0 only, the other ranks wait for it
  at a barrier and receive its return value;
- :func:`broadcast_tensors_`: make tensors (e.g. a basis computed on rank 0) identical on every rank;
- :func:`all_reduce_mean_`: average tensors over ranks (local gradients -> the global batch's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "barrier",
    "main_process_only",
    "broadcast_tensors_",
    "broadcast_object",
    "all_reduce_mean_",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (plain Python values; identity in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_process_only(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: under DDP, ``fn`` runs on rank 0 only; every rank waits until it has finished and
    gets its return value (or the same exception type and message, so no rank hangs or goes on
    alone). One process: ``fn`` runs as usual."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        if not is_distributed():
            return fn(*args, **kwargs)
        result, error = None, None
        if is_main_process():
            try:
                result = fn(*args, **kwargs)
            except Exception as e:  # re-raised on every rank below
                error = e
        outcome = broadcast_object((result, None if error is None else (type(error), str(error))))
        if error is not None:
            raise error
        if outcome[1] is not None:
            etype, msg = outcome[1]
            raise (etype if issubclass(etype, Exception) else RuntimeError)(msg)
        return outcome[0]

    return wrapper


@torch.no_grad()
def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Average ``tensors`` in place over all ranks (no-op in one process). For a mean loss over
    equal-sized local batches this turns local gradients into the global batch's gradient."""
    if not is_distributed():
        return
    n = world_size()
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(n)


@torch.no_grad()
def broadcast_tensors_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (no-op in one process)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t, src=src)
