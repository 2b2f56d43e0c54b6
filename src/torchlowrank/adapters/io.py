"""Saving and loading adapters: the adapter tensors and ``modules_to_save`` only, as safetensors
plus a JSON config, written atomically.

A saved adapter is a folder with ``torchlowrank_adapter.json`` (config, adapted layer names,
modules_to_save names, the SHA-256 of the tensor file, the base model's class, config and layer
fingerprint: ``load_adapter`` warns when it loads into another model) and ``torchlowrank_adapter.safetensors``
(keys are the adapted model's state-dict keys, e.g. ``bert.encoder.layer.0.attention.self.query
.lora_factors.0``). ``load_adapter`` validates everything (checksum, keys, shapes, config) before it
touches the model, so a corrupted file or a mismatching model leaves the model unchanged.

``load_adapter`` also reads PEFT LoRA folders (``adapter_config.json`` + ``adapter_model.safetensors``
or ``.bin``), written by ``tlr.export_peft`` or by ``peft`` itself: each ``lora_A`` / ``lora_B``
(``lora_embedding_A`` / ``_B``) pair becomes the two factors of a :class:`LoRAConfig` adapter with
PEFT's r, lora_alpha and use_rslora, so the model computes what ``peft.PeftModel`` computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..distributed import main_process_only
from ..files import atomic_write_bytes, atomic_write_text
from ..layer_types import matrix_view
from .config import AdapterConfig, GeoLoRAConfig, LoRAConfig, config_from_dict
from .layers import AdapterLayer, supported_layer
from .model import (
    adapt,
    adapter_layers,
    adapter_state,
    changed_norm_buffers,
    check_adapters_in_place,
    norm_buffers,
    norm_layers_of,
)

__all__ = [
    "save_adapter",
    "load_adapter",
    "NormBuffersNotSavedWarning",
    "AdapterBaseMismatchWarning",
    "base_fingerprint",
    "warn_unsaved_norm_buffers",
    "adapter_tensors",
    "read_peft_adapter",
    "config_differences",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

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
        for suffix, p in layer.named_factors():
            out[f"{name}.{suffix}"] = p
    for name in state.modules_to_save:
        for k, v in model.get_submodule(name).state_dict().items():
            out[f"{name}.{k}"] = v
    return out


def warn_unsaved_norm_buffers(model: nn.Module, what: str, hint: str, stacklevel: int = 3) -> None:
    """Warn when normalisation statistics outside modules_to_save changed since ``adapt`` (the model
    ran in train mode) and ``what`` does not write them: the adapter loaded into a fresh base model
    would run with the base's statistics, so it would compute other outputs."""
    changed = changed_norm_buffers(model)
    if changed:
        layers = norm_layers_of(changed)
        shown = ", ".join(layers[:4]) + (f", ... ({len(layers) - 4} more)" if len(layers) > 4 else "")
        warnings.warn(
            f"{what}: the running statistics of {len(layers)} normalisation layer(s) ({shown}) changed since "
            "tlr.adapt (the model ran in train mode) but are not part of the adapter, so the adapter loaded "
            f"into a fresh base model computes other outputs. {hint}",
            NormBuffersNotSavedWarning,
            stacklevel=stacklevel,
        )


class NormBuffersNotSavedWarning(UserWarning):
    """Normalisation statistics changed by training are not written with the adapter."""


class AdapterBaseMismatchWarning(UserWarning):
    """An adapter is loaded into a model of another class, structure or config than it was saved from."""


# config entries that say how a model runs or is saved, not what it computes
_VOLATILE_CONFIG = {
    "transformers_version",
    "architectures",
    "torch_dtype",
    "dtype",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "attn_implementation",
    "tie_word_embeddings",
    "problem_type",
    "id2label",
    "label2id",
    "torchscript",
    "use_return_dict",
}


