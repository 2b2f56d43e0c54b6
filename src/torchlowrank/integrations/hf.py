"""Hugging Face ``Trainer`` integration: callbacks for the spectrum tracker, a regularizer (Q3R) and
end-of-training truncation, plus gradient checkpointing for adapted models.

    from torchlowrank.integrations.hf import RegularizerCallback, SpectrumTrackerCallback, TruncateCallback
    opt = torch.optim.AdamW(tlr.adapter_param_groups(model, lr=1e-3))   # our param groups / optimizers
    trainer = Trainer(model, args, train_dataset=ds, optimizers=(opt, None),
                      callbacks=[SpectrumTrackerCallback(every=10), RegularizerCallback(reg),
                                 TruncateCallback(param_fraction=0.5)])

Where each callback acts in the Trainer's optimizer step (transformers >= 4.41), which runs
``backward`` (every micro-batch) -> gradient clipping (``max_grad_norm``) -> ``on_pre_optimizer_step``
-> ``optimizer.step()`` -> ``on_optimizer_step`` -> scheduler step -> ``model.zero_grad()`` ->
``on_step_end``. By ``on_step_end`` the gradients are gone, so:

- :class:`RegularizerCallback` calls ``reg.step()`` at ``on_pre_optimizer_step``: after the last
  backward of the step (and after DDP's all-reduce and gradient accumulation), before the optimizer.
  The Trainer clips gradients *before* this hook and offers none in between, so with
  ``max_grad_norm > 0`` the regularizer's gradient is added after clipping (a manual loop
  ``backward(); reg.step(); clip; opt.step()`` clips it too). Set ``max_grad_norm=0`` for exactly
  the manual loop without clipping.
- :class:`SpectrumTrackerCallback` calls ``tracker.step()`` at ``on_optimizer_step``: the weights are
  the updated ones and ``.grad`` still holds the gradient of the step just taken (the same moment as
  ``SpectrumTracker.attach(optimizer)``).
- :class:`TruncateCallback` calls :func:`torchlowrank.truncate` at ``on_train_end``.

DDP (``torchrun``): every callback runs on every rank. The gradients seen by the regularizer and the
tracker are DDP's averaged ones, so the regularizer's update is identical on every rank; the tracker
records and writes on rank 0 only; truncation broadcasts rank 0's factors, and only rank 0 writes
the report.

This module imports ``transformers``; install it with ``pip install 'torchlowrank[hf]'``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "torchlowrank.integrations.hf needs transformers (and accelerate for the Trainer): "
        "pip install 'torchlowrank[hf]'"
    ) from e

from .. import distributed
from ..compress import (
    CompressionReport,
    check_fraction,
    rank_for_fraction,
    select_layers,
    truncate,
    weight_shape,
)
from ..diagnostics import SpectrumTracker
from ..files import atomic_write_text
from ..targets import Targets

__all__ = [
    "SpectrumTrackerCallback",
    "RegularizerCallback",
    "TruncateCallback",
    "enable_gradient_checkpointing",
    "Regularizer",
]


class Regularizer(Protocol):
    """What :class:`RegularizerCallback` needs: ``step()`` adds the regularizer's gradient to the
    weights' ``.grad`` (called after ``backward()``); ``value()`` (optional) returns its value."""

    def step(self) -> Any: ...


def _output_path(args, path: str | os.PathLike | None) -> Path | None:
    """``path`` as given if absolute, else inside the Trainer's ``output_dir``; None stays None."""
    if path is None:
        return None
    path = Path(path)
    return path if path.is_absolute() else Path(args.output_dir) / path


def _model(kwargs: dict, what: str) -> nn.Module:
    model = kwargs.get("model")
    if model is None:
        raise ValueError(
            f"{what}: the Trainer passed no model to the callback; add it to a transformers.Trainer "
            "(callbacks=[...]) rather than calling it by hand"
        )
    return model


