"""The mean model of a partly observed matrix: ``mu + b_i + c_j`` (global mean, row and column
biases) fitted to the observed entries by ridge-regularised alternating least squares — the
"baseline" predictor of recommender systems (Koren 2008), used by :func:`complete` to centre the
data before the low-rank part is fitted, and as the prediction for rows / columns that have no
observed entry."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MeanModel", "fit_mean_model", "holdout_split", "best_mean_model"]


@dataclass
class MeanModel:
    """mu: global mean; row: (m,) row biases; col: (n,) column biases (0 for unobserved ones);
    row_counts (m,) / col_counts (n,): observed entries per row / column.

    Also the simplest completion estimator, with the interface of the others
    (:class:`~torchlowrank.matrix.estimators.DeepMatrixCompleter`, ...): ``MeanModel(center="biases",
    reg="auto").fit(X, mask)`` fits ``mu + b_i + c_j`` (the bias ridge chosen on a seeded 10% of
    the observed entries when ``reg="auto"``, then refitted on all), then ``predict(rows, cols)``,
    ``transform()`` / ``completed_`` (the dense matrix)."""

    mu: float = 0.0
    row: torch.Tensor | None = None
    col: torch.Tensor | None = None
    row_counts: torch.Tensor | None = None
    col_counts: torch.Tensor | None = None
    center: str = "biases"
    reg: float | str = "auto"
    seed: int = 0

    def fit(self, X, mask=None) -> MeanModel:
        """Fit to the observed entries of X (dense with ``mask`` / NaN, or sparse); returns self."""
        from .als import as_entries

        if self.center not in ("biases", "mean", "none"):
            raise ValueError(f"center must be 'biases', 'mean' or 'none', got {self.center!r}")
        E = as_entries(X, mask)
        reg = self.reg
        if reg == "auto":
            pick = holdout_split(E.rows, E.cols, 0.1, self.seed, E.shape)
            if int(pick.sum()) >= 10:
                keep = ~pick
                _, reg, _ = best_mean_model(
                    E.rows[keep],
                    E.cols[keep],
                    E.values[keep],
                    E.shape,
                    (E.rows[pick], E.cols[pick], E.values[pick]),
                    self.center,
                )
            else:
                reg = 10.0
        elif not (isinstance(reg, (int, float)) and reg >= 0):
            raise ValueError(f"reg must be a number >= 0 or 'auto', got {reg!r}")
        mm = fit_mean_model(E.rows, E.cols, E.values, E.shape, center=self.center, reg=float(reg))
        self.mu, self.row, self.col, self.row_counts, self.col_counts = (
            mm.mu,
            mm.row,
            mm.col,
            mm.row_counts,
            mm.col_counts,
        )
        self.reg_ = float(reg)
        self.n_iter_ = 10
        self.history_ = {}
        return self

    def transform(self, X=None) -> torch.Tensor:
        """The completed (m, n) matrix (the argument is ignored: the fitted matrix)."""
        return self.dense()

    @property
    def completed_(self) -> torch.Tensor:
        return self.dense()

    def get_params(self, deep: bool = True) -> dict:
        return {"center": self.center, "reg": self.reg, "seed": self.seed}

    @property
    def shape(self) -> tuple[int, int]:
        return (self.row.numel(), self.col.numel())

    def predict(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``mu + row[rows] + col[cols]`` (same shape as ``rows``)."""
        return self.mu + self.row[rows] + self.col[cols]

    def dense(self) -> torch.Tensor:
        """The (m, n) matrix ``mu + row[:, None] + col[None, :]``."""
        return self.mu + self.row[:, None] + self.col[None, :]

    def transpose(self) -> MeanModel:
        return MeanModel(self.mu, self.col, self.row, self.col_counts, self.row_counts)

    def scaled(self, a: float, shift: float = 0.0) -> MeanModel:
        """The mean model of ``a * M + shift``."""
        return MeanModel(a * self.mu + shift, a * self.row, a * self.col, self.row_counts, self.col_counts)


