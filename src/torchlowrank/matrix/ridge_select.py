"""Ridge ALS with its rank, ridge and scaling chosen on held-out entries: the candidate that
:func:`~torchlowrank.matrix.complete` compares with its network and the mean model (and the whole
of its sparse route), on the observed entries only (memory O(|Omega| + (m + n) k^2)).

- :func:`entry_scales`: per-column (or per-row) scales of the observed entries, for data whose
  columns differ in units (a raw table: one column in the thousands, another in thousandths).
  Unscaled least squares fits the large columns and ignores what the small ones say about them;
  ALS of ``M_ij / s_j`` treats every column alike, and ``s_j`` is multiplied back.
- :class:`ScaledALS`: an :class:`~torchlowrank.matrix.ALSResult` of the scaled entries and the
  scales; ``predict(rows, cols)`` in the data's units, never forming the (m, n) matrix.
- :func:`select_ridge_als`: ranks in ascending order (stopping after two that did not improve),
  unscaled and (when the scales spread) scaled, each with its ridge chosen on the held-out entries
  by :func:`~torchlowrank.matrix.als`'s path; the best held-out RMSE in the data's units wins.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .als import ALSResult, als
from .sparse import Entries

__all__ = ["RANK_GRID", "SCALE_SPREAD", "ScaledALS", "entry_scales", "select_ridge_als", "scaled_entries"]

RANK_GRID = (
    1,
    2,
    3,
    5,
    8,
    10,
    12,
    16,
    20,
    24,
    32,
    48,
    64,
)  # ranks tried (those <= min(m, n), and min(m, n) itself)
EXACT = 1e-6  # a held-out RMSE below this fraction of the held-out values' spread ends the rank search
SCALE_SPREAD = 10.0  # scaled candidates are tried when the 90th / 10th percentile of the scales exceeds this


def _spreads(E: Entries, by_cols: bool) -> torch.Tensor:
    """Root mean square of the entries around their column's (row's) mean, per column (row);
    NaN where a column (row) has fewer than 2 entries."""
    idx = E.cols if by_cols else E.rows
    k = E.shape[1] if by_cols else E.shape[0]
    v = E.values.to(torch.float64)
    cnt = torch.bincount(idx, minlength=k).to(torch.float64)
    mean = torch.zeros(k, dtype=torch.float64, device=v.device).index_add_(0, idx, v) / cnt.clamp_min(1)
    var = torch.zeros(k, dtype=torch.float64, device=v.device).index_add_(0, idx, (v - mean[idx]).square())
    sd = (var / cnt.clamp_min(1)).sqrt()
    return torch.where(cnt >= 2, sd, torch.full_like(sd, math.nan))


def entry_scales(E: Entries, spread: float = SCALE_SPREAD) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row_scale (m,), col_scale (n,)) for a scaled fit, or None when the entries' scales do not
    spread: the side (columns or rows) whose spreads (:func:`_spreads`) have the larger ratio of
    their 90th to 10th percentile is scaled if that ratio is at least ``spread``; the other side's
    scales are ones. A column (row) with fewer than 2 entries or a zero spread gets the median."""
    best = None
    for by_cols in (True, False):
        sd = _spreads(E, by_cols)
        ok = sd[torch.isfinite(sd) & (sd > 0)]
        if ok.numel() < 2:
            continue
        q = torch.quantile(ok, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, device=ok.device))
        ratio = float(q[2] / q[0])
        if ratio >= spread and (best is None or ratio > best[0]):
            best = (ratio, by_cols, torch.where(torch.isfinite(sd) & (sd > 0), sd, q[1]))
    if best is None:
        return None
    _, by_cols, s = best
    m, n = E.shape
    ones = torch.ones(m if by_cols else n, dtype=torch.float64, device=s.device)
    return (ones, s) if by_cols else (s, ones)


def scaled_entries(E: Entries, scales: tuple[torch.Tensor, torch.Tensor] | None) -> Entries:
    """The entries ``M_ij / (row_scale_i col_scale_j)`` (E itself when ``scales`` is None)."""
    if scales is None:
        return E
    rs, cs = scales
    d = (rs[E.rows] * cs[E.cols]).to(E.values.dtype)
    return Entries(E.rows, E.cols, E.values / d, E.shape)


