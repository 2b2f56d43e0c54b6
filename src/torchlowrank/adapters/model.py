"""Model-level adapter functions: ``adapt``, ``merge``, ``adapter_param_groups``,
``print_trainable_parameters`` and the bookkeeping they share.

``adapt(model, config)`` replaces the selected layers (in place) by adapter wrappers
(:mod:`.layers`), freezes every other parameter, unfreezes ``modules_to_save`` and records what it
did on ``model.tlr_adapter`` (an :class:`AdapterState`). ``merge`` undoes the wrapping, folding
Delta W into the base weights, so the module types and state-dict keys are the original ones.

``adapt`` validates everything (targets, ranks, PiSSA's finite weights, tied weights) and computes
every init before it modifies the model, so on an error the model is unchanged. A target whose
weight is shared with another module (GPT-2's ``wte`` tied to ``lm_head``) gets a warning (as in
PEFT); ``merge`` then unties it: the merged layer gets its own copy of the weight, the other
holders keep W0, each in a copy of its own (BART / T5 share one embedding between ``shared``,
``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head``), so the merged model computes
what the adapted one did, and a Hugging Face model's ``config.tie_word_embeddings`` is set to False:
the module graph and the config agree, and ``save_pretrained`` / ``from_pretrained`` reproduce it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layer_types import matrix_view, parameter_holders, shared_weight_holders  # re-exported
from ..sharded import is_sharded_module
from ..targets import find_targets, name_matches, replace_module
from .config import ALL_LINEAR, AdapterConfig, DeepLoRAConfig, GeoLoRAConfig, LoRAConfig
from .layers import SUPPORTED, AdapterLayer, supported_layer, unsupported_reason, wrap_layer

__all__ = [
    "AdapterState",
    "adapt",
    "merge",
    "unadapt",
    "adapter_layers",
    "adapter_state",
    "adapter_param_groups",
    "print_trainable_parameters",
    "resolve_targets",
    "resolve_modules_to_save",
    "shared_weight_holders",
    "parameter_holders",
    "norm_buffers",
    "changed_norm_buffers",
    "check_adapters_in_place",
    "resize_token_embeddings",
    "HEAD_NAMES",
    "AdapterNotCalledWarning",
]

HEAD_NAMES = ("classifier", "score", "lm_head", "head", "output_layer")


@dataclass
class AdapterState:
    """What ``adapt`` did: the config, the adapted layer names, the fully trained module names and the
    original ``requires_grad`` of every parameter (restored by ``merge``)."""

    config: AdapterConfig
    targets: list[str]
    modules_to_save: list[str]
    requires_grad: dict[str, bool] = field(default_factory=dict)
    # the normalisation statistics (BatchNorm running_mean / running_var / num_batches_tracked) outside
    # modules_to_save at adapt time, to tell at save time whether training changed them
    norm_buffers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def adapter_state(model: nn.Module) -> AdapterState | None:
    return getattr(model, "tlr_adapter", None)


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """``(name, wrapper)`` for every adapter layer in ``model`` (module order)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def _output_head_names(model: nn.Module, linear_names: list[str]) -> set[str]:
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if out is not None:
            heads |= {n for n, m in model.named_modules() if m is out}
    heads |= {n for n in linear_names if n.rsplit(".", 1)[-1] in HEAD_NAMES}
    if not heads and linear_names:
        heads.add(linear_names[-1])  # a plain nn.Module: its last Linear is taken as the output head
    return heads


def resolve_modules_to_save(model: nn.Module, modules_to_save) -> list[str]:
    """Full names of the modules named (or suffixed) by ``modules_to_save``; ValueError if one matches nothing."""
    if not modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for entry in modules_to_save:
        hits = [n for n in names if name_matches(n, [entry])]
        if not hits:
            raise ValueError(
                f"modules_to_save entry {entry!r} matches no module; top-level modules are: "
                f"{', '.join(n for n in names if '.' not in n)}"
            )
        # keep the outermost matches only (a module inside another saved module is saved with it)
        found.extend(h for h in hits if h not in found)
    outer = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
    return outer


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear or HF Conv1D: what PEFT's ``"all-linear"`` targets."""
    view = matrix_view(module)
    return view is not None and view.kind in ("linear", "hf_conv1d")


