"""Classical completion baseline: soft-impute (Mazumder, Hastie & Tibshirani 2010), i.e. iterated
singular value soft-thresholding, the proximal method for nuclear-norm-regularised completion
``min_Z 1/2 ||P_Omega(Z - M)||_F^2 + lam ||Z||_*``."""
from __future__ import annotations

import math
import warnings

import torch

from ..linalg import truncated_svd

__all__ = ["soft_impute", "soft_impute_path", "svt"]


def svt(A: torch.Tensor, lam: float, max_rank: int | None = None) -> torch.Tensor:
    """Singular value soft-thresholding ``U diag((s - lam)_+) V^T`` (top ``max_rank`` triplets)."""
    k = min(A.shape) if max_rank is None else min(max_rank, min(A.shape))
    if k == 0:
        return torch.zeros_like(A)
    U, S, Vh = truncated_svd(A, k, method="full" if k == min(A.shape) else "auto")
    S = (S - lam).clamp_min(0)
    keep = int((S > 0).sum())
    return (U[:, :keep] * S[:keep]) @ Vh[:keep]


def observed_entries(observed: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask as bool (m, n), observed as float64 with zeros off the mask) for the baselines; ValueError
    for a shape mismatch, an empty mask or NaN/Inf in an observed entry."""
    if mask.shape != observed.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but observed has {tuple(observed.shape)}")
    mask = mask.to(torch.bool)
    if not mask.any():
        raise ValueError("the mask observes no entries")
    M = torch.where(mask, observed.to(torch.float64), torch.zeros((), dtype=torch.float64, device=observed.device))
    if not torch.isfinite(M).all():
        raise ValueError("observed entries contain NaN/Inf; drop them from the mask")
    return mask, M


@torch.no_grad()
def soft_impute(observed: torch.Tensor, mask: torch.Tensor, lam: float, *, max_rank: int | None = 100,
                max_iters: int = 200, tol: float = 1e-5, init: torch.Tensor | None = None,
                warn: bool = True) -> torch.Tensor:
    """Soft-impute: ``Z <- SVT_lam(P_Omega(M) + P_Omega^perp(Z))`` until the relative change is below
    ``tol``. observed, mask: (m, n). Returns Z (m, n) float64 on observed's device. Warm-start with
    ``init`` to walk a path of decreasing ``lam`` cheaply (:func:`soft_impute_path`). Stopping at
    ``max_iters`` with the change still above ``tol`` raises a RuntimeWarning (``warn=False``
    silences it, for a deliberate fixed budget)."""
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    mask, M = observed_entries(observed, mask)
    Z = torch.zeros_like(M) if init is None else init.to(M).clone()
    change = math.inf
    for _ in range(max_iters):
        Znew = svt(torch.where(mask, M, Z), lam, max_rank)
        change = float(torch.linalg.matrix_norm(Znew - Z) / torch.linalg.matrix_norm(Z).clamp_min(1e-300))
        Z = Znew
        if change < tol:
            break
    else:
        if warn:
            warnings.warn(f"soft_impute stopped at max_iters={max_iters} with relative change {change:.3g} > "
                          f"tol={tol:g}: not converged; raise max_iters (or warm-start with init=)",
                          RuntimeWarning, stacklevel=3)
    return Z


@torch.no_grad()
def soft_impute_path(observed: torch.Tensor, mask: torch.Tensor, validation: tuple, *,
                     lams: list[float] | None = None, max_rank: int | None = 100, max_iters: int = 100,
                     tol: float = 1e-5) -> tuple[torch.Tensor, float, list[dict]]:
    """Soft-impute on a decreasing path of ``lam`` with warm starts, choosing lam on
    ``validation = (rows, cols, values)``. ``lams``: absolute values (default: ``||P_Omega(M)||_2``
    times 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001 — scale-free).

    Returns (Z of the best lam (m, n), best lam, one dict per lam: lam, rank, val_rmse,
    converged). Warns once if some lam stopped unconverged.
    """
    r, c, v = validation
    M = torch.where(mask.to(torch.bool), observed.to(torch.float64),
                    torch.zeros((), dtype=torch.float64, device=observed.device))
    if lams is None:
        s1 = float(torch.linalg.matrix_norm(M, ord=2))
        lams = [f * s1 for f in (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)]
    lams = sorted(lams, reverse=True)
    Z, best, path, unconverged = None, (math.inf, None, None), [], []
    for lam in lams:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Z = soft_impute(observed, mask, lam, max_rank=max_rank, max_iters=max_iters, tol=tol, init=Z)
        ok = not any(issubclass(w.category, RuntimeWarning) for w in caught)
        if not ok:
            unconverged.append(lam)
        val = float((Z[r, c] - v.to(Z)).square().mean().sqrt())
        path.append({"lam": lam, "rank": int((torch.linalg.svdvals(Z) > 1e-9 * max(lam, 1e-300)).sum()),
                     "val_rmse": val, "converged": ok})
        if val < best[0]:
            best = (val, lam, Z)
    if unconverged:
        warnings.warn(f"soft_impute_path: {len(unconverged)} of {len(lams)} lam values stopped at max_iters="
                      f"{max_iters} unconverged (e.g. lam={unconverged[0]:.3g})", RuntimeWarning, stacklevel=3)
    return best[2], best[1], path
