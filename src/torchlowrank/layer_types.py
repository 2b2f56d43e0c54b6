"""Which layers hold a weight matrix, and how to view it as (out, in).

Hugging Face's ``Conv1D`` (every GPT-2 attention and MLP projection) is a linear layer whose weight
is stored transposed, (in, out), with y = x W + b; it is recognised by duck typing so that nothing
here imports ``transformers``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_hf_conv1d", "is_meta", "check_not_meta", "parameter_holders", "shared_weight_holders"]


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``Conv1D`` (GPT-2 style linear layer, weight (in, out), ``nf`` outputs)."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
    )


def is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


def check_not_meta(t: torch.Tensor, what: str) -> None:
    """``ValueError`` for a tensor on the ``meta`` device (it has a shape but no values to decompose)."""
    if is_meta(t):
        raise ValueError(
            f"{what} is on the 'meta' device: it has a shape but no values, so its singular values "
            "cannot be computed. Load the real weights first (e.g. model.to_empty(device='cpu') then "
            "load_state_dict, or from_pretrained without device_map='meta')."
        )


def parameter_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> every (full parameter name, owning module) that holds it (tied aliases included)."""
    index: dict[int, list[tuple[str, nn.Module]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            index.setdefault(id(p), []).append((f"{mod_name}.{p_name}" if mod_name else p_name, mod))
    return index


def shared_weight_holders(
    model: nn.Module, module: nn.Module, index: dict[int, list[tuple[str, nn.Module]]] | None = None
) -> list[str]:
    """Names of the other parameters of ``model`` that are the same tensor as ``module.weight``
    (e.g. ``["lm_head.weight"]`` for GPT-2's tied ``transformer.wte``). ``index``: a precomputed
    :func:`parameter_holders` (for many calls on one model)."""
    w = getattr(module, "weight", None)
    if w is None:
        return []
    index = parameter_holders(model) if index is None else index
    return sorted({name for name, mod in index.get(id(w), []) if mod is not module})
