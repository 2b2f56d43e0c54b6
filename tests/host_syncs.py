"""Count host-device synchronisations on the CPU: a ``TorchFunctionMode`` that records every call
which, on a GPU, would make the host wait for the device (DESIGN §7).

A CUDA synchronisation cannot be observed on a CPU, but its causes can: reading a tensor's value
into Python (``.item()``, ``bool()``, ``int()``, ``float()``, ``.tolist()``, ``.cpu()``), ops whose
output shape depends on values (``nonzero``, boolean indexing, ``unique``), and linear-algebra
calls that check their LAPACK / cuSOLVER status and raise (``linalg.svd``, ``eigh``, ``cholesky``,
``inv``, ``solve`` — the ``_ex`` variants do not check, and do not synchronise).

    with HostSyncCounter() as syncs:
        opt.step()
    assert syncs.calls == []
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_READS = {
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__format__,
    torch.Tensor.__repr__,
}
_VALUE_SHAPED = {
    torch.nonzero,
    torch.Tensor.nonzero,
    torch.argwhere,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.unique,
    torch.Tensor.unique,
    torch.unique_consecutive,
    torch.equal,
    torch.allclose,
    torch.Tensor.allclose,
    torch.repeat_interleave,
}
_CHECKED_LINALG = {
    torch.linalg.svd,
    torch.linalg.svdvals,
    torch.svd,
    torch.linalg.eigh,
    torch.linalg.eigvalsh,
    torch.linalg.eig,
    torch.linalg.cholesky,
    torch.cholesky,
    torch.linalg.inv,
    torch.inverse,
    torch.linalg.solve,
    torch.linalg.lstsq,
    torch.linalg.matrix_rank,
    torch.linalg.pinv,
}


def _is_host_device(arg) -> bool:
    return (isinstance(arg, torch.device) and arg.type == "cpu") or arg == "cpu"


class HostSyncCounter(TorchFunctionMode):
    """Records the name of every call that would synchronise a GPU with the host (``calls``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        if func in _READS or func in _VALUE_SHAPED or func in _CHECKED_LINALG:
            self.calls.append(name)
        elif func is torch.Tensor.to and (
            any(_is_host_device(a) for a in args[1:]) or _is_host_device(kwargs.get("device"))
        ):
            self.calls.append("Tensor.to(cpu)")
        elif func is torch.Tensor.__getitem__ and _has_bool_index(args[1]):
            self.calls.append("Tensor.__getitem__(bool mask)")
        elif func is torch.Tensor.__setitem__ and _has_bool_index(args[1]):
            self.calls.append("Tensor.__setitem__(bool mask)")
        return func(*args, **kwargs)


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)
