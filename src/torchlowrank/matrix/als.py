"""Alternating least squares (ALS) with a ridge penalty: the classical factorization baseline for
matrix completion,

    min_{U (m, k), V (n, k)}  1/2 sum_{(i,j) in Omega} (U_i . V_j - M_ij)^2 + lam/2 (||U||_F^2 + ||V||_F^2),

solved exactly for all rows of U at once (then of V): row i solves
``(V_Oi^T V_Oi + lam I) U_i = V_Oi^T M_Oi``. The k x k Gram matrices of all rows come from one GEMM,
``mask @ (V (x) V)``, so a sweep costs O(m n k^2 + (m + n) k^3) — the right tool when the rank is
known. ``lam = reg * ||P_Omega(M)||_2``: ``reg`` is relative, so ALS is invariant to the data's
scale (``min (||U||^2 + ||V||^2) / 2`` over factorizations of X is the nuclear norm of X, so lam is
on the scale of singular values, like soft-impute's).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

__all__ = ["ALSResult", "als"]


@dataclass
class ALSResult:
    """matrix (m, n); U (m, k), V (n, k) with matrix = U V^T; status "converged" | "not_converged";
    n_iters; lam (the absolute ridge weight); train_rmse per sweep; val_rmse per sweep (when a
    validation set was given)."""

    matrix: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    status: str
    n_iters: int
    lam: float
    train_rmse: list[float] = field(default_factory=list)
    val_rmse: list[float] = field(default_factory=list)
    message: str = ""


def _solve_rows(mask: torch.Tensor, Mz: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
    k = V.shape[1]
    VV = (V[:, :, None] * V[:, None, :]).reshape(V.shape[0], k * k)
    G = (mask @ VV).reshape(-1, k, k)
    G.diagonal(dim1=1, dim2=2).add_(lam)
    rhs = Mz @ V
    # rows with no observations and lam = 0 would be singular: a tiny jitter keeps them at 0
    if lam == 0:
        G.diagonal(dim1=1, dim2=2).add_(1e-12 * max(float(G.diagonal(dim1=1, dim2=2).max()), 1e-300))
    return torch.linalg.solve(G, rhs.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def als(observed: torch.Tensor, mask: torch.Tensor, rank: int, *, reg: float = 1e-10, max_iters: int = 500,
        tol: float = 1e-7, validation: tuple | None = None, seed: int = 0) -> ALSResult:
    """ALS with ridge ``lam = reg * ||P_Omega(M)||_2`` at rank ``rank`` (observed, mask: (m, n)).

    Starts from the top-``rank`` SVD of ``P_Omega(M) / p`` (plus a small seeded perturbation), then
    alternates exact row solves until the relative change of the train RMSE over a sweep is below
    ``tol`` (or the train RMSE below ``1e-3 tol`` times the data's RMS) ("converged") or ``max_iters`` sweeps ("not_converged", with a warning).
    ``validation = (rows, cols, values)`` records the validation RMSE per sweep.
    """
    import operator

    from ..linalg import truncated_svd
    from .baselines import observed_entries

    try:
        rank = operator.index(rank)
    except TypeError:
        raise ValueError(f"rank must be a positive int, got {rank!r}") from None
    if isinstance(rank, bool) or not 1 <= rank <= min(observed.shape):
        raise ValueError(f"rank must be in 1..{min(observed.shape)}, got {rank!r}")
    if not reg >= 0:
        raise ValueError(f"reg must be >= 0, got {reg!r}")
    mk, Mz = observed_entries(observed, mask)
    dev = observed.device
    W = mk.to(torch.float64)
    p = float(W.mean())
    s1 = float(torch.linalg.matrix_norm(Mz, ord=2))
    lam = reg * s1
    U0, S0, Vh0 = truncated_svd(Mz / p, rank)
    g = torch.Generator().manual_seed(seed)
    V = Vh0.T * S0.sqrt() + 1e-3 * S0.sqrt().mean() * torch.randn(Vh0.shape[1], rank, generator=g,
                                                                  dtype=torch.float64).to(dev)
    n_obs = float(W.sum())
    res = ALSResult(Mz, U0, V, "not_converged", 0, lam)
    prev = math.inf
    for it in range(1, max_iters + 1):
        U = _solve_rows(W, Mz, V, lam)
        V = _solve_rows(W.T, Mz.T, U, lam)
        X = U @ V.T
        rmse = float(((X - Mz) * W).square().sum().div(n_obs).sqrt())
        res.train_rmse.append(rmse)
        if validation is not None:
            r, c, v = validation
            res.val_rmse.append(float((X[r, c] - v.to(X)).square().mean().sqrt()))
        res.n_iters = it
        scale = max(math.sqrt(float(Mz.square().sum()) / n_obs), 1e-300)
        if (it > 1 and abs(prev - rmse) <= tol * prev) or rmse <= 1e-3 * tol * scale:
            res.status = "converged"
            break
        prev = rmse
    res.matrix, res.U, res.V = U @ V.T, U, V
    if res.status == "converged":
        res.message = f"converged after {res.n_iters} sweeps (train RMSE {res.train_rmse[-1]:.3g})"
    else:
        res.message = (f"ALS did not converge in max_iters={max_iters} sweeps (train RMSE "
                       f"{res.train_rmse[-1]:.3g}, still changing); raise max_iters or reg")
        warnings.warn(res.message, RuntimeWarning, stacklevel=3)  # past the no_grad wrapper
    return res
