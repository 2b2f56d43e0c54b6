"""Classical completion baseline: soft-impute (Mazumder, Hastie & Tibshirani 2010), i.e. iterated
singular value soft-thresholding, the proximal method for nuclear-norm-regularised completion
``min_Z 1/2 ||P_Omega(Z - M)||_F^2 + lam ||Z||_*``.

The iterate is kept factored, ``Z = U diag(d) V^T`` (:class:`SoftImputeFit`), and never formed:
each step's matrix ``P_Omega(M) + P_Omega^perp(Z) = P_Omega(M - Z) + Z`` is sparse plus low rank
(§5 of the paper), so its products with (n, k) / (m, k) blocks cost a CSR product over the observed
entries plus factor products, O(|Omega| k + (m + n) k^2), and its top-k SVD is one block power step
warm-started from the previous step's right singular vectors (the iterates change little from step
to step, so one step a iteration tracks the subspace; a fixed point of the pair is a fixed point of
exact soft-impute). Memory O(|Omega| + (m + n) k).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from ..linalg import truncated_svd
from .sparse import Entries, entry_dots, sparse_top_svd

__all__ = ["SoftImputeFit", "soft_impute", "soft_impute_fit", "soft_impute_path", "svt"]

GUARD = 5  # right singular directions carried beyond the kept rank: the subspace's margin


def svt(A: torch.Tensor, lam: float, max_rank: int | None = None) -> torch.Tensor:
    """Singular value soft-thresholding ``U diag((s - lam)_+) V^T`` (top ``max_rank`` triplets)."""
    k = min(A.shape) if max_rank is None else min(max_rank, min(A.shape))
    if k == 0:
        return torch.zeros_like(A)
    U, S, Vh = truncated_svd(A, k, method="full" if k == min(A.shape) else "auto")
    S = (S - lam).clamp_min(0)
    keep = int((S > 0).sum())
    return (U[:, :keep] * S[:keep]) @ Vh[:keep]


@dataclass
class SoftImputeFit:
    """A soft-impute solution ``Z = U diag(d) V^T``: U (m, k), V (n, k) orthonormal, d (k,) > 0
    descending (k = 0 for Z = 0), float64. ``basis`` (n, q), q >= k: the right singular directions
    the next step starts from (the kept ones first)."""

    U: torch.Tensor
    d: torch.Tensor
    V: torch.Tensor
    basis: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.d.numel())

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.V.shape[0])

    def predict(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``Z[rows, cols]`` (N,) without forming Z."""
        rows, cols = torch.as_tensor(rows).long(), torch.as_tensor(cols).long()
        if self.rank == 0:
            return torch.zeros(rows.numel(), dtype=self.U.dtype, device=self.U.device)
        return entry_dots(self.U * self.d, self.V, rows.to(self.U.device), cols.to(self.U.device))

    @property
    def matrix(self) -> torch.Tensor:
        """Z (m, n) (O(m n) memory)."""
        return (self.U * self.d) @ self.V.T

    @classmethod
    def zero(cls, m: int, n: int, device=None) -> SoftImputeFit:
        e = torch.zeros(0, dtype=torch.float64, device=device)
        return cls(e.new_zeros(m, 0), e, e.new_zeros(n, 0))

    @classmethod
    def from_matrix(cls, Z: torch.Tensor, max_rank: int | None) -> SoftImputeFit:
        """The top ``max_rank`` (all when None) singular triplets of a dense Z with a nonzero value."""
        Z = Z.to(torch.float64)
        k = min(Z.shape) if max_rank is None else min(max_rank, min(Z.shape))
        if k == 0 or not bool(Z.ne(0).any()):
            return cls.zero(*Z.shape, device=Z.device)
        U, S, Vh = truncated_svd(Z, k, method="full" if k == min(Z.shape) else "auto")
        keep = S > 1e-14 * S[0]
        return cls(U[:, keep], S[keep], Vh[keep].T)


