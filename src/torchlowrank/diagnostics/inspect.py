"""Read weights from files and look at their spectra: the library side of ``torchlowrank inspect``.

- :func:`load_weights`: a ``.safetensors`` file, a torch checkpoint (a state dict, possibly wrapped as
  ``{"state_dict": ...}`` or ``{"model": ...}``), a Hugging Face model folder (also sharded, with
  ``model.safetensors.index.json``), a PEFT LoRA adapter folder (``adapter_config.json`` +
  ``adapter_model.safetensors``), which gives one update Delta W = scaling * B @ A per adapted module
  (scaling = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``; embeddings'
  ``lora_embedding_A/B`` too), so its spectrum shows how low-rank the fine-tuning update is, or a
  torchlowrank adapter folder (``torchlowrank_adapter.json``: Delta W = scaling * W_L ... W_1).
  DoRA adapters rescale the columns of W0 + Delta W by a learned magnitude, so their update depends on
  the base weights: pass ``base=`` to :func:`load_peft_adapter` to get the true update.
- :func:`compare_weights`: the differences b - a of two checkpoints' shared matrices.
- :func:`weights_spectrum`: a :class:`~torchlowrank.ranks.SpectrumTable` of a dict of tensors.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..files import read_json
from ..ranks import SpectrumTable, matrix_spectrum

__all__ = [
    "load_weights",
    "load_peft_adapter",
    "load_torchlowrank_adapter",
    "compare_weights",
    "weights_spectrum",
    "WeightDiff",
]

_MODEL_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_LORA_KEY = re.compile(r"(.+)\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)(?:\.[^.]+)?(?:\.weight)?")


def _corrupted(path: Path, what: str, err: Exception) -> ValueError:
    return ValueError(
        f"{path} could not be read as {what}: the file is corrupted, truncated or of another "
        f"format ({type(err).__name__}: {err}). Re-save it (safetensors.torch.save_file or "
        "torch.save(model.state_dict(), path)) and try again."
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ValueError depending on the damage
        raise _corrupted(path, "a safetensors file", e) from e


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key], path)
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ValueError(
        f"{path} holds no tensors at the top level nor under 'state_dict' / 'model' "
        f"(got {type(obj).__name__}); save a state dict: torch.save(model.state_dict(), path)"
    )


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # junk bytes surface as RuntimeError, UnpicklingError, KeyError, struct.error, ...
        if "weights_only" in str(e) and "Unsupported global" in str(e):
            raise ValueError(
                f"{path} pickles Python objects (not just tensors), which are not loaded for safety; "
                "save model.state_dict() instead of the model"
            ) from e
        raise _corrupted(path, "a torch checkpoint", e) from e
    return _unwrap(obj, path)


def _peft_scaling(config: dict[str, Any], module: str, r: int) -> float:
    alpha = config.get("lora_alpha", r)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            alpha = value
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r


def _dora_update(
    name: str,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    base: dict[str, torch.Tensor] | None,
    folder: Path,
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """W' - W0 for DoRA: W' = magnitude * (W0 + Delta W) / ||W0 + Delta W|| (norm of each output row)."""
    if base is None:
        raise ValueError(
            f"{folder} is a DoRA adapter: its update of {name!r} depends on the base weights (W' = m * "
            "(W0 + s B A) / ||W0 + s B A||), so it cannot be inspected from the adapter alone. Pass the "
            "base weights: load_peft_adapter(folder, base=load_weights(base_checkpoint)), or compare the "
            "merged model with the base: torchlowrank inspect base --compare merged"
        )
    key = next((k for k in (f"{name}.weight", f"{name}.base_layer.weight") if k in base), None)
    if key is None:
        raise ValueError(
            f"{folder}: DoRA module {name!r} has no weight {name}.weight in the base weights given"
        )
    W0 = base[key].detach().float()
    W0 = W0.T if fan_in_fan_out else W0
    W0 = W0.reshape(W0.shape[0], -1)
    if W0.shape != delta.shape:
        raise ValueError(
            f"{folder}: base weight {key} has shape {tuple(W0.shape)}, the adapter's update {tuple(delta.shape)}"
        )
    merged = W0 + delta
    norm = merged.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return magnitude.float().reshape(-1, 1) * merged / norm - W0


def load_peft_adapter(
    folder: str | os.PathLike, base: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Per adapted module, the update (out, in) float32 a PEFT LoRA adapter folder applies.

    LoRA: Delta W = scaling * B @ A; embeddings (``lora_embedding_A`` (r, num_embeddings),
    ``lora_embedding_B`` (dim, r)): Delta W = scaling * (B @ A)^T, (num_embeddings, dim) like the
    embedding's weight. DoRA (``lora_magnitude_vector``): W' - W0, which needs the base weights
    ``base`` ({name: tensor}, e.g. :func:`load_weights` of the base checkpoint); without them a
    ``ValueError`` says so. Keys are module names without PEFT's ``base_model.model.`` prefix. r is
    read from A's shape (so ``rank_pattern`` is honoured); alpha from ``lora_alpha`` / ``alpha_pattern``.
    """
    from ..adapters.io import read_peft_folder

    folder = Path(folder)
    config, tensors, _ = read_peft_folder(folder)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(
            f"{folder} holds a {config.get('peft_type')} adapter; only LoRA (and DoRA) adapters are supported"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.fullmatch(key)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = t
    if not parts:
        raise ValueError(f"{folder}: no lora_A / lora_B weights found among {list(tensors)[:8]}")
    base = None if base is None else {k.removeprefix("base_model.model."): v for k, v in base.items()}
    deltas = {}
    for name, ab in parts.items():
        embedding = "embedding_A" in ab or "embedding_B" in ab
        a_key, b_key = ("embedding_A", "embedding_B") if embedding else ("A", "B")
        if a_key not in ab or b_key not in ab:
            raise ValueError(
                f"{folder}: module {name!r} has {sorted('lora_' + k for k in ab)} but not both "
                f"lora_{a_key} and lora_{b_key}"
            )
        A = ab[a_key].float().reshape(ab[a_key].shape[0], -1)
        B = ab[b_key].float().reshape(ab[b_key].shape[0], -1)
        if B.shape[1] != A.shape[0]:
            raise ValueError(
                f"{folder}: {name}: lora_{b_key} {tuple(B.shape)} and lora_{a_key} {tuple(A.shape)} do not chain"
            )
        delta = _peft_scaling(config, name, A.shape[0]) * (B @ A)
        if embedding:
            delta = delta.T
        if "magnitude_vector" in ab:
            delta = _dora_update(
                name, delta, ab["magnitude_vector"], base, folder, bool(config.get("fan_in_fan_out"))
            )
        deltas[name] = delta
    return deltas


def load_torchlowrank_adapter(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Per adapted module, Delta W = scaling * W_L ... W_1 (the layer's (out, in) matrix view, float32)
    from a folder written by :func:`torchlowrank.save_adapter`; for a GeoLoRA adapter
    Delta W = scaling * U diag(S) V^T at each layer's saved rank; LoRA's per-layer ranks and alphas
    (rank_pattern / alpha_pattern) give each layer its own scaling. (A PiSSA adapter also replaced
    the base weights by their residual; the spectrum shown is that of the adapter's factors' product.)"""
    from safetensors.torch import load

    folder = Path(folder)
    meta = read_json(
        folder / "torchlowrank_adapter.json",
        "torchlowrank adapter config",
        "save the adapter again with tlr.save_adapter",
    )
    wpath = (
        folder / str(meta.get("weights_file", "torchlowrank_adapter.safetensors"))
        if isinstance(meta, dict)
        else None
    )
    if wpath is None or not wpath.is_file():
        raise FileNotFoundError(f"{folder} has torchlowrank_adapter.json but no adapter tensor file")
    try:
        from ..adapters.config import LoRAConfig, config_from_dict

        tensors = load(wpath.read_bytes())
        config = config_from_dict(meta["config"])
    except Exception as e:  # corrupted metadata or tensors
        raise _corrupted(wpath, "a torchlowrank adapter", e) from e

    def scaling(name: str) -> float:
        return float(config.scaling_of(name) if isinstance(config, LoRAConfig) else config.scaling)

    factors: dict[str, dict[int, torch.Tensor]] = {}
    units: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(.+)\.lora_factors\.(\d+)", key)
        if m:
            factors.setdefault(m.group(1), {})[int(m.group(2))] = t.float()
        m = re.fullmatch(r"(.+)\.lora_unit\.([USV])", key)
        if m:
            units.setdefault(m.group(1), {})[m.group(2)] = t.float()
    if not factors and not units:
        raise ValueError(
            f"{folder}: no adapter factors (*.lora_factors.i, or GeoLoRA's *.lora_unit.U / S / V) in {wpath.name}"
        )
    deltas = {}
    for name, fs in factors.items():
        out = fs[0]
        for i in range(1, len(fs)):
            out = fs[i] @ out
        deltas[name] = scaling(name) * out
    for name, usv in units.items():
        if set(usv) != {"U", "S", "V"}:
            raise ValueError(
                f"{wpath}: GeoLoRA layer {name} lacks lora_unit.{sorted({'U', 'S', 'V'} - set(usv))[0]}"
            )
        U, S, V = usv["U"], usv["S"], usv["V"]
        if not (U.ndim == V.ndim == 2 and S.ndim == 1 and U.shape[1] == V.shape[1] == S.shape[0]):
            raise ValueError(
                f"{wpath}: GeoLoRA layer {name} has inconsistent shapes U {tuple(U.shape)}, S {tuple(S.shape)}, "
                f"V {tuple(V.shape)} (expected (out, k), (k,), (in, k))"
            )
        deltas[name] = scaling(name) * (U * S) @ V.T
    return deltas


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    data = read_json(index, "sharded checkpoint index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no 'weight_map'; it is not a Hugging Face sharded checkpoint index")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / str(shard)
        if not path.is_file():
            raise FileNotFoundError(f"{index} names the shard {shard}, which is missing from {index.parent}")
        out.update(_load_safetensors(path) if path.suffix == ".safetensors" else _load_torch(path))
    return out


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: ``{name: tensor}``.

    path: a ``.safetensors`` file; a torch checkpoint (``torch.load(weights_only=True)``; a
    ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped); a PEFT LoRA adapter folder
    (returns Delta W per module, see :func:`load_peft_adapter`); a torchlowrank adapter folder
    (:func:`load_torchlowrank_adapter`); or a model folder holding ``model.safetensors`` /
    ``pytorch_model.bin`` or a sharded checkpoint (``*.index.json``). Raises ``FileNotFoundError`` for a missing
    path and ``ValueError`` for a corrupted or unsupported file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return load_peft_adapter(path)
        if (path / "torchlowrank_adapter.json").is_file():
            return load_torchlowrank_adapter(path)
        for name in _MODEL_FILES:
            if (path / name).is_file():
                return load_weights(path / name)
        for name in _INDEX_FILES:
            if (path / name).is_file():
                return _load_sharded(path / name)
        raise ValueError(
            f"{path} is a folder with neither adapter_config.json (PEFT adapter), "
            f"torchlowrank_adapter.json, nor one of {', '.join(_MODEL_FILES + _INDEX_FILES)}; "
            "pass a weights file instead"
        )
    if path.name.endswith(".index.json"):
        return _load_sharded(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _load_torch(path)


class WeightDiff(dict):
    """``{name: b - a}`` for the matrices (2-D+ tensors) both checkpoints share with equal shapes.

    Attributes: ``shape_mismatches`` ``{name: (shape_a, shape_b)}``; ``only_a`` / ``only_b``: names of
    2-D+ tensors present in one checkpoint only.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shape_mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.only_a: list[str] = []
        self.only_b: list[str] = []

    def summary(self) -> str:
        """One line: counts of compared, mismatched and unshared matrices."""
        parts = [f"{len(self)} shared matrices compared"]
        if self.shape_mismatches:
            parts.append(
                "shape mismatches: "
                + ", ".join(f"{k} {tuple(a)} vs {tuple(b)}" for k, (a, b) in self.shape_mismatches.items())
            )
        if self.only_a:
            parts.append(f"{len(self.only_a)} only in the first")
        if self.only_b:
            parts.append(f"{len(self.only_b)} only in the second")
        return "; ".join(parts)


def _as_tensors(x: dict[str, torch.Tensor] | str | os.PathLike) -> dict[str, torch.Tensor]:
    return x if isinstance(x, dict) else load_weights(x)


def compare_weights(
    a: dict[str, torch.Tensor] | str | os.PathLike, b: dict[str, torch.Tensor] | str | os.PathLike
) -> WeightDiff:
    """Differences ``b[k] - a[k]`` (float32, or float64 if either is) for shared 2-D+ floating tensors.

    ``a`` and ``b`` are dicts of tensors or paths for :func:`load_weights`. The spectrum of the
    difference of a fine-tuned and a base checkpoint shows how low-rank the fine-tuning update is.
    """
    ta, tb = _as_tensors(a), _as_tensors(b)
    mats_a = {k: v for k, v in ta.items() if v.ndim >= 2 and v.is_floating_point()}
    mats_b = {k: v for k, v in tb.items() if v.ndim >= 2 and v.is_floating_point()}
    diff = WeightDiff()
    for k, va in mats_a.items():
        if k not in mats_b:
            diff.only_a.append(k)
            continue
        vb = mats_b[k]
        if va.shape != vb.shape:
            diff.shape_mismatches[k] = (tuple(va.shape), tuple(vb.shape))
            continue
        dt = torch.float64 if torch.float64 in (va.dtype, vb.dtype) else torch.float32
        diff[k] = vb.detach().to(dt) - va.detach().to(dt)
    diff.only_b = [k for k in mats_b if k not in mats_a]
    return diff


def weights_spectrum(
    tensors: dict[str, torch.Tensor], top_k: int = 5, energy: float = 0.99, kind: str = "tensor"
) -> SpectrumTable:
    """Spectrum table (stable / effective / numerical rank, top singular values) of every 2-D+
    floating tensor in ``tensors`` (conv kernels reshaped to out x in*k*k); 1-D tensors are skipped."""
    table = SpectrumTable()
    for name, t in tensors.items():
        if t.ndim >= 2 and t.is_floating_point() and t.numel() > 0:
            table.append(matrix_spectrum(name, kind, t, top_k, energy))
    return table
