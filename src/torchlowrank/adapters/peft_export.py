"""Export to PEFT's LoRA format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Each adapter collapses to a LoRA pair with B A = Delta W: B = scaling * W_L ... W_2, A = W_1, so the
exported config uses ``lora_alpha = r`` (PEFT scaling 1) and any LoRA runtime serves it. PiSSA
adapters are exported against the original base weights as a rank-2r pair
A' = [A; A0], B' = [B, -B0] (Delta W' = W_res + B A - W0), like PEFT's own PiSSA conversion.
Keys follow PEFT: ``base_model.model.<layer>.lora_A.weight`` / ``lora_B.weight`` (Linear, Conv1D,
Conv2d with kernels (r, in, kh, kw) and (out, r, 1, 1)), ``lora_embedding_A`` / ``lora_embedding_B``
for embeddings, and ``base_model.model.<module>.<tensor>`` for modules_to_save.

Refused (ValueError, nothing written): Conv2d layers with ``dilation != 1`` or a ``padding_mode``
other than ``"zeros"``: PEFT's LoRA Conv2d builds its ``lora_A`` conv from the base's kernel size,
stride and padding only (peft 0.21 ``tuners/lora/layer.py``, ``_ConvNd.update_layer``), so it would
compute a different update (or crash on the shapes). Grouped convolutions never carry an adapter here.
Also refused: the ``out_proj`` of an ``nn.MultiheadAttention`` (PEFT's Linear LoRA there is bypassed
by MHA's forward, which reads ``out_proj.weight``), and a ``modules_to_save`` module whose name is a
string suffix of an adapted layer's (DistilBERT's ``classifier`` and ``pre_classifier``): PEFT selects
modules_to_save with ``str.endswith`` and fails to load such a folder. A module picked that way
which carries no adapter (``pre_classifier`` when only attention layers are adapted) is written
with its unchanged tensors, as PEFT loads every module it wraps from the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..distributed import main_process_only
from ..files import atomic_write_bytes, atomic_write_text
from ..layer_types import is_hf_conv1d, matrix_view
from .io import warn_unsaved_norm_buffers
from .layers import AdapterLayer, Conv1DAdapter, Conv2dAdapter, EmbeddingAdapter
from .model import adapter_layers, adapter_state, check_adapters_in_place

__all__ = ["export_peft", "peft_state_dict", "peft_unsupported", "peft_modules_to_save_matches"]

PREFIX = "base_model.model."


def peft_unsupported(name: str, layer: nn.Module, in_mha: bool = False) -> str | None:
    """Why PEFT's LoRA cannot represent an adapter on this layer exactly (None if it can).

    layer: an adapter wrapper or the base layer itself; in_mha: the layer is the out_proj of an
    nn.MultiheadAttention (known from an adapter wrapper by itself)."""
    if getattr(layer, "weight_is_dense", False) or in_mha:
        return (
            f"{name}: the out_proj of an nn.MultiheadAttention; MHA's forward reads out_proj.weight, so PEFT's "
            "LoRA Linear there is ignored (peft 0.21 serves the base model's outputs); PEFT adapts MHA only "
            "by targeting the MultiheadAttention module itself"
        )
    conv = layer.base_layer if isinstance(layer, AdapterLayer) else layer
    view = matrix_view(conv)
    if view is not None and view.kind == "conv2d":
        if tuple(conv.dilation) != (1,) * len(conv.dilation):
            return (
                f"{name}: Conv2d with dilation={tuple(conv.dilation)}; PEFT's LoRA Conv2d ignores dilation "
                "(its lora_A conv uses only kernel size, stride and padding), so it would compute a different "
                "update"
            )
        if conv.padding_mode != "zeros":
            return (
                f"{name}: Conv2d with padding_mode={conv.padding_mode!r}; PEFT's LoRA Conv2d pads its lora_A "
                "conv with zeros, so it would compute a different update"
            )
    return None


def peft_modules_to_save_matches(
    model: nn.Module, targets: list[str], modules_to_save: list[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """What PEFT's ``modules_to_save`` would pick beyond the saved modules themselves.

    PEFT wraps every module whose full name ends with a ``modules_to_save`` entry (``str.endswith``,
    peft 0.21 ``_set_trainable``), so DistilBERT's ``classifier`` also picks ``pre_classifier``. The
    entries are full module names already, so no longer path can tell the two apart when the saved
    module is at the top level. Returns (clashes, extras): ``clashes`` the (entry, module) pairs where
    the module picked carries a LoRA adapter or holds one (PEFT raises a TypeError on load), ``extras``
    the other modules picked (PEFT loads their tensors from the file, so export them unchanged)."""
    clashes, extras = [], []
    names = [n for n, _ in model.named_modules() if n and not any(n.startswith(t + ".") for t in targets)]
    for saved in modules_to_save:
        for n in names:
            if (
                n == saved
                or not n.endswith(saved)
                or any(n == s or n.startswith(s + ".") for s in modules_to_save)
            ):
                continue
            if n in targets or any(t.startswith(n + ".") for t in targets):
                clashes.append((saved, n))
            elif n not in extras and not any(n.startswith(e + ".") for e in extras):
                extras.append(n)
    return clashes, extras


def peft_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int], bool]:
    """(PEFT-keyed tensors, exported rank of every adapted layer by name, fan_in_fan_out) for an
    adapted model."""
    state = adapter_state(model)
    if state is None:
        raise ValueError("export_peft needs a model adapted with tlr.adapt(model, config)")
    check_adapters_in_place(model, "export_peft")
    refused = [why for name, layer in adapter_layers(model) if (why := peft_unsupported(name, layer))]
    if refused:
        raise ValueError(
            "export_peft cannot write this adapter in PEFT's LoRA format: "
            + "; ".join(refused)
            + ". Exclude these layers (exclude_modules) to export, or keep the adapter in this "
            "library's format (tlr.save_adapter / tlr.merge)"
        )
    clashes, extras = peft_modules_to_save_matches(model, state.targets, state.modules_to_save)
    if clashes:
        raise ValueError(
            "export_peft cannot write this adapter in a form PEFT loads: PEFT picks modules_to_save by plain "
            "string suffix (every module whose name ends with the entry), so "
            + "; ".join(
                f"{saved!r} also picks {other!r}, which carries a LoRA adapter" for saved, other in clashes
            )
            + " (peft 0.21: TypeError 'modules_to_save cannot be applied to modules of type "
            "peft...lora.layer.Linear'). Adapt again with those layers in modules_to_save too (e.g. "
            f"modules_to_save={sorted({o for _, o in clashes} | set(state.modules_to_save))}) or in "
            "exclude_modules, or keep the adapter in this library's format (tlr.save_adapter). Nothing "
            "was written"
        )
    on_meta = [
        name
        for name, layer in adapter_layers(model)
        if layer.lora_A.is_meta or layer.base_layer.weight.is_meta
    ]
    if on_meta:
        raise ValueError(
            f"export_peft: {on_meta[0]} is on the meta device and holds no values; materialise the model "
            "first (model.to_empty(device=...) and load its weights)"
        )
    out: dict[str, torch.Tensor] = {}
    ranks, fan_in_fan_out = {}, False
    for name, layer in adapter_layers(model):
        B, A = layer.collapsed_pair()
        if layer.init == "pissa":
            B0, A0 = layer.pissa_B0 * layer.scaling, layer.pissa_A0
            B, A = torch.cat([B, -B0], dim=1), torch.cat([A, A0], dim=0)
        r = A.shape[0]
        ranks[name] = r
        key = PREFIX + name
        if isinstance(layer, EmbeddingAdapter):
            out[f"{key}.lora_embedding_A"] = A
            out[f"{key}.lora_embedding_B"] = B
            continue
        if isinstance(layer, Conv2dAdapter):
            w = layer.base_layer.weight
            A = A.reshape(r, *w.shape[1:])
            B = B.reshape(B.shape[0], r, 1, 1)
        if isinstance(layer, Conv1DAdapter) or is_hf_conv1d(layer.base_layer):
            fan_in_fan_out = True
        out[f"{key}.lora_A.weight"] = A
        out[f"{key}.lora_B.weight"] = B
    # extras: modules PEFT's suffix match picks besides the saved ones; their (unchanged) tensors go
    # into the file, since PEFT loads every module it wraps from it
    for name in list(state.modules_to_save) + extras:
        for k, v in model.get_submodule(name).state_dict().items():
            out[f"{PREFIX}{name}.{k}"] = v.detach()
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}, ranks, fan_in_fan_out


def rank_patterns(ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """(r, rank_pattern) for PEFT: r the most common rank, and every layer of another rank by its
    regex-escaped full name, longer names first (PEFT takes the first pattern matching a name's end,
    and a shorter name can be a dotted suffix of a longer one)."""
    counts: dict[int, int] = {}
    for k in ranks.values():
        counts[k] = counts.get(k, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    others = sorted((n for n, k in ranks.items() if k != r), key=lambda n: (-len(n), n))
    return r, {re.escape(n): ranks[n] for n in others}


@main_process_only  # under DDP rank 0 writes, the other ranks wait for it
def export_peft(
    model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Write the adapter of ``model`` in PEFT LoRA format into the folder ``path``; returns it.

    Load with ``peft.PeftModel.from_pretrained(base_model, path)`` on the *original* base model
    (or with ``tlr.load_adapter(base_model, path)``). Deep LoRA is collapsed to a rank-r LoRA pair
    (exact up to float rounding); a GeoLoRA adapter is written as plain LoRA at each layer's final
    rank (A = diag(sqrt S) V^T, B = scaling U diag(sqrt S); layers of other ranks than the most
    common one in ``rank_pattern`` / ``alpha_pattern``, PEFT scaling 1 everywhere). Raises ValueError, writing nothing, for layers PEFT cannot
    represent (Conv2d with dilation or non-zero padding modes) and for a modules_to_save entry that
    PEFT's suffix match would also apply to an adapted layer (DistilBERT's ``classifier`` and
    ``pre_classifier``). Warns (``NormBuffersNotSavedWarning``) when BatchNorm running statistics
    outside modules_to_save changed since ``tlr.adapt``: PEFT's format cannot carry them.
    """
    from safetensors.torch import save

    state = adapter_state(model)
    if state is None:
        raise ValueError("export_peft needs a model adapted with tlr.adapt(model, config)")
    tensors, ranks, fan_in_fan_out = peft_state_dict(model)
    r, pattern = rank_patterns(ranks)
    warn_unsaved_norm_buffers(
        model,
        "export_peft",
        "PEFT's format holds no buffers outside modules_to_save: put the "
        "normalisation layers in modules_to_save (they then also train), or keep the adapter "
        "in this library's format with tlr.save_adapter(model, path, save_buffers=True)",
        stacklevel=4,
    )
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "target_modules": list(state.targets),
        "exclude_modules": None,
        "modules_to_save": list(state.modules_to_save) or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
    }
    folder = Path(path)
    atomic_write_bytes(folder / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return folder
