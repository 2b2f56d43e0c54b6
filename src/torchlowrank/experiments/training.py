"""A small, readable supervised training loop shared by the experiments and the demo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import progress_bar


@dataclass
class Split:
    """Training / validation (held out of the training set, never the test set) / test tensors;
    x: (N, ...) inputs, y: (N,) labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``x`` (N, ...) classified as ``y`` (N,), in eval mode (mode restored after)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(x))


def fit_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    after_backward: Callable[[int], None] | None = None,
    progress: bool | None = None,
    desc: str = "train",
) -> dict[str, list[float]]:
    """Minibatch cross-entropy training with AdamW (unless ``optimizer`` is given).

    x: (N, ...) inputs, y: (N,) int64 labels. ``after_backward(step)`` runs after each backward,
    before the optimizer step (e.g. a SpectrumTracker or a regularizer). Returns
    ``{"step": [...], "loss": [...]}`` with one entry per step.
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must be non-empty with equal length, got {len(x)} and {len(y)}")
    g = torch.Generator().manual_seed(seed)
    opt = optimizer or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    history: dict[str, list[float]] = {"step": [], "loss": []}
    model.train()
    step = 0
    bar = progress_bar(total=epochs * steps_per_epoch, desc=desc, enabled=progress)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(step)
            opt.step()
            history["step"].append(step)
            history["loss"].append(loss.item())
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
    bar.close()
    return history


def encode_texts(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (len(texts), max_len), padded / truncated to ``max_len``."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


@torch.no_grad()
def text_accuracy(model: nn.Module, enc: dict, y: torch.Tensor, batch: int = 64) -> float:
    """Accuracy of a Hugging Face sequence classifier on encoded texts (``encode_texts``), in eval mode."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        logits = model(**{k: v[i : i + batch] for k, v in enc.items()}).logits
        correct += int((logits.argmax(-1) == y[i : i + batch]).sum())
    model.train(was)
    return correct / len(y)