def _frob_sq_diff(a: SoftImputeFit, b: SoftImputeFit) -> float:
    """||Z_a - Z_b||_F^2 from the factors (both with orthonormal U, V), without the cancellation of
    ``||Z_a||^2 + ||Z_b||^2 - 2 <Z_a, Z_b>``: with ``U_b = U_a C_u + R_u`` (R_u orthogonal to U_a) and
    ``V_b = V_a C_v + R_v``, the difference splits into four mutually orthogonal terms."""
    Cu, Cv = a.U.T @ b.U, a.V.T @ b.V  # (k_a, k_b)
    Ru, Rv = b.U - a.U @ Cu, b.V - a.V @ Cv  # (m, k_b), (n, k_b)
    CuD, CvD = Cu * b.d, Cv * b.d
    Gu, Gv = Ru.T @ Ru, Rv.T @ Rv
    inside = torch.diag(a.d) - CuD @ Cv.T
    total = (
        inside.square().sum()
        + (CuD @ Gv * CuD).sum()
        + (CvD @ Gu * CvD).sum()
        + (b.d[:, None] * Gu * b.d[None, :] * Gv).sum()
    )
    return max(float(total), 0.0)


def _svt_step(
    E: Entries, Z: SoftImputeFit, lam: float, max_rank: int, width: int, generator: torch.Generator
) -> SoftImputeFit:
    """One soft-impute step from ``Z``: the top-``width`` SVD of ``X = P_Omega(M - Z) + Z`` by one
    block power step from ``Z.basis`` (topped up with seeded Gaussian columns), then
    ``d = (s - lam)_+`` on the first ``max_rank`` triplets."""
    m, n = E.shape
    resid = E.values - Z.predict(E.rows, E.cols)
    Q = Z.basis if Z.basis is not None else Z.V
    Q = Q[:, :width]
    if Q.shape[1] < width:
        extra = torch.randn(n, width - Q.shape[1], generator=generator, dtype=torch.float64).to(E.device)
        Q = torch.linalg.qr(torch.cat([Q, extra], 1))[0]
    DV = Z.d[:, None] * Z.V.T  # (k, n)
    Y = E.matmul(resid, Q) + Z.U @ (DV @ Q)  # X Q (m, width)
    P = torch.linalg.qr(Y)[0]
    W = E.rmatmul(resid, P) + DV.T @ (Z.U.T @ P)  # X^T P (n, width)
    Vw, s, Uwh = torch.linalg.svd(W, full_matrices=False)  # X ~ P P^T X = (P Uw) diag(s) Vw^T
    d = (s[:max_rank] - lam).clamp_min(0)
    k = int((d > 0).sum())
    return SoftImputeFit((P @ Uwh.T)[:, :k], d[:k], Vw[:, :k], basis=Vw)


def _next_width(width: int, rank: int, cap: int) -> int:
    """The block width of the next step: the kept rank plus :data:`GUARD`, doubled while the
    kept rank fills the block (its margin is gone), at most ``cap``."""
    if rank > width - GUARD:
        return min(cap, max(2 * width, rank + GUARD))
    return min(cap, max(rank + GUARD, GUARD))