class SpectrumTrackerCallback(TrainerCallback):
    """Run a :class:`~torchlowrank.SpectrumTracker` inside ``Trainer.train()``.

    ``SpectrumTrackerCallback(tracker)`` uses a tracker you built (it recorded step 0 then), or
    ``SpectrumTrackerCallback(every=10, track=("weight", "grad"), ...)`` builds one on the Trainer's
    model at ``on_train_begin`` with these keyword arguments. ``tracker.step()`` runs at
    ``on_optimizer_step`` (updated weights, gradients still in ``.grad``). At ``on_train_end`` the
    history is written to ``save_to`` (relative paths go under ``args.output_dir``; None: not written;
    rank 0 only under DDP). The tracker is ``callback.tracker``.
    """

    def __init__(
        self,
        tracker: SpectrumTracker | None = None,
        save_to: str | os.PathLike | None = "spectrum_history.json",
        **tracker_kwargs: Any,
    ) -> None:
        if tracker is not None and tracker_kwargs:
            raise ValueError(
                "give a SpectrumTracker or the keyword arguments to build one, not both "
                f"(got tracker and {sorted(tracker_kwargs)})"
            )
        if tracker is not None and not isinstance(tracker, SpectrumTracker):
            raise ValueError(f"tracker must be a torchlowrank.SpectrumTracker, got {type(tracker).__name__}")
        self.tracker = tracker
        self.save_to = save_to
        self.tracker_kwargs = tracker_kwargs
        self.saved_to: Path | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.tracker is None:
            self.tracker = SpectrumTracker(_model(kwargs, "SpectrumTrackerCallback"), **self.tracker_kwargs)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.tracker.step()

    def on_train_end(self, args, state, control, **kwargs):
        path = _output_path(args, self.save_to)
        if path is not None and self.tracker is not None:
            self.tracker.save(path)
            self.saved_to = path


class RegularizerCallback(TrainerCallback):
    """Call ``reg.step()`` once per optimizer step, after the backward passes and before
    ``optimizer.step()`` (``on_pre_optimizer_step``; after the Trainer's gradient clipping, see the
    module docstring). ``reg`` is e.g. ``tlr.Q3R``: its ``step()`` adds the regularizer's gradient to
    each weight's ``.grad``. With gradient accumulation it runs once per optimizer step, on the
    accumulated (mean) gradient. If ``reg`` has ``value()``, it is added to the Trainer's logs as
    ``log_key`` at every logging step (and to ``state.log_history``).
    """

    def __init__(self, reg: Regularizer, log_key: str = "regularizer") -> None:
        if not callable(getattr(reg, "step", None)):
            raise ValueError(
                f"reg must have a step() method that adds its gradient to the weights' .grad "
                f"(e.g. tlr.Q3R), got {type(reg).__name__}"
            )
        self.reg = reg
        self.log_key = log_key
        self.steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if getattr(args, "fp16", False) and not args.max_grad_norm:
            # only the clipping path unscales the gradients before on_pre_optimizer_step
            warnings.warn(
                "RegularizerCallback with fp16=True and max_grad_norm=0: the gradients are still "
                "multiplied by the loss scale when reg.step() adds its gradient, so the regularizer's "
                "weight is divided by the scale; use bf16, or max_grad_norm > 0 (which unscales first)",
                stacklevel=2,
            )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.reg.step()
        self.steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        value = getattr(self.reg, "value", None)
        if logs is not None and callable(value) and self.log_key:
            with torch.no_grad():
                v = value()
            logs[self.log_key] = float(v)  # seen by the reporting callbacks after this one
            # the Trainer appended its copy of ``logs`` to log_history just before on_log
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1][self.log_key] = float(v)


