"""Classical completion baseline: soft-impute (Mazumder, Hastie & Tibshirani 2010), i.e. iterated
singular value soft-thresholding, the proximal method for nuclear-norm-regularised completion
``min_Z 1/2 ||P_Omega(Z - M)||_F^2 + lam ||Z||_*``."""
from __future__ import annotations

import torch

from ..linalg import truncated_svd

__all__ = ["soft_impute", "svt"]


def svt(A: torch.Tensor, lam: float, max_rank: int | None = None) -> torch.Tensor:
    """Singular value soft-thresholding ``U diag((s - lam)_+) V^T`` (top ``max_rank`` triplets)."""
    k = min(A.shape) if max_rank is None else min(max_rank, min(A.shape))
    U, S, Vh = truncated_svd(A, k, method="full" if k == min(A.shape) else "auto")
    S = (S - lam).clamp_min(0)
    keep = int((S > 0).sum())
    return (U[:, :keep] * S[:keep]) @ Vh[:keep]


@torch.no_grad()
def soft_impute(observed: torch.Tensor, mask: torch.Tensor, lam: float, *, max_rank: int | None = 100,
                max_iters: int = 200, tol: float = 1e-5, init: torch.Tensor | None = None) -> torch.Tensor:
    """Soft-impute: ``Z <- SVT_lam(P_Omega(M) + P_Omega^perp(Z))`` until the relative change is below
    ``tol``. observed, mask: (m, n). Returns Z (m, n) float64. Warm-start with ``init`` to walk a
    path of decreasing ``lam`` cheaply."""
    if mask.shape != observed.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but observed has {tuple(observed.shape)}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    mask = mask.to(torch.bool)
    if not mask.any():
        raise ValueError("the mask observes no entries")
    M = torch.where(mask, observed.to(torch.float64), torch.zeros((), dtype=torch.float64))
    if not torch.isfinite(M).all():
        raise ValueError("observed entries contain NaN/Inf; drop them from the mask")
    Z = torch.zeros_like(M) if init is None else init.to(torch.float64).clone()
    for _ in range(max_iters):
        Znew = svt(torch.where(mask, M, Z), lam, max_rank)
        change = torch.linalg.matrix_norm(Znew - Z) / torch.linalg.matrix_norm(Z).clamp_min(1e-300)
        Z = Znew
        if change < tol:
            break
    return Z