def base_fingerprint(model: nn.Module) -> dict:
    """What an adapter file records about the model it was made for: the model's class, the SHA-256
    of its base state-dict keys and shapes (adapter factors left out, wrapped layers under their own
    names; so resnet18 and resnet34 differ), and for a Hugging Face model its config (without the
    entries that only say how it runs: dtype, use_cache, attention implementation, label names, ...)."""
    cls = type(model)
    entries = []
    for k, v in model.state_dict(keep_vars=True).items():
        if ".lora_factors." in k or ".lora_unit." in k or k.rpartition(".")[2] in ("pissa_A0", "pissa_B0"):
            continue
        entries.append(f"{k.replace('.base_layer.', '.')}:{tuple(v.shape)}")
    cfg = getattr(model, "config", None)
    config = None
    if callable(getattr(cfg, "to_dict", None)):
        raw = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG}
        config = json.loads(json.dumps(raw, sort_keys=True, default=str))
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "structure_sha256": hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest(),
        "num_tensors": len(entries),
        "config": config,
    }


def base_differences(saved: dict, model: nn.Module) -> list[str]:
    """How ``model`` differs from the fingerprint ``saved`` (file vs model), empty if it matches."""
    now = base_fingerprint(model)
    diffs = []
    if saved.get("class") != now["class"]:
        diffs.append(f"class {saved.get('class')} vs {now['class']}")
    a, b = saved.get("config"), now["config"]
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if keys:
            shown = "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:6])
            diffs.append(f"config {shown}" + (f"; ... ({len(keys) - 6} more)" if len(keys) > 6 else ""))
    if saved.get("structure_sha256") not in (None, now["structure_sha256"]):
        diffs.append(
            f"layers: {saved.get('num_tensors')} tensors vs {now['num_tensors']} (other names or shapes)"
        )
    return diffs


@main_process_only  # under DDP rank 0 writes, the other ranks wait for it
def save_adapter(model: nn.Module, path: str | os.PathLike, save_buffers: bool = False) -> Path:
    """Write the adapter of ``model`` to the folder ``path`` (created); returns the folder.

    Files: ``torchlowrank_adapter.safetensors`` (written first) and ``torchlowrank_adapter.json``
    (written last, with the tensor file's SHA-256), each atomically. ``save_buffers=True`` also
    writes the running statistics of the normalisation layers (BatchNorm) outside modules_to_save,
    which training in train mode changes; ``load_adapter`` restores them. Without it a warning says
    when they changed since ``tlr.adapt``. The base model's class and config are recorded, and
    ``load_adapter`` warns when the model it loads into differs.
    """
    from safetensors.torch import save

    state = adapter_state(model)
    if state is None:
        raise ValueError("the model carries no adapter; call tlr.adapt(model, config) first")
    if not isinstance(save_buffers, bool):
        raise ValueError(f"save_buffers must be True or False, got {save_buffers!r}")
    check_adapters_in_place(model, "save_adapter")
    _refuse_meta(adapter_tensors(model).items(), "save_adapter")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; save_adapter writes a folder")
    buffers = norm_buffers(model, state.modules_to_save) if save_buffers else {}
    _refuse_meta(buffers.items(), "save_adapter")
    if not save_buffers:
        warn_unsaved_norm_buffers(
            model,
            "save_adapter",
            "Pass save_buffers=True to write them with the adapter, or "
            "put the normalisation layers in modules_to_save (they then also train)",
            stacklevel=4,
        )
    tensors = {
        k: v.detach().to("cpu").contiguous().clone() for k, v in {**adapter_tensors(model), **buffers}.items()
    }
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
        "buffers": sorted(buffers),
        "base_model": base_fingerprint(model),
        "weights_file": WEIGHTS_NAME,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "num_bytes": len(blob),
    }
    atomic_write_text(folder / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return folder


def _refuse_meta(items, what: str) -> None:
    meta = [k for k, v in items if v.is_meta]
    if meta:
        raise ValueError(
            f"{what}: {meta[0]} (and {len(meta) - 1} more) is on the meta device and holds no values; "
            "materialise the model first (model.to_empty(device=...) and load its weights)"
        )


def _read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load

    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"no adapter folder at {folder}; save one with tlr.save_adapter(model, path)")
    if not cfg_path.exists() and (folder / PEFT_CONFIG).is_file():
        return read_peft_adapter(folder)
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} is missing; {folder} is not a complete torchlowrank adapter "
                "(save it again with tlr.save_adapter)"
            )
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        for key in ("config", "targets", "modules_to_save", "sha256"):
            if key not in meta:
                raise ValueError(f"missing field {key!r}")
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(
            f"{cfg_path} is corrupted or not a torchlowrank adapter config ({e}); save the adapter again"
        ) from e
    blob = w_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise ValueError(
            f"{w_path} is corrupted or truncated: its checksum does not match the one recorded in "
            f"{CONFIG_NAME} ({len(blob)} bytes, expected {meta.get('num_bytes', '?')}); "
            "the model was left unchanged; save the adapter again"
        )
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(
            f"{w_path} is corrupted and cannot be read ({e}); the model was left unchanged"
        ) from e
    return meta, tensors


PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# PEFT settings this reader maps exactly (anything else is refused rather than loaded wrongly)
_PEFT_INITS = (True, False, "gaussian", "eva")
_LAYER_KEY = re.compile(
    r"^(?P<name>.+)\.lora_(?P<embedding>embedding_)?(?P<side>[AB])(?:\.(?P<adapter>[^.]+))??(?:\.weight)?$"
)


def read_peft_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """The raw contents of a PEFT adapter folder: (config, tensors, weights file).

    ``config`` is ``adapter_config.json`` (a JSON object); ``tensors`` the weights of
    ``adapter_model.safetensors`` (or ``adapter_model.bin``, read with ``weights_only=True``) with
    PEFT's ``base_model.model.`` prefix removed. FileNotFoundError when either file is missing,
    ValueError when one cannot be read. What the adapter means is the caller's business
    (:func:`read_peft_adapter` loads it into a model, ``diagnostics.inspect`` computes its updates).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / PEFT_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no {PEFT_CONFIG}; is it a PEFT adapter folder?")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not a valid PEFT adapter config ({e})") from e
    files = [folder / "adapter_model.safetensors", folder / "adapter_model.bin"]
    w_path = next((p for p in files if p.is_file()), None)
    if w_path is None:
        raise FileNotFoundError(
            f"{folder} has {PEFT_CONFIG} but no adapter_model.safetensors / adapter_model.bin"
        )
    try:
        raw = (
            load_file(str(w_path))
            if w_path.suffix == ".safetensors"
            else torch.load(w_path, map_location="cpu", weights_only=True)
        )
        if not isinstance(raw, dict):
            raise ValueError(f"a {type(raw).__name__}, not a dict of tensors")
    except Exception as e:  # safetensors / torch.load raise their own error types
        raise ValueError(
            f"{w_path} is corrupted and cannot be read ({e}); re-save the adapter "
            "(peft: model.save_pretrained)"
        ) from e
    return cfg, {k.removeprefix(PEFT_PREFIX): v for k, v in raw.items()}, w_path


def read_peft_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """A PEFT LoRA folder as (meta, tensors) in this library's adapter format (LoRAConfig, factor keys).

    ``lora_A`` (r, in) / (r, in, kh, kw) -> ``lora_factors.0`` (r, in-flat); ``lora_B`` (out, r) /
    (out, r, 1, 1) -> ``lora_factors.1`` (out, r); ``lora_embedding_A`` (r, num) and
    ``lora_embedding_B`` (dim, r) likewise; other tensors are modules_to_save. Raises ValueError for
    what a plain LoRA cannot represent (DoRA, bias training, PiSSA/OLoRA/LoftQ inits that rewrite the
    base weights, layer replication, ...). Per-layer ranks and alphas (``rank_pattern`` /
    ``alpha_pattern``, as ``tlr.export_peft`` writes for a GeoLoRA adapter) become the LoRAConfig's
    patterns; every layer's tensors must hold the rank its pattern gives.
    """
    folder = Path(folder)
    cfg, raw, w_path = read_peft_folder(folder)
    cfg_path = folder / PEFT_CONFIG
    where = f"the PEFT adapter in {folder}"
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{where} is a {cfg.get('peft_type')!r} adapter; only LoRA adapters can be loaded")
    refused = {
        "use_dora": "DoRA",
        "lora_bias": "lora_bias",
        "layers_to_transform": "layers_to_transform",
        "layer_replication": "layer_replication",
        "trainable_token_indices": "trainable_token_indices",
        "target_parameters": "target_parameters",
        "use_qalora": "QALoRA",
        "megatron_config": "megatron_config",
    }
    used = [what for key, what in refused.items() if cfg.get(key)]
    if cfg.get("bias", "none") != "none":
        used.append(f"bias={cfg['bias']!r}")
    if cfg.get("init_lora_weights", True) not in _PEFT_INITS:
        used.append(
            f"init_lora_weights={cfg['init_lora_weights']!r} (it rewrites the base weights; save it from "
            "peft with path_initial_model_for_weight_conversion to get a plain LoRA)"
        )
    if used:
        raise ValueError(
            f"{where} uses {', '.join(used)}, which a plain LoRA adapter cannot represent; the model was "
            "left unchanged"
        )
    factors: dict[str, dict[str, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    saved: list[str] = []
    for k, value in raw.items():
        match = _LAYER_KEY.match(k)
        if match and (match["embedding"] or k.endswith(".weight")):
            factors.setdefault(match["name"], {})[match["side"]] = value
            continue
        if ".lora_" in k:
            raise ValueError(
                f"{w_path} holds {PEFT_PREFIX + k!r}, which is not a LoRA A/B weight this reader knows"
            )
        k = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k)  # older PEFT: <module>.modules_to_save.default.<t>
        tensors[k] = value
        module = k.rsplit(".", 1)[0]
        if module not in saved:
            saved.append(module)
    if not factors:
        raise ValueError(f"{w_path} holds no lora_A / lora_B tensors")
    ranks: dict[str, int] = {}
    for name, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{w_path}: layer {name} lacks its lora_{'B' if 'A' in pair else 'A'} tensor")
        A, B = pair["A"], pair["B"]
        if B.dim() == 4 and tuple(B.shape[2:]) != (1, 1):
            raise ValueError(
                f"{w_path}: layer {name} has a lora_B kernel {tuple(B.shape)}; only 1x1 is supported"
            )
        ranks[name] = int(A.shape[0])
        tensors[f"{name}.lora_factors.0"] = A.reshape(A.shape[0], -1)
        tensors[f"{name}.lora_factors.1"] = B.reshape(B.shape[0], -1)
    # saved modules are not adapted layers: a saved module inside an adapted one would be ambiguous
    saved = [m for m in saved if m not in factors]
    try:
        config = LoRAConfig(
            r=int(cfg.get("r", 8)),
            alpha=cfg.get("lora_alpha", 8),
            dropout=cfg.get("lora_dropout", 0.0) or 0.0,
            use_rslora=bool(cfg.get("use_rslora", False)),
            target_modules=sorted(factors),
            modules_to_save=saved or None,
            rank_pattern=cfg.get("rank_pattern") or None,
            alpha_pattern=cfg.get("alpha_pattern") or None,
        )
    except ValueError as e:
        raise ValueError(f"{cfg_path} holds values a LoRAConfig refuses ({e})") from e
    wrong = {n: k for n, k in ranks.items() if k != config.rank_of(n)}
    if wrong:
        name = sorted(wrong)[0]
        raise ValueError(
            f"{w_path} holds rank {wrong[name]} for layer {name} but its config (r, rank_pattern) gives "
            f"{config.rank_of(name)}; the folder is inconsistent"
        )
    meta = {
        "format": "peft",
        "config": config.to_dict(),
        "targets": list(factors),
        "modules_to_save": saved,
        "compressed": [],
    }
    return meta, tensors


def config_differences(have: AdapterConfig, want: AdapterConfig) -> list[str]:
    """The fields (other than target / exclude / save selection) in which two configs differ, as
    ``"field: have vs want"``; LoRA's alpha=None counts as alpha=r."""
    if type(have) is not type(want):
        return [f"adapter type: {type(have).__name__} vs {type(want).__name__}"]
    a, b = have.to_dict(), want.to_dict()
    if isinstance(have, LoRAConfig):
        a["alpha"] = have.r if have.alpha is None else have.alpha
        b["alpha"] = want.r if want.alpha is None else want.alpha
    skip = {"target_modules", "exclude_modules", "modules_to_save"}
    return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if k not in skip and a[k] != b.get(k)]