def resolve_targets(model: nn.Module, config: AdapterConfig, saved: list[str]) -> list[str]:
    """Names of the layers ``config`` adapts (ValueError listing candidates when nothing matches)."""

    def inside_saved(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in saved)

    if config.target_modules == ALL_LINEAR:
        linear = [n for n, m in model.named_modules() if n and _is_linear(m)]
        if not linear:
            raise ValueError("target_modules='all-linear' found no nn.Linear / Conv1D layer in the model")
        heads = _output_head_names(model, linear)
        chosen = [
            n
            for n in linear
            if n not in heads
            and not inside_saved(n)
            and not (config.exclude_modules is not None and name_matches(n, config.exclude_modules))
        ]
        if not chosen:
            raise ValueError(
                f"target_modules='all-linear' left nothing to adapt (output head(s) {sorted(heads)} "
                "and exclude_modules removed every Linear); name the layers explicitly"
            )
        return chosen
    try:
        found = find_targets(model, config.target_modules, exclude=config.exclude_modules)
    except ValueError:  # nothing matched at all: the message lists the layers that could be adapted
        find_targets(model, config.target_modules, predicate=supported_layer, exclude=config.exclude_modules)
        raise
    found = [(n, m) for n, m in found if not inside_saved(n)]
    skipped = [(n, unsupported_reason(m)) for n, m in found if not supported_layer(m)]
    if skipped:
        # like PEFT: a target that cannot carry an adapter is an error, not silently dropped
        shown = "; ".join(f"{n} ({why})" for n, why in skipped[:12])
        more = f"; ... ({len(skipped) - 12} more)" if len(skipped) > 12 else ""
        inner = [
            n
            for n, m in model.named_modules()
            if supported_layer(m) and any(n.startswith(s + ".") for s, _ in skipped)
        ]
        hint = (
            f" To adapt the layers inside them, name those instead (e.g. {', '.join(inner[:6])})."
            if inner
            else ""
        )
        raise ValueError(
            f"target_modules {config.target_modules!r} matched {len(skipped)} module(s) that cannot "
            f"carry an adapter: {shown}{more}. Adapters support {SUPPORTED}.{hint} Or add them to "
            "exclude_modules."
        )
    chosen = [n for n, _ in found]
    if not chosen:
        raise ValueError(
            f"target_modules {config.target_modules!r} only matched layers inside modules_to_save {saved}"
        )
    return chosen


