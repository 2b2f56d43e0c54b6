"""A fast path for exactly low-rank data, tried by :func:`~torchlowrank.matrix.complete` before
anything else.

On exactly low-rank data the full machinery (a network; a rank search with a ridge path per rank)
costs many times what a plain ALS at the true rank with a negligible ridge needs to recover the
matrix. The rank shows as the largest drop in the spectrum of the centred observations
``P_Omega(M - mean model)`` (their top singular values are those of the low-rank part plus the
sampling's noise, which is flat across the tail). So:

1. the top :data:`SPECTRUM_RANKS` singular values and vectors of the centred observations
   (:func:`~torchlowrank.matrix.sparse.sparse_top_svd`, a few CSR products);
2. candidate ranks: the rank the caller expects, if any, then the (at most
   :data:`MAX_CANDIDATES`) largest ratios ``s_k / s_{k+1}`` that are at least :data:`MIN_GAP`,
   largest first;
3. for each, ALS with biases from the spectral start (``U_k sqrt(s_k / p)``, p the sampling rate)
   at the ridge ``reg = 1e-10`` (relative to ``s_1``), sweeping until the held-out RMSE is at most
   :data:`~torchlowrank.matrix.ridge_select.EXACT` of the held-out values' spread — exactly
   low-rank data, recovered — or until, at its rate over the last :data:`PATIENCE` sweeps, it
   would not get there within :data:`MAX_SWEEPS`: not exact data (noise is what keeps the
   held-out error up, so it stalls or rises), give up.

The spectrum comes from :data:`QUICK_POWER_ITERS` = 4 power iterations (as ALS's own spectral
start) when that shows a drop of at least :data:`MIN_GAP` at the rank to try (the given one, or
any candidate), and else again from :data:`POWER_ITERS` = 12: where the sampling noise flattens
the spectrum the start is what decides whether ALS converges, and 4 iterations leave the subspace
far from converged (on the 100,000 x 50,000 case the top-20 directions held 0.31 of the true
column space's energy after 4, 0.62 after 12, 0.63 for an exact Lanczos SVD; ALS from the first
rose after 18 sweeps, from the second it converged). A clear drop needs no more (2000 x 1500,
rank 10, 5 %: s_10 / s_11 = 1.31 after 4 and 1.31 after 12), and there the 12 iterations were a
third of the time of ``complete(tol=1e-4)``.

The fit uses all observed entries but a check set (:func:`check_entries`: 1 % of them, at least
:data:`CHECK_MIN`, drawn from the caller's held-out ones): near the information limit every entry
counts — a 10 % hold-out left ALS on 1.5x the degrees of freedom diverging where 1.65x
converges — and a fit to 1e-6 on a thousand entries it never saw is proof enough of exactness.

On noisy data the screen costs one randomized SVD and a few sweeps per candidate, then the
caller goes on as if it had not run. Where the observations are barely enough (1.7x the degrees
of freedom: 5 M entries of a rank-20 100,000 x 50,000 matrix) the sampling noise hides the drop
in the spectrum, so only a rank given by the caller is tried (or, after the ridge ALS rank search,
the rank it chose when that fitted the held-out entries to 1e-2 of their spread:
``complete()`` calls the screen again with ``spectrum_ranks=False``), and ALS converges slowly but
steadily (the held-out error fell 3-20 % a sweep there): the rate rule keeps it going, where a fixed
"halve every few sweeps" rule gave up on data it would have recovered.
"""

from __future__ import annotations

import math
import time

import torch

from .als import _Fit, spectral_start
from .ridge_select import EXACT, ScaledALS
from .sparse import Entries

__all__ = [
    "CHECK_FRACTION",
    "CHECK_MIN",
    "MAX_CANDIDATES",
    "MIN_GAP",
    "PATIENCE",
    "SPECTRUM_RANKS",
    "check_entries",
    "fit_if_exactly_low_rank",
]

SPECTRUM_RANKS = 64  # singular values computed; the candidate ranks are below this
MIN_GAP = 1.1  # s_k / s_{k+1} at least this for k to be a candidate rank
MAX_CANDIDATES = 3
PATIENCE = 5  # sweeps over which the held-out RMSE's rate of fall is measured
MAX_SWEEPS = 500
QUICK_POWER_ITERS = 4  # of the spectrum's randomized SVD, first (ALS's own spectral start uses as many)
POWER_ITERS = 12  # ... again, where that showed no drop (see the module docstring)
CHECK_FRACTION = 0.01  # of the observed entries: the screen's check set
CHECK_MIN = 1000
SCREEN_REG = 1e-10  # the relative ridge of the screen's ALS: none, in effect


def candidate_ranks(S: torch.Tensor, max_rank: int) -> list[int]:
    """Ranks k <= ``max_rank`` at the largest drops ``S[k-1] / S[k]`` >= :data:`MIN_GAP` of the
    decreasing singular values ``S`` (K,), largest drop first, at most :data:`MAX_CANDIDATES`."""
    K = min(int(S.numel()) - 1, max_rank)
    if K < 1 or not float(S[K]) > 0:
        return []
    ratios = S[:K] / S[1 : K + 1]
    order = torch.argsort(ratios, descending=True)[:MAX_CANDIDATES]
    return [int(i) + 1 for i in order if float(ratios[i]) >= MIN_GAP]