@torch.no_grad()
def soft_impute_fit(
    E: Entries,
    lam: float,
    *,
    max_rank: int | None = 100,
    max_iters: int = 200,
    tol: float = 1e-5,
    init: SoftImputeFit | None = None,
    time_limit: float | None = None,
    seed: int = 0,
) -> tuple[SoftImputeFit, dict]:
    """Soft-impute on the observed entries ``E`` (module docstring): ``Z <- SVT_lam(P_Omega(M) +
    P_Omega^perp(Z))``, top ``max_rank`` triplets (None: no cap), until the relative change
    ``||Z_new - Z||_F / ||Z||_F`` is below ``tol``, ``max_iters`` steps or ``time_limit`` seconds
    (checked between steps: one that would end past it is not started). ``init``: a fit to start
    from (a warm start along a path of lam). Returns (fit, info: status "converged" |
    "not_converged", reason "tol" | "max_iters" | "time_limit", n_iters, change)."""
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    if time_limit is not None and not time_limit >= 0:
        raise ValueError(f"time_limit must be >= 0 or None, got {time_limit!r}")
    if max_rank is not None and not (isinstance(max_rank, int) and max_rank >= 1):
        raise ValueError(f"max_rank must be a positive int or None, got {max_rank!r}")
    t_start = time.perf_counter()
    m, n = E.shape
    rank_cap = min(m, n) if max_rank is None else min(max_rank, m, n)
    cap = min(rank_cap + GUARD, m, n)
    Z = SoftImputeFit.zero(m, n, E.device) if init is None else init
    width = _next_width(min(cap, 2 * GUARD), Z.rank, cap)
    gen = torch.Generator().manual_seed(seed)
    change, last, reason, it = math.inf, 0.0, "max_iters", 0
    for it in range(1, max_iters + 1):
        if time_limit is not None and time.perf_counter() - t_start + last > time_limit:
            reason, it = "time_limit", it - 1
            break
        t0 = time.perf_counter()
        Znew = _svt_step(E, Z, lam, rank_cap, width, gen)
        change = math.sqrt(_frob_sq_diff(Znew, Z)) / max(math.sqrt(float(Z.d.square().sum())), 1e-300)
        Z, width = Znew, _next_width(width, Znew.rank, cap)
        last = time.perf_counter() - t0
        if change < tol:
            reason = "tol"
            break
    info = dict(
        status="converged" if reason == "tol" else "not_converged", reason=reason, n_iters=it, change=change
    )
    return Z, info


def _warn_unconverged(info: dict, max_iters: int, time_limit: float | None, tol: float) -> None:
    budget = f"max_iters={max_iters}" if info["reason"] == "max_iters" else f"the time limit ({time_limit} s)"
    warnings.warn(
        f"soft_impute stopped at {budget} with relative change {info['change']:.3g} > "
        f"tol={tol:g}: not converged; raise max_iters / time_limit (or warm-start with init=)",
        RuntimeWarning,
        stacklevel=3,
    )


def soft_impute(
    observed,
    mask,
    lam: float,
    *,
    max_rank: int | None = 100,
    max_iters: int = 200,
    tol: float = 1e-5,
    init: torch.Tensor | SoftImputeFit | None = None,
    warn: bool = True,
    time_limit: float | None = None,
    info: dict | None = None,
) -> torch.Tensor:
    """Soft-impute at ``lam`` (:func:`soft_impute_fit`, which never forms an (m, n) matrix), as a
    dense completed matrix. observed: (m, n) dense with ``mask`` (None: the non-NaN entries) or a
    sparse COO / CSR tensor (then ``mask=None``). Returns Z (m, n) float64 on observed's device. Warm-start with
    ``init`` (a dense Z, truncated to ``max_rank``, or a :class:`SoftImputeFit`) to walk a path of
    decreasing ``lam`` cheaply (:func:`soft_impute_path`). Stopping at ``max_iters`` or
    ``time_limit`` with the change still above ``tol`` raises a RuntimeWarning (``warn=False``
    silences it, for a deliberate fixed budget). ``info``, if a dict, receives ``status``
    ("converged" | "not_converged"), ``reason``, ``n_iters``, ``change``."""
    from .als import as_entries

    E = as_entries(observed, mask)
    if isinstance(init, torch.Tensor):
        init = SoftImputeFit.from_matrix(init.to(E.device), max_rank)
    fit, out = soft_impute_fit(
        E, lam, max_rank=max_rank, max_iters=max_iters, tol=tol, init=init, time_limit=time_limit
    )
    if info is not None:
        info.update(out)
    if out["reason"] != "tol" and warn:
        _warn_unconverged(out, max_iters, time_limit, tol)
    return fit.matrix


