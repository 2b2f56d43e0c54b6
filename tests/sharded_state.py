"""Whole tensors out of FSDP2-sharded models and optimizers, for comparing with a one-process run."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def whole(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``t``, gathered if it is a sharded DTensor."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def whole_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every entry whole."""
    return {k: whole(v) for k, v in model.state_dict().items()}


def unit_state(opt) -> dict[str, dict[str, torch.Tensor]]:
    """A geometric optimizer's per-layer moments (plain tensors, replicated), by layer name."""
    return {
        g["unit"]: {k: v.clone() for k, v in opt.state[g["params"][0]].items() if torch.is_tensor(v)}
        for g in opt.param_groups
        if g["unit"] is not None
    }


def refusal(call: Callable[[], object]) -> str:
    """The ValueError message ``call()`` raises ('|' made '/', for '|'-joined files), or "accepted"."""
    try:
        call()
    except ValueError as e:
        return str(e).replace("|", "/")
    return "accepted"