def fit_mean_model(
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    shape: tuple[int, int],
    center: str = "biases",
    reg: float = 10.0,
    sweeps: int = 10,
) -> MeanModel:
    """Fit ``mu + b_i + c_j`` to ``values`` at ``(rows, cols)`` (1-D, same length).

    center: "biases" (global mean plus ridge row / column biases: ``b_i = sum_j (M_ij - mu - c_j)
    / (n_i + reg)`` and the same for c, alternated ``sweeps`` times; ``reg`` is in units of
    observed entries, so it does not depend on the data's scale), "mean" (global mean only) or
    "none" (all zero). Rows / columns without observations get bias 0.
    """
    if center not in ("biases", "mean", "none"):
        raise ValueError(f"center must be 'biases', 'mean' or 'none', got {center!r}")
    if not reg >= 0:
        raise ValueError(f"reg must be >= 0, got {reg!r}")
    m, n = shape
    v = values.to(torch.float64)
    dev = v.device
    rc = torch.bincount(rows, minlength=m).to(torch.float64)
    cc = torch.bincount(cols, minlength=n).to(torch.float64)
    b = torch.zeros(m, dtype=torch.float64, device=dev)
    c = torch.zeros(n, dtype=torch.float64, device=dev)
    if center == "none":
        return MeanModel(0.0, b, c, rc, cc)
    mu = float(v.mean())
    if center == "biases":
        r = v - mu
        # reg = 0 with a row observed nowhere would divide 0 by 0: such rows keep bias 0
        rden, cden = (rc + reg).clamp_min(1e-300), (cc + reg).clamp_min(1e-300)
        for _ in range(sweeps):
            c = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, cols, r - b[rows]) / cden
            b = torch.zeros(m, dtype=torch.float64, device=dev).index_add_(0, rows, r - c[cols]) / rden
    return MeanModel(mu, b, c, rc, cc)


def holdout_split(
    rows: torch.Tensor, cols: torch.Tensor, fraction: float, seed: int, shape: tuple[int, int]
) -> torch.Tensor:
    """A seeded random boolean pick of about ``fraction`` of the observed entries ``(rows, cols)``
    to hold out, never the last entry of a row or column (an entry whose row and column both keep
    at least one other observed entry). The draw is a function of the entries' positions only
    (a seeded permutation of the entries sorted row-major in the caller's orientation), so a matrix
    and its transpose hold out the same entries."""
    m, n = shape
    dev = rows.device
    g = torch.Generator().manual_seed(seed)
    key = rows * n + cols
    order = torch.argsort(key)
    N = rows.numel()
    u = torch.empty(N, dtype=torch.float64, device="cpu")
    u[order.cpu()] = torch.rand(N, generator=g, dtype=torch.float64, device="cpu")
    pick = u.to(dev) < fraction
    # keep at least one entry in every row / column: drop a pick whose row or column would empty
    rc = torch.bincount(rows, minlength=m)
    cc = torch.bincount(cols, minlength=n)
    rk = rc - torch.bincount(rows[pick], minlength=m)
    ck = cc - torch.bincount(cols[pick], minlength=n)
    bad = pick & ((rk[rows] == 0) | (ck[cols] == 0))
    return pick & ~bad


def _rmse_entries(pred: torch.Tensor, vals: torch.Tensor) -> float:
    return float((pred - vals).square().mean().sqrt())


def best_mean_model(
    rows,
    cols,
    vals,
    shape,
    val_entries,
    center: str = "biases",
    regs: tuple[float, ...] = (0.0, 1.0, 3.0, 10.0, 30.0),
) -> tuple[MeanModel, float, float]:
    """The mean model ``mu + b_i + c_j`` with the bias ridge ``reg`` (in units of observed entries)
    chosen on ``val_entries = (rows, cols, values)`` among ``regs``. Returns (model fitted on the
    given entries, chosen reg, its validation RMSE)."""
    vr, vc, vv = val_entries
    best = (math.inf, None, None)
    for reg in regs if center == "biases" else (0.0,):
        mm = fit_mean_model(rows, cols, vals, shape, center=center, reg=reg)
        e = _rmse_entries(mm.predict(vr, vc), vv)
        if e < best[0]:
            best = (e, reg, mm)
    return best[2], best[1], best[0]