@dataclass
class ScaledALS:
    """A ridge ALS fit of the scaled entries: the completion is ``row_scale_i col_scale_j (mu + b_i
    + c_j + U_i . V_j)`` (scales of ones when ``row_scale`` / ``col_scale`` are None). ``result``:
    the :class:`~torchlowrank.matrix.ALSResult` (U (m, k), V (n, k), biases, in scaled units)."""

    result: ALSResult
    row_scale: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.result.U.shape[1])

    @property
    def scaled(self) -> bool:
        return self.row_scale is not None

    def predict(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The completed entries at ``(rows, cols)`` (1-D), float64, in the data's units."""
        p = self.result.predict(rows, cols).to(torch.float64)
        if self.row_scale is None:
            return p
        rows, cols = rows.long().to(p.device), cols.long().to(p.device)
        return p * self.row_scale[rows] * self.col_scale[cols]

    def dense(self) -> torch.Tensor:
        """The (m, n) completed matrix, float64 (O(m n) memory)."""
        M = self.result.matrix.to(torch.float64)
        if self.row_scale is None:
            return M
        return M * self.row_scale[:, None] * self.col_scale[None, :]


def _rmse(pred: torch.Tensor, vals: torch.Tensor) -> float:
    return float((pred - vals.to(pred.dtype)).square().mean().sqrt())


def select_ridge_als(
    E_fit: Entries,
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    suggested_rank: int | None = None,
    max_rank: int | None = None,
    seed: int = 0,
    deadline: float | None = None,
    dtype: torch.dtype = torch.float64,
    more_splits: list[tuple[Entries, tuple]] = (),
    tol: float = 1e-7,
    stop_at: float = EXACT,
) -> tuple[float, ScaledALS] | None:
    """The best ridge ALS with biases on ``E_fit`` by its RMSE on ``val = (rows, cols, values)``
    (data units): ranks :data:`RANK_GRID`, ``suggested_rank`` and the cap (all at most ``max_rank``
    and min(m, n)), in ascending order until two in a row did not improve or one fits the held-out
    entries to ``stop_at`` (default :data:`EXACT`) of their spread (exact low-rank data); unscaled, then scaled by
    :func:`entry_scales` when the scales spread; the ridge of each chosen on the held-out entries
    by :func:`~torchlowrank.matrix.als`. ``more_splits``: further (fit entries, held-out entries)
    splits of the same data; a (rank, scaling) is then scored by its mean held-out RMSE over all
    splits (a steadier choice where a few large entries dominate one split's RMSE), and the fit
    returned is the one on ``E_fit``. ``tol``: each candidate's own stopping tolerance after its
    ridge is chosen (:func:`~torchlowrank.matrix.als`'s; the refit on all entries converges
    further). Each fit gets a quarter of the time left to ``deadline`` (a
    ``time.perf_counter()`` value). Returns (RMSE on ``val``, :class:`ScaledALS`) or None when
    nothing beat the mean model or no time was left."""
    m, n = E_fit.shape
    cap = min(m, n) if max_rank is None else max(1, min(m, n, max_rank))
    ranks = {r for r in RANK_GRID if r <= cap} | ({min(suggested_rank, cap)} if suggested_rank else set())
    ranks = sorted(ranks | ({cap} if cap < RANK_GRID[-1] else set()))
    splits = [(E_fit, val)] + list(more_splits)
    scale = float((val[2].to(torch.float64) - val[2].to(torch.float64).mean()).square().mean().sqrt())
    scalings: list = [None]
    sc = entry_scales(E_fit)
    if sc is not None:
        scalings.append(sc)
    best: tuple[float, float, ScaledALS] | None = None  # (mean score, RMSE on val, fit on E_fit)
    for scales in scalings:
        worse, own = 0, math.inf  # the stopping rule compares ranks within this scaling
        for r in ranks:
            scores, first = [], None
            for Ef, (vr, vc, vv) in splits:
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    return None if best is None else (best[1], best[2])
                vv = vv.to(torch.float64)
                d_val = None if scales is None else (scales[0][vr] * scales[1][vc])
                res = als(
                    scaled_entries(Ef, scales),
                    None,
                    r,
                    validation=(vr, vc, vv if d_val is None else vv / d_val),
                    time_limit=None if left is None else 0.25 * left,
                    seed=seed,
                    warn=False,
                    dtype=dtype,
                    tol=tol,
                )
                if res.status == "mean_model" or not res.reg_path:
                    scores = None
                    break
                cand = ScaledALS(res, *((None, None) if scales is None else scales))
                scores.append(_rmse(cand.predict(vr, vc), vv))
                first = first or cand
            if scores is None:
                worse += 1
                if worse >= 2:
                    break
                continue
            score = sum(scores) / len(scores)
            if best is None or score < best[0]:
                best = (score, scores[0], first)
            if score <= stop_at * scale:  # fitted to rounding: exact low-rank data, larger ranks add nothing
                return best[1], best[2]
            if score < own:
                own, worse = score, 0
            else:
                worse += 1
                if worse >= 2:
                    break
    return None if best is None else (best[1], best[2])


def refit_ridge_als(
    chosen: ScaledALS, E_all: Entries, *, seed: int = 0, time_limit: float | None = None, tol: float = 1e-7
) -> ScaledALS:
    """``chosen`` refitted on all entries ``E_all`` at its rank, ridge and scales, warm-started
    from its factors (:func:`~torchlowrank.matrix.als` with ``init``, stopping at its ``tol``)."""
    scales = None if chosen.row_scale is None else (chosen.row_scale, chosen.col_scale)
    res = chosen.result
    out = als(
        scaled_entries(E_all, scales),
        None,
        chosen.rank,
        reg=res.reg,
        bias_reg=res.bias_reg,
        time_limit=time_limit,
        seed=seed,
        warn=False,
        init=res,
        dtype=res.U.dtype,
        tol=tol,
    )
    return ScaledALS(out, chosen.row_scale, chosen.col_scale)
