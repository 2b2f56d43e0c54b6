"""Compressed Deep LoRA initialisation from one batch's end-to-end gradient (DESIGN §4.3).

For each adapted layer with weight matrix W0 (m, n): G = dLoss/dDeltaW at Delta W = 0 (which is
dLoss/dW at W = W0), SVD G = U_G S V_G^T, half = r / 2, Q (m, n) random semi-orthogonal,
right = orth([V_G[:, :half], Q^T U_G[:, :half]]) (n, r), left = Q right (m, r); factors
W_1 = eps right^T, inner eps I_r, W_L = eps left, so Delta W(0) = eps^L left right^T.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..linalg import truncated_svd
from .config import DeepLoRAConfig
from .model import adapter_layers, adapter_state, parameter_holders, shared_weight_holders

__all__ = [
    "init_compressed",
    "compressed_factors",
    "end_to_end_gradients",
    "default_loss",
    "random_semi_orthogonal",
]


def random_semi_orthogonal(
    m: int, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """A Haar-random (m, n) matrix with orthonormal columns (m >= n) or rows (m < n): QR of a
    Gaussian matrix with the sign fix of Mezzadri (2007), computed in ``dtype``."""
    big, small = max(m, n), min(m, n)
    g = torch.randn(big, small, generator=generator, dtype=dtype, device=device)
    Q, R = torch.linalg.qr(g)
    d = torch.diagonal(R)
    Q = Q * torch.where(d < 0, -1.0, 1.0).to(dtype)
    return Q if m >= n else Q.T


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` for a dict batch with labels (Hugging Face models)."""
    if not isinstance(batch, Mapping):
        raise ValueError(
            "without loss_fn the batch must be a dict of model inputs including labels "
            "(Hugging Face style); pass loss_fn(model, batch) -> scalar loss otherwise"
        )
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("model(**batch) returned no loss; include labels in the batch or pass loss_fn")
    return loss


def end_to_end_gradients(
    model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """G = dLoss/dDeltaW at Delta W = 0 for every adapter layer, as (m, n) matrices in float32/64.

    The adapters are bypassed for this pass, so the gradient is the base model's dLoss/dW0; no
    parameter's ``.grad`` is touched and every buffer keeps its value (a forward in train mode would
    update BatchNorm's running statistics). For a weight tied to another module (GPT-2's ``wte`` / ``lm_head``)
    G is the gradient through the adapted layer's own use of it. The loss is computed with gradients enabled (also inside a
    caller's ``torch.no_grad()``); a loss without an autograd graph raises ValueError.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model carries no adapters; call tlr.adapt(model, config) first")
    # A weight shared with another module (GPT-2's wte / lm_head) gets a private copy for this pass,
    # so G is the gradient through this layer's use of it only (the adapter changes only this layer).
    index = parameter_holders(model)
    tied = {
        name: layer.base_layer.weight
        for name, layer in layers
        if shared_weight_holders(model, layer.base_layer, index)
    }
    for name, layer in layers:
        if name in tied:
            layer.base_layer.weight = nn.Parameter(tied[name].detach().clone(), requires_grad=False)
    weights = [layer.base_layer.weight for _, layer in layers]
    flags = [w.requires_grad for w in weights]
    # a forward in train mode updates BatchNorm's running statistics: keep every buffer as it was
    buffers = [(b, b.detach().clone()) for b in _distinct_buffers(model)]
    try:
        for (_, layer), w in zip(layers, weights):
            layer.disabled = True
            w.requires_grad_(True)
        with torch.enable_grad():
            loss = (loss_fn or default_loss)(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        if loss.grad_fn is None:
            raise ValueError(
                "the loss has no autograd graph (it was computed under torch.inference_mode, detached, "
                "or does not depend on the model); compute it from the model's output with gradients "
                "enabled inside loss_fn(model, batch)"
            )
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        for (name, layer), w, f in zip(layers, weights, flags):
            layer.disabled = False
            w.requires_grad_(f)
            if name in tied:
                layer.base_layer.weight = tied[name]
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    out = {}
    for (name, layer), w, g in zip(layers, weights, grads):
        g = layer.from_layout(torch.zeros_like(w) if g is None else g).detach()
        out[name] = g if g.dtype == torch.float64 else g.float()
    return out


def _distinct_buffers(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for b in model.buffers():
        if id(b) not in seen and not b.is_meta:
            seen.add(id(b))
            out.append(b)
    return out


def compressed_factors(
    G: torch.Tensor, r: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(left (m, r), right (n, r), Q (m, n)) of the compressed construction for the gradient G (m, n).

    Q is drawn with ``random_semi_orthogonal(m, n, generator)`` (orthonormal columns if m >= n,
    rows otherwise); right = orth([V_G[:, :r/2], Q^T U_G[:, :r/2]]) by QR, left = Q right. The top
    r/2 singular vectors of G come from ``truncated_svd(G, r/2)`` (exact SVD for small layers,
    randomized with power iterations for large ones).
    """
    m, n = G.shape
    if r % 2 or not 2 <= r <= min(m, n):
        raise ValueError(f"compressed init needs an even r in 2..{min(m, n)} for a {m} x {n} layer, got {r}")
    half = r // 2
    U, _, Vh = truncated_svd(G, half)
    dt = U.dtype
    Q = random_semi_orthogonal(m, n, generator=generator, dtype=dt, device=G.device)
    basis = torch.cat([Vh.T, Q.T @ U], dim=1)  # (n, r)
    right, R = torch.linalg.qr(basis)
    right = right * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones((), dtype=dt))
    left = Q @ right
    return left, right, Q


def init_compressed(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Build compressed Deep LoRA factors from one batch (DESIGN §4.3); returns the gradients G by layer.

    ``loss_fn(model, batch) -> scalar`` (default: ``model(**batch).loss``). Layers are processed in
    module order and each draws its Q from ``generator`` (default: torch's global RNG). After this call
    build the optimizer from :func:`adapter_param_groups` so the outer factors train at gamma * lr.

    Under DDP (call it on every rank, before wrapping the model in DistributedDataParallel): the
    gradients are averaged over ranks, so G is the global batch's (for a mean loss over equal-sized
    local batches), and the factors are broadcast from rank 0, so every rank starts identical.
    """
    state = adapter_state(model)
    if state is None or not isinstance(state.config, DeepLoRAConfig):
        raise ValueError("init_compressed needs a model adapted with tlr.DeepLoRAConfig (compress=True)")
    cfg = state.config
    if not cfg.compress:
        raise ValueError(
            "this model was adapted with DeepLoRAConfig(compress=False); the compressed init "
            "applies to compress=True"
        )
    grads = end_to_end_gradients(model, batch, loss_fn)
    distributed.all_reduce_mean_(grads.values())
    for name, layer in adapter_layers(model):
        left, right, _ = compressed_factors(grads[name], layer.r, generator)
        layer.set_compressed(left.to(layer.lora_A.dtype), right.to(layer.lora_A.dtype), cfg.init_scale)
    distributed.broadcast_tensors_(p.data for _, layer in adapter_layers(model) for p in layer.lora_factors)
    return grads