def check_entries(held: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The screen's check set (N,) bool: a seeded random :data:`CHECK_FRACTION` of the N observed
    entries, at least :data:`CHECK_MIN`, drawn from ``held`` (N,) bool, the entries the caller
    holds out (all of them when there are no more); the screen fits on the rest."""
    idx = held.nonzero().squeeze(1)
    k = max(CHECK_MIN, math.ceil(CHECK_FRACTION * held.numel()))
    if idx.numel() <= k:
        return held
    keep = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))[:k].to(idx.device)
    out = torch.zeros_like(held)
    out[idx[keep]] = True
    return out


def _on_course(curve: list[float], target: float, sweeps_left: int) -> bool:
    """Whether the held-out RMSE ``curve`` (one value a sweep), falling at its geometric rate over
    the last :data:`PATIENCE` sweeps, reaches ``target`` within ``sweeps_left`` more sweeps."""
    rate = (curve[-1] / curve[-1 - PATIENCE]) ** (1 / PATIENCE)
    if not rate < 1:
        return False
    return math.log(target / curve[-1]) / math.log(rate) <= sweeps_left


@torch.no_grad()
def fit_if_exactly_low_rank(
    E_fit: Entries,
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    max_rank: int | None = None,
    seed: int = 0,
    deadline: float | None = None,
    dtype: torch.dtype = torch.float64,
    tol: float = EXACT,
    rank: int | None = None,
    rank_source: str = "the rank passed",
    spectrum_ranks: bool = True,
) -> tuple[float, ScaledALS] | None:
    """ALS at ``rank`` (the caller's expected rank, if given; ``rank_source`` says where it came
    from, for the message) and, with ``spectrum_ranks``, at the ranks read off the spectrum of
    ``E_fit``'s centred entries, kept when it fits the held-out entries ``val = (rows, cols,
    values)`` to ``tol`` (default :data:`~torchlowrank.matrix.ridge_select.EXACT`) of their spread
    (module docstring). Returns (held-out RMSE, :class:`ScaledALS` fitted on ``E_fit`` with status
    "converged") or None: not exactly low rank at any candidate rank, or the ``deadline`` (a
    ``time.perf_counter()`` value) came first."""
    m, n = E_fit.shape
    vr, vc, vv = val
    vv = vv.to(dtype)
    spread = float((vv - vv.mean()).square().mean().sqrt())
    cap = min(m, n) - 1 if max_rank is None else min(max_rank, min(m, n) - 1)
    if cap < 1 or not spread > 0:
        return None
    values = E_fit.values.to(dtype)
    mu = float(values.double().mean())
    given = [rank] if rank is not None and 1 <= rank <= cap else []
    top = min(SPECTRUM_RANKS, cap) if spectrum_ranks else 0  # the spectrum the candidate ranks are read from
    if not given and not top:
        return None
    K = max([top] + given) + 1

    def spectrum(power_iters: int):
        return spectral_start(
            E_fit, K, mu, torch.Generator().manual_seed(seed), dtype, power_iters=power_iters
        )

    b0, c0, Us, S, Vs = spectrum(QUICK_POWER_ITERS)
    if not float(S[0]) > 0:
        return None
    drop = (
        float(S[given[0] - 1] / S[given[0]]) >= MIN_GAP if given else bool(candidate_ranks(S[: top + 1], cap))
    )
    if not drop:
        b0, c0, Us, S, Vs = spectrum(POWER_ITERS)
    lam = SCREEN_REG * float(S[0])
    bias_reg = 0.0
    p = len(E_fit) / (m * n)
    E = Entries(E_fit.rows, E_fit.cols, values, (m, n))
    spectral = [k for k in candidate_ranks(S[: top + 1], cap) if k not in given] if top else []
    for k in given + spectral:
        sq = (S[:k] / p).sqrt()
        fit = _Fit(E, mu, Us[:, :k] * sq, Vs[:, :k] * sq, b0.clone(), c0.clone())
        curve: list[float] = []
        last = 0.0
        for sweep in range(1, MAX_SWEEPS + 1):
            if deadline is not None and time.perf_counter() + last > deadline:
                return None
            t0 = time.perf_counter()
            fit.half(lam, bias_reg, True)
            fit.half(lam, bias_reg, False)
            v = fit.val_rmse((vr, vc, vv))
            last = time.perf_counter() - t0
            curve.append(v)
            if not math.isfinite(v):
                break
            if v <= tol * spread:
                res = fit.result(
                    "converged",
                    sweep,
                    lam,
                    SCREEN_REG,
                    bias_reg,
                    "tol",
                    val_rmse=curve,
                    reg_path=[
                        {"reg": SCREEN_REG, "lam": lam, "val_rmse": v, "sweeps": sweep, "converged": True}
                    ],
                    holdout_rmse=v,
                    message=(
                        f"exactly low rank: rank {k} ("
                        + (
                            rank_source
                            if k in given
                            else "a large drop of the spectrum of the centred observations"
                        )
                        + f") fitted the held-out entries to {v / spread:.1e} of their spread in {sweep} ALS sweeps"
                    ),
                )
                return v, ScaledALS(res)
            if len(curve) > PATIENCE and not _on_course(curve, tol * spread, MAX_SWEEPS - sweep):
                break  # noise (or the wrong rank) holds the error up
    return None