def fit_soft_impute_path(
    E: Entries,
    validation: tuple | None = None,
    *,
    lams: list[float] | None = None,
    max_rank: int | None = 100,
    max_iters: int = 100,
    tol: float = 1e-5,
    time_limit: float | None = None,
    holdout: float = 0.1,
    seed: int = 0,
) -> tuple[SoftImputeFit, float, list[dict], list[float]]:
    """:func:`soft_impute_path` on the observed entries ``E``, returning the factored fit:
    (fit at the best lam, best lam, the path, the lams whose fit stopped unconverged)."""
    from .centering import holdout_split

    t_start = time.perf_counter()
    if time_limit is not None and not time_limit >= 0:
        raise ValueError(f"time_limit must be >= 0 or None, got {time_limit!r}")
    E_fit, refit = E, validation is None
    if refit:
        pick = holdout_split(E.rows, E.cols, holdout, seed, E.shape)
        if int(pick.sum()) == 0:
            raise ValueError("too few observed entries to hold any out: pass validation=")
        E_fit = E.subset(~pick)
        validation = (E.rows[pick], E.cols[pick], E.values[pick])
    r, c, v = (torch.as_tensor(t).to(E.device) for t in validation)
    r, c, v = r.long(), c.long(), v.to(torch.float64)
    if lams is None:
        gen = torch.Generator().manual_seed(seed)
        s1 = float(sparse_top_svd(E_fit, E_fit.values, 1, generator=gen, power_iters=8)[1][0])
        lams = [f * s1 for f in (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)]
    lams = sorted(lams, reverse=True)
    path_budget = None if time_limit is None else (0.8 if refit else 1.0) * time_limit
    Z, best, path, unconverged, rises = None, (math.inf, None, None), [], [], 0
    for lam in lams:
        left = None if path_budget is None else path_budget - (time.perf_counter() - t_start)
        if left is not None and left <= 0 and path:
            break
        Z, info = soft_impute_fit(
            E_fit,
            lam,
            max_rank=max_rank,
            max_iters=max_iters,
            tol=tol,
            init=Z,
            time_limit=None if left is None else max(left, 0.0),
            seed=seed,
        )
        ok = info["status"] == "converged"
        if not ok:
            unconverged.append(lam)
        val = float((Z.predict(r, c) - v).square().mean().sqrt())
        path.append(
            {"lam": lam, "rank": Z.rank, "val_rmse": val, "converged": ok, "n_iters": info["n_iters"]}
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
        Zb, info = soft_impute_fit(
            E, lam_b, max_rank=max_rank, max_iters=max_iters, tol=tol, init=Zb, time_limit=left, seed=seed
        )
        if info["status"] != "converged":
            unconverged.append(lam_b)
    return Zb, lam_b, path, unconverged


def soft_impute_path(
    observed,
    mask,
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
    the observed entries (then refitted on all entries at the chosen lam, warm-started). observed:
    (m, n) dense with ``mask`` (None: the non-NaN entries) or a sparse COO / CSR tensor. ``lams``:
    absolute values (default: ``||P_Omega(M)||_2`` times 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01,
    0.005, 0.002, 0.001 — scale-free). The path stops once the validation RMSE rose twice past its
    best (a smaller lam only fits more noise). ``time_limit`` (seconds) bounds the whole call: each
    lam runs with what is left, the path stops when it is spent, and the refit gets at least the
    last 20% of it.

    Returns (Z of the best lam (m, n), best lam, one dict per lam tried: lam, rank, val_rmse,
    converged, n_iters). Warns once if some lam stopped unconverged.
    """
    from .als import as_entries

    fit, lam, path, unconverged = fit_soft_impute_path(
        as_entries(observed, mask),
        validation,
        lams=lams,
        max_rank=max_rank,
        max_iters=max_iters,
        tol=tol,
        time_limit=time_limit,
        holdout=holdout,
        seed=seed,
    )
    if unconverged:
        warnings.warn(
            f"soft_impute_path: {len(unconverged)} fit(s) stopped unconverged at max_iters={max_iters} "
            f"or the time limit (e.g. lam={unconverged[0]:.3g}); raise max_iters / time_limit",
            RuntimeWarning,
            stacklevel=2,
        )
    return fit.matrix, lam, path
