"""Deep matrix factorization ``Phi = W_L ... W_1`` with orthogonal initialisation at scale eps.

For a target of shape (m, n) and width w: W_1 is (w, n), inner factors are (w, w), W_L is (m, w)
(depth 1: a single (m, n) factor). Every factor starts as ``eps * O_l`` with O_l Haar-orthogonal
(orthonormal rows or columns), so ``Phi(0)`` has all singular values ``eps ** depth`` when
``w = min(m, n)``. Gradients are written by hand (``loss_and_grads``), checked against autograd
in the tests, so the trainer runs without building an autograd graph.
"""

from __future__ import annotations

import operator

import torch
from torch import nn

__all__ = ["DeepFactorization", "chain_products", "chain_grads", "haar_semi_orthogonal", "as_positive_int"]


def as_positive_int(value, name: str) -> int:
    """``value`` as a Python int >= 1 (NumPy / torch integers accepted; bools and floats are not)."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive int, got {value!r}") from None
    if v < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return v


def haar_semi_orthogonal(m: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-distributed (m, n) float64 matrix with orthonormal columns (m >= n) or rows, drawn on
    the CPU whatever the default device (QR of a Gaussian with the sign fix of Mezzadri 2007)."""
    big, small = max(m, n), min(m, n)
    g = torch.randn(big, small, generator=generator, dtype=torch.float64, device="cpu")
    Q, R = torch.linalg.qr(g)
    d = torch.diagonal(R)
    Q = Q * torch.where(d < 0, -1.0, 1.0).to(torch.float64)
    return Q if m >= n else Q.T


def _check_shape(shape) -> tuple[int, int]:
    try:
        m, n = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a pair (rows, cols), got {shape!r}") from None
    if m < 1 or n < 1:
        raise ValueError(f"shape must have positive sizes, got {(m, n)}")
    return m, n


def chain_products(factors: list[torch.Tensor]) -> torch.Tensor:
    """``factors[-1] @ ... @ factors[0]`` (factors listed first-applied first)."""
    out = factors[0]
    for W in factors[1:]:
        out = W @ out
    return out


def chain_grads(factors: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``f(W_L ... W_1)`` w.r.t. each W_l given ``grad = df/dPhi``:
    ``dW_l = (W_L ... W_{l+1})^T grad (W_{l-1} ... W_1)^T``. Costs 2(L-1) products."""
    L = len(factors)
    # suffix[l] = W_L ... W_{l+1} (None for l = L-1); computed left to right from the top
    left = [None] * L
    acc = None
    for l in range(L - 1, -1, -1):
        left[l] = acc
        if l > 0:
            acc = factors[l] if acc is None else acc @ factors[l]
    grads = [None] * L
    right = None  # W_{l-1} ... W_1
    for l in range(L):
        g = grad if left[l] is None else left[l].T @ grad
        grads[l] = g if right is None else g @ right.T
        if l < L - 1:
            right = factors[l] if right is None else factors[l] @ right
    return grads


class DeepFactorization(nn.Module):
    """End-to-end matrix ``Phi = W_L ... W_1`` of shape ``shape`` = (m, n).

    Args:
        shape: (m, n) of the target.
        depth: number of factors L >= 1 (default 3).
        width: inner width w (default ``min(m, n)``, the over-parameterised "original" network).
        init_scale: eps; every factor starts as eps times a random (semi-)orthogonal matrix.
        generator: torch.Generator for the orthogonal draws; dtype: default float64.
    Attributes: ``factors`` (ParameterList, first-applied first: ``factors[0]`` is W_1 (w, n)).
    """

    def __init__(
        self,
        shape: tuple[int, int],
        depth: int = 3,
        width: int | None = None,
        init_scale: float = 1e-3,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        m, n = _check_shape(shape)
        depth = as_positive_int(depth, "depth")
        width = min(m, n) if width is None else as_positive_int(width, "width (or None for min(shape))")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        self.shape = (m, n)
        self.depth = depth
        self.width = width if depth > 1 else min(m, n)
        self.init_scale = float(init_scale)
        dims = [n] + [width] * (depth - 1) + [m]
        self.factors = nn.ParameterList(
            nn.Parameter(
                (init_scale * haar_semi_orthogonal(dims[l + 1], dims[l], generator)).to(
                    dtype=dtype, device=device
                ),
                requires_grad=False,
            )
            for l in range(depth)
        )

    def end_to_end(self) -> torch.Tensor:
        """Phi = W_L ... W_1, shape (m, n)."""
        return chain_products(list(self.factors))

    forward = end_to_end

    def dense_weight(self) -> torch.Tensor:
        """The end-to-end matrix (lets ``tlr.spectrum`` see this module)."""
        return self.end_to_end().detach()

    def factor_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(X (m, w), Bt (n, w)) with ``Phi = X @ Bt.T`` (X = W_L ... W_2, Bt = W_1^T)."""
        Ws = [W.detach() for W in self.factors]
        if self.depth == 1:
            return Ws[0], torch.eye(self.shape[1], dtype=Ws[0].dtype, device=Ws[0].device)
        return chain_products(Ws[1:]), Ws[0].T

    def factor_parameters(self) -> list[nn.Parameter]:
        """The factors W_1..W_L, in the order of ``loss_and_grads`` and ``lr_scales``."""
        return list(self.factors)

    def lr_scales(self) -> list[float]:
        """Per-factor learning-rate multipliers (all 1 for the plain network)."""
        return [1.0] * self.depth

    @torch.no_grad()
    def loss_and_grads(self, problem) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(loss as a 0-d tensor, [dLoss/dW_1, ..., dLoss/dW_L]) for ``problem`` (hand-written)."""
        Ws = [W.detach() for W in self.factors]
        if self.depth == 1:
            loss, g = problem.loss_and_grad(Ws[0])
            return loss, [g]
        # Phi = X Bt^T with X = W_L ... W_2 (m, w), Bt = W_1^T (n, w): lets sparse problems skip Phi
        X = chain_products(Ws[1:])
        loss, gX, gBt = problem.factored_loss_and_grads(X, Ws[0].T)
        grads = [gBt.T] + chain_grads(Ws[1:], gX)
        return loss, grads

    def extra_repr(self) -> str:
        return f"shape={self.shape}, depth={self.depth}, width={self.width}, init_scale={self.init_scale:g}"
