"""Saving and loading adapters: the adapter tensors and ``modules_to_save`` only, as safetensors
plus a JSON config, written atomically.

A saved adapter is a folder with ``torchlowrank_adapter.json`` (config, adapted layer names,
modules_to_save names, the SHA-256 of the tensor file) and ``torchlowrank_adapter.safetensors``
(keys are the adapted model's state-dict keys, e.g. ``bert.encoder.layer.0.attention.self.query
.lora_factors.0``). ``load_adapter`` validates everything (checksum, keys, shapes) before it touches
the model, so a corrupted file or a mismatching model leaves the model unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_write_bytes, atomic_write_text
from .config import AdapterConfig, config_from_dict
from .layers import supported_layer
from .model import adapt, adapter_layers, adapter_state

__all__ = ["save_adapter", "load_adapter", "adapter_tensors", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "torchlowrank_adapter.json"
WEIGHTS_NAME = "torchlowrank_adapter.safetensors"
FORMAT = "torchlowrank-adapter"
VERSION = 1


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: every factor and every modules_to_save tensor, by state-dict key."""
    state = adapter_state(model)
    if state is None:
        raise ValueError("the model carries no adapter; call tlr.adapt(model, config) first")
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        for i, p in enumerate(layer.lora_factors):
            out[f"{name}.lora_factors.{i}"] = p
    for name in state.modules_to_save:
        for k, v in model.get_submodule(name).state_dict().items():
            out[f"{name}.{k}"] = v
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter of ``model`` to the folder ``path`` (created); returns the folder.

    Files: ``torchlowrank_adapter.safetensors`` (written first) and ``torchlowrank_adapter.json``
    (written last, with the tensor file's SHA-256), each atomically.
    """
    from safetensors.torch import save

    state = adapter_state(model)
    if state is None:
        raise ValueError("the model carries no adapter; call tlr.adapt(model, config) first")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; save_adapter writes a folder")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_tensors(model).items()}
    blob = save(tensors, metadata={"format": FORMAT})
    atomic_write_bytes(folder / WEIGHTS_NAME, blob)
    layers = adapter_layers(model)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": state.config.to_dict(),
        "targets": state.targets,
        "modules_to_save": state.modules_to_save,
        "compressed": [n for n, layer in layers if layer.compressed],
        "weights_file": WEIGHTS_NAME,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "num_bytes": len(blob),
    }
    atomic_write_text(folder / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return folder


def _read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load

    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"no adapter folder at {folder}; save one with tlr.save_adapter(model, path)")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing; {folder} is not a complete torchlowrank adapter "
                                    "(save it again with tlr.save_adapter)")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        for key in ("config", "targets", "modules_to_save", "sha256"):
            if key not in meta:
                raise ValueError(f"missing field {key!r}")
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{cfg_path} is corrupted or not a torchlowrank adapter config ({e}); "
                         "save the adapter again") from e
    blob = w_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise ValueError(f"{w_path} is corrupted or truncated: its checksum does not match the one recorded in "
                         f"{CONFIG_NAME} ({len(blob)} bytes, expected {meta.get('num_bytes', '?')}); "
                         "the model was left unchanged; save the adapter again")
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"{w_path} is corrupted and cannot be read ({e}); the model was left unchanged") from e
    return meta, tensors


def _expected_shapes(model: nn.Module, meta: dict, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape the file must hold, computed without modifying ``model``."""
    state = adapter_state(model)
    if state is not None:
        return {k: tuple(v.shape) for k, v in adapter_tensors(model).items()}
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    for name in meta["targets"]:
        module = modules.get(name)
        if module is None or not supported_layer(module):
            raise ValueError(f"the adapter targets {name!r}, which this model "
                             f"{'lacks' if module is None else 'has as an unsupported ' + type(module).__name__}; "
                             f"first mismatching key: {name}.lora_factors.0")
        w = module.weight
        if isinstance(module, nn.Linear):
            m, n = w.shape
        elif isinstance(module, nn.Conv2d):
            m, n = w.shape[0], w[0].numel()
        else:  # Embedding and HF Conv1D store (n, m)
            n, m = w.shape
        r, L = config.r, config.depth
        dims = [(r, n)] + [(r, r)] * (L - 2) + [(m, r)]
        for i, s in enumerate(dims):
            shapes[f"{name}.lora_factors.{i}"] = tuple(s)
    for name in meta["modules_to_save"]:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the adapter saves module {name!r}, which this model lacks")
        for k, v in module.state_dict().items():
            shapes[f"{name}.{k}"] = tuple(v.shape)
    return shapes


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` (in place) and return it.

    A model without adapters is adapted first with the saved config on exactly the saved layers; an
    adapted model must carry the same kind of adapter. Raises FileNotFoundError for a missing
    folder/file, ValueError for a corrupted or truncated file, a different adapter kind, or a
    shape mismatch (naming the first mismatching key); in all these cases the model is unchanged.
    """
    folder = Path(path)
    meta, tensors = _read(folder)
    try:
        config = config_from_dict(meta["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{folder / CONFIG_NAME} holds an invalid config ({e})") from e
    state = adapter_state(model)
    if state is not None:
        have, want = state.config, config
        if (type(have), have.r, have.depth) != (type(want), want.r, want.depth):
            raise ValueError(f"the model carries a {type(have).__name__}(r={have.r}, depth={have.depth}) but the file "
                             f"holds a {type(want).__name__}(r={want.r}, depth={want.depth}); load into a fresh base "
                             "model or tlr.merge(model) first")
    expected = _expected_shapes(model, meta, config)
    for key in sorted(set(expected) | set(tensors)):
        if key not in tensors:
            raise ValueError(f"the adapter file lacks {key!r} that the model expects; first mismatching key: {key}")
        if key not in expected:
            raise ValueError(f"the adapter file holds {key!r} that the model does not have; first mismatching key: {key}")
        if tuple(tensors[key].shape) != expected[key]:
            raise ValueError(f"shape mismatch at key {key!r}: file {tuple(tensors[key].shape)} vs model "
                             f"{expected[key]}; the adapter was saved from a model with different layer sizes")
    if state is None:
        config = dataclasses.replace(config, target_modules=list(meta["targets"]),
                                     modules_to_save=list(meta["modules_to_save"]) or None, exclude_modules=None)
        adapt(model, config)
    live = adapter_tensors(model)
    with torch.no_grad():
        for key, value in tensors.items():
            live[key].copy_(value.to(dtype=live[key].dtype, device=live[key].device))
    compressed = set(meta.get("compressed", []))
    for name, layer in adapter_layers(model):
        layer.compressed = name in compressed
        if layer.compressed:
            layer.init = "compressed"
    return model
