"""The invariant-subspace theorem for deep factorization (DESIGN §4.4), as checkable formulas.

For a square d x d target M of rank r (SVD ``U_M S V_M^T``), the loss ``c/2 ||Phi - M||_F^2 +
weight_decay/2 sum_l ||W_l||_F^2`` and the width-d network with ``W_l(0) = eps O_l`` (O_l orthogonal),
gradient descent with step lr keeps

    W_l(t) = U_l diag(W~_l(t), rho(t) I_{d-2r}) V_l^T,

with fixed orthonormal bases: ``V_1 = [orth([V_M, O^T U_M]), complement]`` (O = O_L ... O_1) and
``U_l = O_l V_l``, ``V_{l+1} = U_l``. The d - 2r singular values outside the block follow

    rho(t+1) = rho(t) (1 - lr weight_decay - lr c rho(t)^(2(L-1))),   rho(0) = eps,

(c = 1 for reduction "sum", 1/d^2 for "mean"): on the complement, Phi = rho^L (times an isometry),
M = 0, so dLoss/dW_l = c rho^(2L-1) + weight_decay rho there.
"""

from __future__ import annotations

import torch

from ..linalg import orthonormal_basis
from .factorization import DeepFactorization, chain_products

__all__ = ["rho_trajectory", "invariant_bases"]


def rho_trajectory(
    eps: float, lr: float, depth: int, steps: int, scale: float = 1.0, weight_decay: float = 0.0
) -> torch.Tensor:
    """rho(0..steps) (float64) from the scalar recursion above."""
    rho = [float(eps)]
    for _ in range(steps):
        p = rho[-1]
        rho.append(p * (1.0 - lr * weight_decay - lr * scale * p ** (2 * (depth - 1))))
    return torch.tensor(rho, dtype=torch.float64)


@torch.no_grad()
def invariant_bases(
    model: DeepFactorization, U_M: torch.Tensor, V_M: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """(U_ls, V_ls, k) for a freshly initialised square width-d ``model`` and the target's singular
    vectors U_M, V_M (d, r): full d x d orthonormal bases whose first k (= 2r generically) columns
    span the moving block; columns k: are the fixed complement."""
    m, n = model.shape
    if m != n or model.width != n:
        raise ValueError("the theorem is stated for a square target and width d = min(shape)")
    eps = model.init_scale
    Os = [W.detach() / eps for W in model.factors]
    O = chain_products(Os)
    block = orthonormal_basis(torch.cat([V_M.to(O.dtype), O.T @ U_M.to(O.dtype)], dim=1))
    k = block.shape[1]
    # complete to a full basis: the left singular vectors of I - block block^T beyond k
    Q, _ = torch.linalg.qr(
        torch.cat([block, torch.randn(n, n, dtype=O.dtype, generator=torch.Generator().manual_seed(0))], 1)
    )
    V1 = torch.cat([block, Q[:, k:n]], dim=1)
    Vs, Us = [], []
    V = V1
    for Ol in Os:
        Vs.append(V)
        U = Ol @ V
        Us.append(U)
        V = U
    return Us, Vs, k