def _is_meta(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return w is not None and w.is_meta


def adapt(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Add adapters to ``model`` in place, freeze everything else, and return ``model``.

    LoRA layers get the config's init (default / gaussian / pissa); Deep LoRA layers get the narrow
    orthogonal init at scale ``init_scale`` (call :func:`init_compressed` afterwards when
    ``compress=True``). ``modules_to_save`` stay trainable. Raises ValueError for a model that
    already carries adapters (merge it first), targets matching nothing or naming unsupported layer
    types, r too large for a layer, or PiSSA on a layer with NaN/inf weights, on the meta device or
    tied to another module; the error names the layer and the model is left unchanged.
    Warns for a target whose weight is shared with another module (see :func:`merge`), and, on the
    first forward, for such a target that the forward never calls (T5's ``shared``; an
    :class:`AdapterNotCalledWarning` naming the modules that hold the weight and are called).
    On the meta device the factors are created on meta too (shapes only; no values).
    """
    if not isinstance(config, (LoRAConfig, DeepLoRAConfig, GeoLoRAConfig)):
        raise ValueError(
            f"config must be a LoRAConfig, DeepLoRAConfig or GeoLoRAConfig, got {type(config).__name__}"
        )
    if is_sharded_module(model):
        raise ValueError(
            "tlr.adapt must run before fully_shard (FSDP2): the adapter factors it adds would not be "
            "sharded, and the wrapped layers would lose their sharding hooks; adapt the unsharded model, then fully_shard it"
        )
    if adapter_state(model) is not None or adapter_layers(model):
        raise ValueError(
            "this model already carries adapters; call tlr.merge(model) first (stacking adapters "
            "is not supported)"
        )
    saved = resolve_modules_to_save(model, config.modules_to_save)
    targets = resolve_targets(model, config, saved)
    # every name, tied aliases included (lm_head.weight of GPT-2), so merge restores each flag
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    pissa = isinstance(config, LoRAConfig) and config.init == "pissa"
    # Phase 1 (touches nothing in the model): build every wrapper and compute its init, so a bad
    # rank, a NaN weight or a failing SVD raises before anything is modified.
    wrappers, residuals, tied = {}, {}, {}
    index = parameter_holders(model)
    for name in targets:
        module = model.get_submodule(name)
        try:
            if isinstance(config, GeoLoRAConfig):
                from .geolora import wrap_geolora

                wrapper = wrap_geolora(module, config, name)
            else:
                per_layer = isinstance(config, LoRAConfig)  # rank_pattern / alpha_pattern
                wrapper = wrap_layer(
                    module,
                    config.rank_of(name) if per_layer else config.r,
                    config.depth,
                    config.scaling_of(name) if per_layer else config.scaling,
                    config.dropout,
                    name,
                    config.autocast_adapter_dtype,
                )
            holders = shared_weight_holders(model, module, index)
            if holders:
                if pissa:
                    raise ValueError(
                        f"{name}: init='pissa' rewrites the base weight, which is shared with "
                        f"{', '.join(holders)} (tied weights), so it would change those layers too; "
                        "untie them first or use init='default'"
                    )
                tied[name] = holders
            if pissa:
                wrapper.check_pissa(name)
            if isinstance(config, LoRAConfig):
                residuals[name] = wrapper.init_lora_factors(config.init)
            elif isinstance(config, GeoLoRAConfig):
                pass  # the unit is built with its init (U, V orthonormal, S = 0)
            elif not _is_meta(module):
                wrapper.reset_narrow(config.init_scale)
            else:
                wrapper.init = "narrow"
        except ValueError:
            raise
        except Exception as e:  # e.g. an SVD that fails to converge
            raise ValueError(
                f"{name}: building the adapter failed ({type(e).__name__}: {e}); the model was left unchanged"
            ) from e
        if residuals.get(name) is not None and not bool(torch.isfinite(residuals[name]).all()):
            raise ValueError(f"{name}: the PiSSA residual is not finite; the model was left unchanged")
        wrappers[name] = wrapper
    for name, holders in tied.items():
        warnings.warn(
            f"{name} shares its weight with {', '.join(holders)} (tied weights): the adapter changes "
            f"{name} only; tlr.merge will untie them (the merged {name} gets its own weight) so the "
            "merged model computes what the adapted one does",
            stacklevel=2,
        )
    # Phase 2: modify the model (nothing below can fail on valid input)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, wrapper in wrappers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
            wrapper.weight_is_dense = True  # MHA's forward reads out_proj.weight / .bias directly
        if residuals.get(name) is not None:
            wrapper._set_base_matrix(residuals[name])
        replace_module(model, name, wrapper)
        for p in wrapper.lora_factors:
            p.requires_grad_(True)
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.tlr_adapter = AdapterState(
        config=config,
        targets=targets,
        modules_to_save=saved,
        requires_grad=requires_grad,
        norm_buffers={k: v.detach().clone() for k, v in norm_buffers(model, saved).items() if not v.is_meta},
    )
    if tied:
        _watch_uncalled(model, tied)
    return model


# -- a tied alias that the forward never calls -------------------------------------------------------
# T5's ``shared`` (and BART's ``model.shared``) holds the embedding weight that ``encoder.embed_tokens``,
# ``decoder.embed_tokens`` and ``lm_head`` use, but the forward never calls it: an adapter there changes
# nothing and gets no gradient. Only a forward shows which module is called, so ``adapt`` watches the
# first forwards of a model with tied targets: a target whose parent ran but which was not called,
# while a module holding the same weight was, gets a warning naming the modules to adapt instead.
# The watch is keyed by module names (stored on the model), so it survives copy.deepcopy, and it
# removes its hooks once every watched target's parent has run (or on merge / unadapt).
_CALLED = "_tlr_called"
_WATCH = "_tlr_call_watch"


class AdapterNotCalledWarning(UserWarning):
    """An adapted layer is not called by the model's forward (its adapter changes nothing)."""


def _mark_called(module: nn.Module, args) -> None:
    module.__dict__[_CALLED] = True


def _ran(modules: dict[str, nn.Module], name: str) -> bool:
    return name == "" or bool(getattr(modules.get(name), "__dict__", {}).get(_CALLED, False))


def _watch_uncalled(model: nn.Module, tied: dict[str, list[str]]) -> None:
    watch = {
        name: (name.rpartition(".")[0], sorted({h.rpartition(".")[0] for h in holders}))
        for name, holders in tied.items()
    }
    names = sorted(
        ({n for n in watch} | {p for p, _ in watch.values()} | {m for _, ms in watch.values() for m in ms})
        - {""}
    )
    pre = {n: model.get_submodule(n).register_forward_pre_hook(_mark_called).id for n in names}
    post = model.register_forward_hook(_check_called).id
    model.__dict__[_WATCH] = {"watch": watch, "pending": set(watch), "pre": pre, "post": post}


def _stop_watch(model: nn.Module) -> None:
    info = model.__dict__.pop(_WATCH, None)
    if info is None:
        return
    modules = dict(model.named_modules())
    for n, hook_id in info["pre"].items():
        if n in modules:
            modules[n]._forward_pre_hooks.pop(hook_id, None)
    model._forward_hooks.pop(info["post"], None)
    for m in modules.values():
        m.__dict__.pop(_CALLED, None)


def _check_called(model: nn.Module, args, output) -> None:
    info = model.__dict__.get(_WATCH)
    if info is None:
        return
    modules = dict(model.named_modules())
    for name in sorted(info["pending"]):
        parent, holders = info["watch"][name]
        if not _ran(modules, parent):
            continue  # e.g. a decoding step of generate(): the encoder did not run, ask again next time
        info["pending"].discard(name)
        called = [h or type(model).__name__ for h in holders if _ran(modules, h)]
        if not _ran(modules, name) and called:
            warnings.warn(
                f"{name} carries an adapter but the forward of {type(model).__name__} never calls it "
                f"(its weight is used through {', '.join(called)}, which share it), so the adapter "
                "changes nothing and gets no gradient (backward() fails with 'element 0 of tensors does "
                f"not require grad' when it is the only adapter). Adapt the modules that are called "
                f"instead: tlr.unadapt(model), then target_modules={called}",
                AdapterNotCalledWarning,
                stacklevel=4,
            )
    for m in modules.values():
        m.__dict__.pop(_CALLED, None)
    if not info["pending"]:
        _stop_watch(model)


NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def norm_buffers(model: nn.Module, saved: list[str] = ()) -> dict[str, torch.Tensor]:
    """The running statistics of the normalisation layers (BatchNorm / InstanceNorm with
    ``track_running_stats``: ``running_mean``, ``running_var``, ``num_batches_tracked``) outside the
    modules ``saved``, by state-dict key. A forward in train mode updates them; an adapter file holds
    them only with ``save_adapter(..., save_buffers=True)`` or when their layers are in modules_to_save."""
    out = {}
    for mod_name, mod in model.named_modules():
        if any(mod_name == s or mod_name.startswith(s + ".") for s in saved):
            continue
        for b_name, b in mod.named_buffers(recurse=False):
            if b_name in NORM_BUFFERS and b is not None:
                out[f"{mod_name}.{b_name}" if mod_name else b_name] = b
    return out


def changed_norm_buffers(model: nn.Module) -> list[str]:
    """Keys of the normalisation statistics (see :func:`norm_buffers`) that changed since ``tlr.adapt``."""
    state = adapter_state(model)
    if state is None:
        return []
    now = norm_buffers(model, state.modules_to_save)
    return [
        k
        for k, v in state.norm_buffers.items()
        if k in now and not torch.equal(now[k].detach().cpu(), v.cpu())
    ]


def norm_layers_of(keys: list[str]) -> list[str]:
    """The module names of normalisation-statistics keys, in order, each once."""
    return list(dict.fromkeys(k.rpartition(".")[0] for k in keys))


def _require_state(model: nn.Module, what: str) -> AdapterState:
    state = adapter_state(model)
    if state is None:
        raise ValueError(
            f"{what} needs a model adapted with tlr.adapt(model, config); this one has no adapters"
        )
    return state


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the original layers back (in place).

    Afterwards the model has its original module types and state-dict keys, computes the same
    function as the adapted model, and its parameters have their pre-``adapt`` ``requires_grad``.
    A merged layer whose weight was tied to other modules gets its own weight, and every other holder
    of that weight gets a copy of its own too, with ``config.tie_word_embeddings = False``, so that a
    Hugging Face ``save_pretrained`` / ``from_pretrained`` reproduces the merged model (a warning
    lists what was untied).
    """
    state = _require_state(model, "merge")
    check_adapters_in_place(model, "merge")
    if is_sharded_module(model):
        # fully_shard's hooks belong to the adapter modules merge would remove: the merged layers'
        # weights would stay sharded outside any hook
        raise ValueError(
            "merge cannot restructure a model sharded by fully_shard (FSDP2). Gather its full state on "
            "every rank, sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) "
            "(torch.distributed.checkpoint.state_dict), load it into an unsharded copy adapted the same "
            "way (copy.load_state_dict(sd)), tlr.merge(copy), and fully_shard the merged copy to train on"
        )
    _stop_watch(model)
    untied, groups = [], {}
    index = parameter_holders(model)
    for name, layer in adapter_layers(model):
        holders = shared_weight_holders(model, layer.base_layer, index)
        if holders:
            # Give the merged layer its own weight: the other holders keep W0, as in the adapted model.
            w = layer.base_layer.weight
            groups[id(w)] = w
            layer.base_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            untied.append((name, holders))
        replace_module(model, name, layer.merged_base())
    _restore_requires_grad(model, state)
    if untied:
        split = _untie_holders(model, groups)
        cfg = getattr(model, "config", None)
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False  # else save_pretrained / from_pretrained would re-tie them
        warnings.warn(
            "merge untied "
            + "; ".join(f"{n} from {', '.join(h)}" for n, h in untied)
            + (f" (and {', '.join(split)} from each other)" if split else "")
            + ": each holder of the tied weight has its own copy now (the model has more parameters), so "
            "the merged model computes what the adapted one did and a save / reload keeps every copy"
            + (" (config.tie_word_embeddings set to False)" if cfg is not None else ""),
            stacklevel=2,
        )
    del model.tlr_adapter
    return model


def _untie_holders(model: nn.Module, groups: dict[int, nn.Parameter]) -> list[str]:
    """Give every module still holding one of the tensors in ``groups`` (id -> tensor) its own copy
    (the first holder keeps the tensor). Returns the names of the parameters that got a copy.

    After a merge untied an adapted layer from the other holders of its weight, those holders must
    not stay tied among themselves either: a Hugging Face ``save_pretrained`` writes one of a group of
    tied tensors, and ``from_pretrained`` re-ties the missing ones to whatever its (changed) config or
    its tied-weights map says, e.g. BART's ``lm_head`` to nothing (re-initialised) or T5's
    ``encoder.embed_tokens`` to the merged ``shared``. With a copy each, every tensor is saved."""
    kept: set[int] = set()
    done: set[tuple[int, str]] = set()
    split = []
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in groups or (id(mod), p_name) in done:
                continue
            done.add((id(mod), p_name))
            if id(p) not in kept:
                kept.add(id(p))
                continue
            setattr(mod, p_name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            split.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return split


def _restore_requires_grad(model: nn.Module, state: AdapterState) -> None:
    for n, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(state.requires_grad.get(n, p.requires_grad))


def check_adapters_in_place(model: nn.Module, what: str) -> None:
    """ValueError if a layer ``adapt`` wrapped is no longer an adapter (e.g. replaced by
    ``resize_token_embeddings``), so its adapter would be lost silently."""
    state = _require_state(model, what)
    live = {n for n, _ in adapter_layers(model)}
    lost = [n for n in state.targets if n not in live]
    if lost:
        raise ValueError(
            f"{what}: the adapted layer(s) {', '.join(lost)} were replaced after tlr.adapt (e.g. by "
            "resize_token_embeddings), so their adapters are gone; resize / replace layers before "
            "tlr.adapt, or adapt again"
        )


def unadapt(model: nn.Module) -> nn.Module:
    """Remove the adapters without folding them in (PiSSA: the residual weight stays)."""
    state = _require_state(model, "unadapt")
    check_adapters_in_place(model, "unadapt")
    _stop_watch(model)
    for name, layer in adapter_layers(model):
        replace_module(model, name, layer.base_layer)
    _restore_requires_grad(model, state)
    del model.tlr_adapter
    return model


def _grow(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` cut or zero-padded to ``size`` along ``dim`` (new tokens start with Delta W = 0)."""
    if t.shape[dim] >= size:
        return t.narrow(dim, 0, size).clone()
    pad = list(t.shape)
    pad[dim] = size - t.shape[dim]
    return torch.cat([t, torch.zeros(pad, dtype=t.dtype, device=t.device)], dim=dim)


def resize_token_embeddings(model: nn.Module, new_num_tokens: int | None = None, **kwargs) -> nn.Module:
    """Hugging Face's ``model.resize_token_embeddings`` for a model whose input (or output)
    embeddings carry an adapter; returns the input embedding layer (the adapter).

    HF's own method refuses adapter wrappers (it checks ``isinstance(..., nn.Embedding)``), as it does
    for PEFT's. Here the base layers are resized by HF (new rows initialised by HF, ties restored) and
    the adapter factors along the vocabulary are cut or zero-padded, so the old tokens keep their
    function and new tokens start with Delta W = 0. Build the optimizer after this call (the resized
    factors are new Parameters). ValueError for PiSSA adapters on the embeddings.
    """
    _require_state(model, "resize_token_embeddings")
    check_adapters_in_place(model, "resize_token_embeddings")
    if not callable(getattr(model, "resize_token_embeddings", None)):
        raise ValueError("resize_token_embeddings needs a Hugging Face PreTrainedModel")
    slots = [
        ("input", model.get_input_embeddings, model.set_input_embeddings),
        ("output", model.get_output_embeddings, model.set_output_embeddings),
    ]
    wrapped = []
    for which, get, put in slots:
        try:
            mod = get()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(mod, AdapterLayer):
            if mod.init == "pissa":
                raise ValueError(
                    f"the {which} embeddings carry a PiSSA adapter, whose residual base cannot be "
                    "resized; resize before tlr.adapt"
                )
            wrapped.append((which, mod, get, put))
    for _, mod, _, put in wrapped:
        put(mod.base_layer)
    try:
        model.resize_token_embeddings(new_num_tokens, **kwargs)
    except Exception:
        for _, mod, _, put in wrapped:  # put the adapters (on the old bases) back
            put(mod)
        raise
    for _which, mod, get, put in wrapped:
        new_base = get()
        mod.base_layer = new_base
        m, n = mod.matrix_shape()
        with torch.no_grad():
            first, last = mod.lora_factors[0], mod.lora_factors[-1]
            if first.shape[1] != n:  # vocabulary along the input side (embedding tables)
                mod.lora_factors[0] = nn.Parameter(
                    _grow(first.detach(), 1, n), requires_grad=first.requires_grad
                )
            if last.shape[0] != m:  # vocabulary along the output side (lm_head)
                mod.lora_factors[-1] = nn.Parameter(
                    _grow(last.detach(), 0, m), requires_grad=last.requires_grad
                )
        put(mod)
    return model.get_input_embeddings()


def adapter_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer param groups for an adapted model, carrying Deep LoRA's discrepant learning rate.

    Groups (empty ones dropped): ``"adapter"`` (LoRA factors; Deep LoRA inner factors, and all
    factors of narrow Deep LoRA) at ``lr``; ``"adapter_outer"`` (first and last factors of
    compressed Deep LoRA layers) at ``gamma * lr``; ``"modules_to_save"`` at ``lr``. Every group
    has ``weight_decay``. Use: ``torch.optim.AdamW(tlr.adapter_param_groups(model, 1e-3))``.
    """
    state = _require_state(model, "adapter_param_groups")
    check_adapters_in_place(model, "adapter_param_groups")
    cfg = state.config
    main, outer = [], []
    pending = False
    for _, layer in adapter_layers(model):
        factors = list(layer.lora_factors)
        if isinstance(cfg, DeepLoRAConfig) and cfg.compress:
            if not layer.compressed:
                pending = True
                main.extend(factors)
            else:
                outer.extend([factors[0], factors[-1]])
                main.extend(factors[1:-1])
        else:
            main.extend(factors)
    if pending:
        warnings.warn(
            "compress=True but some layers still hold the narrow init: call tlr.init_compressed(model, "
            "batch) before building the optimizer; those layers train all factors at lr",
            stacklevel=2,
        )
    saved = [p for name in state.modules_to_save for p in model.get_submodule(name).parameters()]
    groups = [
        {"name": "adapter", "params": main, "lr": lr, "weight_decay": weight_decay},
        {
            "name": "adapter_outer",
            "params": outer,
            "lr": lr * getattr(cfg, "gamma", 1.0),
            "weight_decay": weight_decay,
        },
        {"name": "modules_to_save", "params": saved, "lr": lr, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def print_trainable_parameters(model: nn.Module, print_fn=print) -> str:
    """Print (and return) ``trainable params: T || all params: N || trainable%: P`` like PEFT."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100.0 * trainable / max(total, 1):.4f}"
    if print_fn is not None:
        print_fn(line)
    return line
