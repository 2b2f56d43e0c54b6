"""Classical completion baseline: soft-impute (Mazumder, Hastie & Tibshirani 2010), i.e. iterated
singular value soft-thresholding, the proximal method for nuclear-norm-regularised completion
``min_Z 1/2 ||P_Omega(Z - M)||_F^2 + lam ||Z||_*``."""

from __future__ import annotations

import math
import time
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
    M = torch.where(
        mask, observed.to(torch.float64), torch.zeros((), dtype=torch.float64, device=observed.device)
    )
    if not torch.isfinite(M).all():
        raise ValueError("observed entries contain NaN/Inf; drop them from the mask")
    return mask, M


@torch.no_grad()
def soft_impute(
    observed: torch.Tensor,
    mask: torch.Tensor,
    lam: float,
    *,
    max_rank: int | None = 100,
    max_iters: int = 200,
    tol: float = 1e-5,
    init: torch.Tensor | None = None,
    warn: bool = True,
    time_limit: float | None = None,
    info: dict | None = None,
) -> torch.Tensor:
    """Soft-impute: ``Z <- SVT_lam(P_Omega(M) + P_Omega^perp(Z))`` until the relative change is below
    ``tol``. observed, mask: (m, n). Returns Z (m, n) float64 on observed's device. Warm-start with
    ``init`` to walk a path of decreasing ``lam`` cheaply (:func:`soft_impute_path`). Stopping at
    ``max_iters`` with the change still above ``tol`` raises a RuntimeWarning (``warn=False``
    silences it, for a deliberate fixed budget). ``time_limit`` (seconds, checked between
    iterations: one that would end past it is not started) stops it the same way. ``info``, if
    a dict, receives ``status`` ("converged" | "not_converged"), ``reason``, ``n_iters``, ``change``."""
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    if time_limit is not None and not time_limit >= 0:
        raise ValueError(f"time_limit must be >= 0 or None, got {time_limit!r}")
    t_start = time.perf_counter()
    mask, M = observed_entries(observed, mask)
    Z = torch.zeros_like(M) if init is None else init.to(M).clone()
    change, last, reason, it = math.inf, 0.0, "max_iters", 0
    for it in range(1, max_iters + 1):
        if time_limit is not None and time.perf_counter() - t_start + last > time_limit:
            reason, it = "time_limit", it - 1
            break
        t0 = time.perf_counter()
        Znew = svt(torch.where(mask, M, Z), lam, max_rank)
        change = float(torch.linalg.matrix_norm(Znew - Z) / torch.linalg.matrix_norm(Z).clamp_min(1e-300))
        Z = Znew
        last = time.perf_counter() - t0
        if change < tol:
            reason = "tol"
            break
    if info is not None:
        info.update(
            status="converged" if reason == "tol" else "not_converged",
            reason=reason,
            n_iters=it,
            change=change,
        )
    if reason != "tol" and warn:
        budget = f"max_iters={max_iters}" if reason == "max_iters" else f"the time limit ({time_limit} s)"
        warnings.warn(
            f"soft_impute stopped at {budget} with relative change {change:.3g} > "
            f"tol={tol:g}: not converged; raise max_iters / time_limit (or warm-start with init=)",
            RuntimeWarning,
            stacklevel=3,
        )
    return Z


@torch.no_grad()
def soft_impute_path(
    observed: torch.Tensor,
    mask: torch.Tensor,
    validation: tuple | None = None,
    *,
    lams: list[float] | None = None,
    max_rank: int | None = 100,
    max_iters: int = 100,
    tol: float = 1e-5,
    time_limit: float | None = None,
    holdout: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, float, list[dict]]:
    """Soft-impute on a decreasing path of ``lam`` with warm starts, choosing lam on
    ``validation = (rows, cols, values)`` or, when it is None, on a seeded ``holdout`` fraction of
    the observed entries (then refitted on all entries at the chosen lam, warm-started). ``lams``:
    absolute values (default: ``||P_Omega(M)||_2`` times 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01,
    0.005, 0.002, 0.001 — scale-free). The path stops once the validation RMSE rose twice past its
    best (a smaller lam only fits more noise). ``time_limit`` (seconds) bounds the whole call: each
    lam runs with what is left, the path stops when it is spent, and the refit gets at least the
    last 20% of it.

    Returns (Z of the best lam (m, n), best lam, one dict per lam tried: lam, rank, val_rmse,
    converged, n_iters). Warns once if some lam stopped unconverged.
    """
    from .centering import holdout_split

    t_start = time.perf_counter()
    if time_limit is not None and not time_limit >= 0:
        raise ValueError(f"time_limit must be >= 0 or None, got {time_limit!r}")
    mask_b, M = observed_entries(observed, mask)
    fit_mask = mask_b
    refit = validation is None
    if refit:
        rows, cols = mask_b.nonzero(as_tuple=True)
        pick = holdout_split(rows, cols, holdout, seed, tuple(mask_b.shape))
        if int(pick.sum()) == 0:
            raise ValueError("too few observed entries to hold any out: pass validation=")
        vr, vc = rows[pick], cols[pick]
        validation = (vr, vc, M[vr, vc])
        fit_mask = mask_b.clone()
        fit_mask[vr, vc] = False
    r, c, v = validation
    if lams is None:
        s1 = float(torch.linalg.matrix_norm(torch.where(fit_mask, M, torch.zeros_like(M)), ord=2))
        lams = [f * s1 for f in (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)]
    lams = sorted(lams, reverse=True)
    path_budget = None if time_limit is None else (0.8 if refit else 1.0) * time_limit
    Z, best, path, unconverged, rises = None, (math.inf, None, None), [], [], 0
    for lam in lams:
        left = None if path_budget is None else path_budget - (time.perf_counter() - t_start)
        if left is not None and left <= 0 and path:
            break
        info: dict = {}
        Z = soft_impute(
            M,
            fit_mask,
            lam,
            max_rank=max_rank,
            max_iters=max_iters,
            tol=tol,
            init=Z,
            warn=False,
            time_limit=None if left is None else max(left, 0.0),
            info=info,
        )
        ok = info["status"] == "converged"
        if not ok:
            unconverged.append(lam)
        val = float((Z[r, c] - v.to(Z)).square().mean().sqrt())
        path.append(
            {
                "lam": lam,
                "rank": int((torch.linalg.svdvals(Z) > 1e-9 * max(lam, 1e-300)).sum()),
                "val_rmse": val,
                "converged": ok,
                "n_iters": info["n_iters"],
            }
        )
        if val < best[0]:
            best, rises = (val, lam, Z), 0
        else:
            rises += 1
            if rises >= 2:
                break
    Zb, lam_b = best[2], best[1]
    if refit:
        left = None if time_limit is None else max(time_limit - (time.perf_counter() - t_start), 0.0)
        info = {}
        Zb = soft_impute(
            M,
            mask_b,
            lam_b,
            max_rank=max_rank,
            max_iters=max_iters,
            tol=tol,
            init=Zb,
            warn=False,
            time_limit=left,
            info=info,
        )
        if info["status"] != "converged":
            unconverged.append(lam_b)
    if unconverged:
        warnings.warn(
            f"soft_impute_path: {len(unconverged)} fit(s) stopped unconverged at max_iters={max_iters} "
            f"or the time limit (e.g. lam={unconverged[0]:.3g}); raise max_iters / time_limit",
            RuntimeWarning,
            stacklevel=3,
        )
    return Zb, lam_b, path
