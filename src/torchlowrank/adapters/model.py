"""Model-level adapter functions: ``adapt``, ``merge``, ``adapter_param_groups``,
``print_trainable_parameters`` and the bookkeeping they share.

``adapt(model, config)`` replaces the selected layers (in place) by adapter wrappers
(:mod:`.layers`), freezes every other parameter, unfreezes ``modules_to_save`` and records what it
did on ``model.tlr_adapter`` (an :class:`AdapterState`). ``merge`` undoes the wrapping, folding
Delta W into the base weights, so the module types and state-dict keys are the original ones.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..targets import find_targets, name_matches
from .config import ALL_LINEAR, AdapterConfig, DeepLoRAConfig, LoRAConfig
from .layers import AdapterLayer, is_hf_conv1d, supported_layer, wrap_layer

__all__ = ["AdapterState", "adapt", "merge", "adapter_layers", "adapter_state", "adapter_param_groups",
           "print_trainable_parameters", "resolve_targets", "resolve_modules_to_save", "HEAD_NAMES"]

HEAD_NAMES = ("classifier", "score", "lm_head", "head", "output_layer")


@dataclass
class AdapterState:
    """What ``adapt`` did: the config, the adapted layer names, the fully trained module names and the
    original ``requires_grad`` of every parameter (restored by ``merge``)."""

    config: AdapterConfig
    targets: list[str]
    modules_to_save: list[str]
    requires_grad: dict[str, bool] = field(default_factory=dict)


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
            raise ValueError(f"modules_to_save entry {entry!r} matches no module; top-level modules are: "
                             f"{', '.join(n for n in names if '.' not in n)}")
        # keep the outermost matches only (a module inside another saved module is saved with it)
        found.extend(h for h in hits if h not in found)
    outer = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
    return outer


def resolve_targets(model: nn.Module, config: AdapterConfig, saved: list[str]) -> list[str]:
    """Names of the layers ``config`` adapts (ValueError listing candidates when nothing matches)."""
    def inside_saved(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in saved)

    if config.target_modules == ALL_LINEAR:
        linear = [n for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or is_hf_conv1d(m))]
        if not linear:
            raise ValueError("target_modules='all-linear' found no nn.Linear / Conv1D layer in the model")
        heads = _output_head_names(model, linear)
        chosen = [n for n in linear if n not in heads and not inside_saved(n)
                  and not (config.exclude_modules is not None and name_matches(n, config.exclude_modules))]
        if not chosen:
            raise ValueError(f"target_modules='all-linear' left nothing to adapt (output head(s) {sorted(heads)} "
                             "and exclude_modules removed every Linear); name the layers explicitly")
        return chosen
    found = find_targets(model, config.target_modules, predicate=supported_layer, exclude=config.exclude_modules)
    chosen = [n for n, _ in found if not inside_saved(n)]
    if not chosen:
        raise ValueError(f"target_modules {config.target_modules!r} only matched layers inside modules_to_save {saved}")
    return chosen


def adapt(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Add adapters to ``model`` in place, freeze everything else, and return ``model``.

    LoRA layers get the config's init (default / gaussian / pissa); Deep LoRA layers get the narrow
    orthogonal init at scale ``init_scale`` (call :func:`init_compressed` afterwards when
    ``compress=True``). ``modules_to_save`` stay trainable. Raises ValueError for a model that
    already carries adapters (merge it first), targets matching nothing, or r too large for a layer.
    """
    if not isinstance(config, (LoRAConfig, DeepLoRAConfig)):
        raise ValueError(f"config must be a LoRAConfig or DeepLoRAConfig, got {type(config).__name__}")
    if adapter_state(model) is not None or adapter_layers(model):
        raise ValueError("this model already carries adapters; call tlr.merge(model) first (stacking adapters "
                         "is not supported)")
    saved = resolve_modules_to_save(model, config.modules_to_save)
    targets = resolve_targets(model, config, saved)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    # build every wrapper first, so a bad rank leaves the model untouched
    wrappers = {}
    for name in targets:
        module = model.get_submodule(name)
        wrappers[name] = wrap_layer(module, config.r, config.depth, config.scaling, config.dropout, name)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, wrapper in wrappers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper)
        if isinstance(config, LoRAConfig):
            wrapper.reset_lora(config.init)
        else:
            wrapper.reset_narrow(config.init_scale)
        for p in wrapper.lora_factors:
            p.requires_grad_(True)
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.tlr_adapter = AdapterState(config=config, targets=targets, modules_to_save=saved,
                                     requires_grad=requires_grad)
    return model


def _require_state(model: nn.Module, what: str) -> AdapterState:
    state = adapter_state(model)
    if state is None:
        raise ValueError(f"{what} needs a model adapted with tlr.adapt(model, config); this one has no adapters")
    return state


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the original layers back (in place).

    Afterwards the model has its original module types and state-dict keys, computes the same
    function as the adapted model, and its parameters have their pre-``adapt`` ``requires_grad``.
    """
    state = _require_state(model, "merge")
    for name, layer in adapter_layers(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.merged_base())
    for n, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(n, p.requires_grad))
    del model.tlr_adapter
    return model


def unadapt(model: nn.Module) -> nn.Module:
    """Remove the adapters without folding them in (PiSSA: the residual weight stays)."""
    state = _require_state(model, "unadapt")
    for name, layer in adapter_layers(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    for n, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(n, p.requires_grad))
    del model.tlr_adapter
    return model


def adapter_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer param groups for an adapted model, carrying Deep LoRA's discrepant learning rate.

    Groups (empty ones dropped): ``"adapter"`` (LoRA factors; Deep LoRA inner factors, and all
    factors of narrow Deep LoRA) at ``lr``; ``"adapter_outer"`` (first and last factors of
    compressed Deep LoRA layers) at ``gamma * lr``; ``"modules_to_save"`` at ``lr``. Every group
    has ``weight_decay``. Use: ``torch.optim.AdamW(tlr.adapter_param_groups(model, 1e-3))``.
    """
    state = _require_state(model, "adapter_param_groups")
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
        warnings.warn("compress=True but some layers still hold the narrow init: call tlr.init_compressed(model, "
                      "batch) before building the optimizer; those layers train all factors at lr", stacklevel=2)
    saved = [p for name in state.modules_to_save for p in model.get_submodule(name).parameters()]
    groups = [
        {"name": "adapter", "params": main, "lr": lr, "weight_decay": weight_decay},
        {"name": "adapter_outer", "params": outer, "lr": lr * getattr(cfg, "gamma", 1.0), "weight_decay": weight_decay},
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
