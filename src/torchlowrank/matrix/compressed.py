"""The compressed deep factorization (DESIGN §4.4): train a 2 r_hat-dimensional network instead of
the width-d one, at the cost of a narrow model.

Construction from the first gradient of the original network (orthogonal init at scale eps):
``G_1 = dLoss/dW_1`` at t = 0 with SVD ``U_g S V_g^T``;
``V_1 = orth([V_g[:, :r_hat], W_1(0)^T U_g[:, :r_hat] / eps])`` (n, k), k = 2 r_hat (fewer if the two
blocks overlap); ``U_L = Phi(0) V_1 / eps^L`` (m, k). The compressed network is
``Phi_c = U_L C_L ... C_1 V_1^T`` with every inner ``C_l(0) = eps I_k``, so
``Phi_c(0) = Phi(0) V_1 V_1^T``: it equals the original on span(V_1) and drops the complement,
whose part has norm ``eps^L sqrt(n - k)`` and, for a rank-r factorization target, only shrinks
(the invariant-subspace theorem). Outer factors U_L, V_1 train with learning rate ``gamma * lr``
(discrepant learning rate), inner factors with ``lr``.

Without a ``base`` network the original's ``O = Phi(0) / eps^L`` is drawn directly as a Haar
(semi-)orthogonal matrix (a product of Haar orthogonal factors is Haar), and then
``V_1 = orth([V_f, O^T U_f])`` with ``U_f S V_f^T`` the top-r_hat SVD of ``dLoss/dPhi`` at Phi(0):
the same span as the formula above for a square original (``G_1 = (W_L..W_2)^T dLoss/dPhi``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..linalg import orthonormal_basis, truncated_svd
from .factorization import (
    DeepFactorization,
    as_positive_int,
    chain_grads,
    chain_products,
    haar_semi_orthogonal,
)

__all__ = ["CompressedFactorization", "check_rank", "as_positive_int", "haar_semi_orthogonal"]


def check_rank(rank, shape: tuple[int, int]) -> int:
    """Validate an assumed rank r_hat: an int with ``2 r_hat <= min(shape)``; returns it as an int."""
    rank = as_positive_int(rank, "rank (r_hat)")
    if 2 * rank > min(shape):
        raise ValueError(
            f"the compressed network has width 2*rank = {2 * rank} > min(shape) = {min(shape)}; "
            f"use rank <= {min(shape) // 2} or compressed=False for this small matrix"
        )
    return rank


class CompressedFactorization(nn.Module):
    """``Phi = U_L C_L ... C_1 V_1^T``: outer factors ``left`` (m, k) = U_L and ``right`` (n, k) = V_1
    (stored as V_1, i.e. the transpose of the first factor), inner ``inner[l]`` (k, k).

    Build it with :meth:`from_problem`. ``factors`` lists the end-to-end chain first-applied first:
    ``[V_1^T, C_1, ..., C_L, U_L]``. ``lr_scales()`` gives ``gamma`` for the outer pair, 1 inside.
    """

    def __init__(
        self,
        left: torch.Tensor,
        inner: list[torch.Tensor],
        right: torch.Tensor,
        gamma: float = 0.01,
        init_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        if left.shape[1] != right.shape[1] or any(C.shape != (left.shape[1],) * 2 for C in inner):
            raise ValueError("left (m, k), inner (k, k) and right (n, k) must share k")
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.left = nn.Parameter(left.contiguous(), requires_grad=False)
        self.inner = nn.ParameterList(nn.Parameter(C.clone(), requires_grad=False) for C in inner)
        self.right = nn.Parameter(right.contiguous(), requires_grad=False)
        self.gamma = float(gamma)
        self.init_scale = float(init_scale)
        self.shape = (left.shape[0], right.shape[0])
        self.depth = len(inner)

    @property
    def rank(self) -> int:
        """k = width of the compressed network (2 r_hat unless the two blocks overlap)."""
        return self.left.shape[1]

    @classmethod
    @torch.no_grad()
    def from_problem(
        cls,
        problem,
        rank: int,
        depth: int = 3,
        init_scale: float = 1e-3,
        gamma: float = 0.01,
        *,
        base: DeepFactorization | None = None,
        generator: torch.Generator | None = None,
    ) -> CompressedFactorization:
        """Compress the original width-min(m, n) depth-``depth`` network for ``problem`` with assumed
        rank ``rank`` (r_hat). ``base``: an existing original network (its init is used exactly);
        otherwise its end-to-end init is drawn with ``generator``."""
        m, n = problem.shape
        rank = check_rank(rank, (m, n))
        dev = getattr(problem, "device", None)
        if base is not None:
            if tuple(base.shape) != (m, n):
                raise ValueError(f"base network has shape {base.shape}, problem has {(m, n)}")
            depth, eps = base.depth, base.init_scale
            Ws = [W.detach() for W in base.factors]
            Phi0 = chain_products(Ws)
            _, G = problem.loss_and_grad(Phi0)
            G1 = G if depth == 1 else chain_products(Ws[1:]).T @ G  # dLoss/dW_1 (w, n)
            U, _, Vh = truncated_svd(G1, rank)
            V1 = orthonormal_basis(torch.cat([Vh.T, Ws[0].T @ U / eps], dim=1))
            left = Phi0 @ V1 / eps**depth
        else:
            depth = as_positive_int(depth, "depth")
            eps = float(init_scale)
            # drawn on the CPU (the same init whatever the device), then moved
            if generator is not None and generator.device.type != "cpu":
                raise ValueError("pass a CPU torch.Generator (the initialisation is drawn on the CPU)")
            O = haar_semi_orthogonal(m, n, generator).to(dev)
            _, G = problem.loss_and_grad(eps**depth * O)
            U, _, Vh = truncated_svd(G, rank)
            V1 = orthonormal_basis(torch.cat([Vh.T, O.T @ U], dim=1))
            left = O @ V1
        k = V1.shape[1]
        eye = torch.eye(k, dtype=torch.float64, device=V1.device)
        return cls(left, [eps * eye for _ in range(depth)], V1, gamma=gamma, init_scale=eps)

    @property
    def factors(self) -> list[torch.Tensor]:
        return [self.right.T, *self.inner, self.left]

    def end_to_end(self) -> torch.Tensor:
        """Phi = U_L C_L ... C_1 V_1^T, shape (m, n)."""
        return (self.left @ chain_products(list(self.inner))) @ self.right.T

    forward = end_to_end

    def dense_weight(self) -> torch.Tensor:
        return self.end_to_end().detach()

    def factor_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(X (m, k), Bt (n, k)) with ``Phi = X @ Bt.T``."""
        return self.left @ chain_products(list(self.inner)), self.right

    def factor_parameters(self) -> list[nn.Parameter]:
        """The trained tensors in the order of ``loss_and_grads`` / ``lr_scales``: left, inner..., right."""
        return [self.left, *self.inner, self.right]

    def lr_scales(self) -> list[float]:
        """Multipliers in the order of ``factor_parameters()``: left, inner..., right."""
        return [self.gamma] + [1.0] * self.depth + [self.gamma]

    @torch.no_grad()
    def loss_and_grads(self, problem) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(loss, gradients in the order of ``factor_parameters()``); O(|Omega| k + (m + n) k^2) for completion."""
        A, Cs, V = self.left, list(self.inner), self.right
        C = chain_products(Cs)
        X = A @ C
        loss, gX, gV = problem.factored_loss_and_grads(X, V)
        gA = gX @ C.T
        gC = A.T @ gX
        gCs = chain_grads(Cs, gC)
        return loss, [gA, *gCs, gV]

    def extra_repr(self) -> str:
        return f"shape={self.shape}, depth={self.depth}, k={self.rank}, gamma={self.gamma:g}"