def _file_rank(tensors: dict[str, torch.Tensor], name: str) -> int:
    """The rank of GeoLoRA layer ``name`` in a file (its S), or ValueError if the file lacks it."""
    key = f"{name}.lora_unit.S"
    if key not in tensors or tensors[key].ndim != 1 or tensors[key].shape[0] < 1:
        raise ValueError(
            f"the adapter file lacks a valid {key!r} (the layer's singular values); first mismatching key: {key}"
        )
    return int(tensors[key].shape[0])


def _expected_shapes(
    model: nn.Module, meta: dict, config: AdapterConfig, tensors: dict[str, torch.Tensor] | None = None
) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape the file must hold, computed without modifying ``model``. GeoLoRA
    layers take their rank from the file (training may have changed it)."""
    state = adapter_state(model)
    geo = isinstance(config, GeoLoRAConfig)
    if state is not None and not geo:
        return {k: tuple(v.shape) for k, v in adapter_tensors(model).items()}
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    for name in meta["targets"]:
        module = modules.get(name)
        if isinstance(module, AdapterLayer):
            module = module.base_layer
        if module is None or not supported_layer(module):
            raise ValueError(
                f"the adapter targets {name!r}, which this model "
                f"{'lacks' if module is None else 'has as an unsupported ' + type(module).__name__}; "
                f"first mismatching key: {name}.lora_factors.0"
            )
        m, n = matrix_view(module).shape
        if geo:
            k = _file_rank(tensors or {}, name)
            if not 1 <= k <= min(m, n):
                raise ValueError(
                    f"the adapter file holds rank {k} for {name} ({m} x {n}); first mismatching key: "
                    f"{name}.lora_unit.S"
                )
            shapes.update(
                {f"{name}.lora_unit.U": (m, k), f"{name}.lora_unit.S": (k,), f"{name}.lora_unit.V": (n, k)}
            )
            continue
        r, L = (config.rank_of(name) if isinstance(config, LoRAConfig) else config.r), config.depth
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


def _expected_buffers(model: nn.Module, meta: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of the normalisation statistics the file holds (``save_buffers=True``), from the model."""
    keys = meta.get("buffers") or []
    have = norm_buffers(model, meta["modules_to_save"])
    missing = [k for k in keys if k not in have]
    if missing:
        raise ValueError(
            f"the adapter holds the normalisation statistics {missing[0]!r}, which this model lacks "
            f"(first mismatching key: {missing[0]}); it was saved from another architecture"
        )
    return {k: tuple(have[k].shape) for k in keys}


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter`, or a PEFT LoRA folder (``tlr.export_peft`` or
    ``peft``'s ``save_pretrained``), into ``model`` (in place) and return it.

    A model without adapters is adapted first with the file's config on exactly the saved layers
    (PiSSA: the base weights become the residual again, as when the adapter was made); a PEFT folder
    becomes a LoRAConfig with its r / lora_alpha / use_rslora. An adapted model must carry the same
    config (every field: alpha, use_rslora, init, depth, init_scale, ...) on the same layers and
    modules_to_save. Raises FileNotFoundError for a missing folder/file, ValueError for a corrupted or
    truncated file, a config or layer mismatch (listing the differing fields), or a shape mismatch
    (naming the first mismatching key); in all these cases the model is unchanged.
    """
    folder = Path(path)
    meta, tensors = _read(folder)
    try:
        config = config_from_dict(meta["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{folder / CONFIG_NAME} holds an invalid config ({e})") from e
    state = adapter_state(model)
    if state is not None:
        check_adapters_in_place(model, "load_adapter")
        diffs = config_differences(state.config, config)
        if set(state.targets) != set(meta["targets"]):
            diffs.append(
                f"adapted layers: {len(state.targets)} in the model vs {len(meta['targets'])} in the file "
                f"(first difference: {sorted(set(state.targets) ^ set(meta['targets']))[0]})"
            )
        if set(state.modules_to_save) != set(meta["modules_to_save"]):
            diffs.append(
                f"modules_to_save: {sorted(state.modules_to_save)} vs {sorted(meta['modules_to_save'])}"
            )
        if diffs:
            raise ValueError(
                f"the model's adapter differs from the file's (model vs file): {'; '.join(diffs)}. "
                "Loading would compute another function than the saved model (alpha, use_rslora, PiSSA's "
                "residual base, depth) or leave a config that does not describe the weights; load into "
                "a fresh base model (the file's config is then used) or tlr.unadapt / tlr.merge first"
            )
    expected = {**_expected_shapes(model, meta, config, tensors), **_expected_buffers(model, meta)}
    if meta.get("format") == "peft":
        from .peft_export import peft_unsupported

        for name in meta["targets"]:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            why = peft_unsupported(
                name,
                model.get_submodule(name),
                in_mha=isinstance(parent, nn.MultiheadAttention) and child == "out_proj",
            )
            if why:
                raise ValueError(
                    f"{folder} is a PEFT adapter on a layer whose PEFT update differs from this library's "
                    f"({why}); loading it would not reproduce peft's outputs. The model was left unchanged"
                )
    for key in sorted(set(expected) | set(tensors)):
        if key not in tensors:
            raise ValueError(
                f"the adapter file lacks {key!r} that the model expects; first mismatching key: {key}"
            )
        if key not in expected:
            raise ValueError(
                f"the adapter file holds {key!r} that the model does not have; first mismatching key: {key}"
            )
        if tuple(tensors[key].shape) != expected[key]:
            raise ValueError(
                f"shape mismatch at key {key!r}: file {tuple(tensors[key].shape)} vs model "
                f"{expected[key]}; the adapter was saved from a model with different layer sizes"
            )
    if state is not None:
        _refuse_meta(adapter_tensors(model).items(), "load_adapter")
    else:
        modules = dict(model.named_modules())
        _refuse_meta(
            [(f"{n}.weight", modules[n].weight) for n in meta["targets"]]
            + [(f"{n}.{k}", v) for n in meta["modules_to_save"] for k, v in modules[n].state_dict().items()],
            "load_adapter",
        )
    if isinstance(meta.get("base_model"), dict):
        diffs = base_differences(meta["base_model"], model)
        if diffs:
            warnings.warn(
                f"load_adapter: {folder} was saved from another model than this "
                f"{type(model).__name__} ({'; '.join(diffs)}; file vs model). The adapted layers' names and "
                "shapes match, so it loads, but it was trained for that other model: load it into the base "
                "model it was made for",
                AdapterBaseMismatchWarning,
                stacklevel=2,
            )
    if state is None:
        config = dataclasses.replace(
            config,
            target_modules=list(meta["targets"]),
            modules_to_save=list(meta["modules_to_save"]) or None,
            exclude_modules=None,
        )
        adapt(model, config)
    if isinstance(config, GeoLoRAConfig):
        for name, layer in adapter_layers(model):
            layer.lora_unit.resize(_file_rank(tensors, name))
    live = {
        **adapter_tensors(model),
        **{
            k: v
            for k, v in norm_buffers(model, meta["modules_to_save"]).items()
            if k in set(meta.get("buffers") or [])
        },
    }
    with torch.no_grad():
        for key, value in tensors.items():
            live[key].copy_(value.to(dtype=live[key].dtype, device=live[key].device))
    compressed = set(meta.get("compressed", []))
    for name, layer in adapter_layers(model):
        layer.compressed = name in compressed
        if layer.compressed:
            layer.init = "compressed"
    return model