class TruncateCallback(TrainerCallback):
    """SVD-truncate the model at the end of training: :func:`torchlowrank.truncate` with
    ``param_fraction``, ``targets`` and ``allocation`` at ``on_train_end``.

    The arguments are checked against the model at ``on_train_begin`` (uniform allocation: every
    targeted layer keeps rank >= 1), so a bad fraction fails before training, not after it. The
    :class:`~torchlowrank.CompressionReport` is ``callback.report``, appended to
    ``state.log_history`` as ``{"truncation": {...}}``, and written (rank 0) to ``save_to`` (json) and
    the same name with ``.md`` (relative paths under ``args.output_dir``; None: not written). Under
    DDP every rank truncates and rank 0's factors are broadcast, so all ranks hold the same model.

    The truncated model has ``LowRankLinear`` / ``LowRankConv2d`` layers: save it with
    ``torch.save(model.state_dict())`` / safetensors, not ``save_pretrained`` + ``from_pretrained``
    of the original architecture. An adapted model must be merged first (``tlr.merge``).
    """

    def __init__(
        self,
        param_fraction: float,
        targets: Targets = None,
        allocation: str = "uniform",
        save_to: str | os.PathLike | None = "truncation.json",
    ) -> None:
        check_fraction(param_fraction, "param_fraction")
        if allocation not in ("uniform", "energy"):
            raise ValueError(f"allocation must be 'uniform' or 'energy', got {allocation!r}")
        self.param_fraction = param_fraction
        self.targets = targets
        self.allocation = allocation
        self.save_to = save_to
        self.report: CompressionReport | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        model = _model(kwargs, "TruncateCallback")
        found = select_layers(model, self.targets, "TruncateCallback")
        if self.allocation == "uniform":
            for name, module in found:
                if rank_for_fraction(weight_shape(module), self.param_fraction) < 1:
                    raise ValueError(
                        f"TruncateCallback: param_fraction={self.param_fraction} leaves rank 0 for layer "
                        f"{name!r} of shape {weight_shape(module)}; raise the fraction or use "
                        "allocation='energy'"
                    )

    def on_train_end(self, args, state, control, **kwargs):
        model = _model(kwargs, "TruncateCallback")
        self.report = truncate(model, self.param_fraction, self.targets, self.allocation)
        distributed.broadcast_tensors_(
            p.data for layer in self.report.layers for p in model.get_submodule(layer.name).parameters()
        )
        summary = {
            "param_fraction": self.param_fraction,
            "allocation": self.allocation,
            "ranks": self.report.ranks,
            "targeted_params_before": self.report.targeted_params_before,
            "targeted_params_after": self.report.targeted_params_after,
            "model_params_before": self.report.model_params_before,
            "model_params_after": self.report.model_params_after,
        }
        state.log_history.append({"truncation": summary, "step": state.global_step})
        path = _output_path(args, self.save_to)
        if path is not None:
            distributed.main_process_only(_write_report)(path, summary, self.report)


def _write_report(path: Path, summary: dict, report: CompressionReport) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(path.with_suffix(".md"), str(report) + "\n")


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> nn.Module:
    """Turn on a Hugging Face model's gradient (activation) checkpointing so that adapters still get
    gradients; returns ``model``.

    With a frozen base, the hidden states entering a checkpointed block may not require grad (for
    ``pixel_values`` models, or transformers versions that do not do it for you), and reentrant
    checkpointing then silently drops the adapters' gradients inside the block. This calls
    ``activation_checkpointing_enable`` (or ``gradient_checkpointing_enable`` on transformers < 5)
    with ``use_reentrant`` and, for models with input embeddings, ``enable_input_require_grads()``
    (what PEFT does) unless already enabled. Non-reentrant checkpointing (the default here) does not
    need it. Gradients are the same as without checkpointing (tested).
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        raise ValueError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(): it is not a Hugging Face "
            "PreTrainedModel; wrap your blocks in torch.utils.checkpoint.checkpoint yourself"
        )
    if not hasattr(model, "_require_grads_hook") and hasattr(model, "enable_input_require_grads"):
        try:
            model.enable_input_require_grads()
        except NotImplementedError:  # no input embeddings (e.g. ViT); non-reentrant checkpointing needs none
            if use_reentrant:
                _block_inputs_require_grad(model)
    elif use_reentrant and not hasattr(model, "enable_input_require_grads"):
        _block_inputs_require_grad(model)
    return model


def _block_inputs_require_grad(model: nn.Module) -> None:
    """For reentrant checkpointing without input embeddings: make every checkpointed block's input
    require grad (a forward pre-hook), so gradients reach the adapters inside it."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52
        raise ValueError(
            "reentrant checkpointing of a model without input embeddings needs transformers >= 4.52; "
            "use enable_gradient_checkpointing(model, use_reentrant=False)"
        ) from None

    def hook(module, args, kwargs):
        args = tuple(
            a.requires_grad_(True)
            if isinstance(a, torch.Tensor) and a.is_floating_point() and not a.requires_grad
            else a
            for a in args
        )
        return args, kwargs

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.register_forward_pre_hook(hook, with_kwargs=True)
