"""Alternating least squares (ALS) with a ridge penalty and row / column biases: the classical
factorization baseline for matrix completion, on the observed entries only,

    min_{U (m, k), V (n, k), b, c}  1/2 sum_{(i,j) in Omega} (mu + b_i + c_j + U_i . V_j - M_ij)^2
                                    + lam/2 (||U||_F^2 + ||V||_F^2) + bias_reg/2 (||b||^2 + ||c||^2),

``mu`` the mean of the observed entries (fixed). Each half-sweep solves exactly, for every row at
once, ``(U_i, b_i)`` from ``(G_i + diag(lam, .., lam, bias_reg)) x_i = h_i`` with the (k+1) x (k+1)
Gram matrix ``G_i = sum_{j in Omega_i} f_j f_j^T``, ``f_j = (V_j, 1)``, formed by index arithmetic
on the observed entries, a block of rows at a time
(:func:`~torchlowrank.matrix.sparse.ridge_solve_rows`): a sweep costs O(|Omega| k^2 + (m + n) k^3)
time and O(|Omega| + (m + n) k) memory, never O(m n).

``lam = reg * s_1`` with ``s_1`` the top singular value of the centred observations
``P_Omega(M - mean model)``: ``reg`` is relative, so ALS is invariant to the data's scale
(``min (||U||^2 + ||V||^2) / 2`` over factorizations of X is the nuclear norm of X, so lam is on the
scale of singular values, like soft-impute's). ``bias_reg`` is in units of observed entries
(``b_i = sum_j r_ij / (n_i + bias_reg)``), scale-free too; by default ``REG_TO_BIAS * reg``.

``reg="auto"`` (the default) chooses the ridge on held-out entries: a seeded 10% of the observed
entries (or the given ``validation``) and a warm-started path of decreasing ``reg``; then, without
a validation set, a refit on all entries at the chosen ``reg``. A result that does not beat the
mean model (``mu + b_i + c_j`` alone) on the held-out entries is replaced by it (status
"mean_model").
"""

from __future__ import annotations

import math
import operator
import time
import warnings
from dataclasses import dataclass, field

import torch

from .centering import best_mean_model, fit_mean_model, holdout_split
from .inputs import as_tensor
from .sparse import Entries, entry_dots, ridge_solve_rows, sparse_top_svd

__all__ = ["ALSResult", "als", "REG_GRID", "REG_TO_BIAS", "as_entries"]

REG_GRID = (
    1.0,
    0.5,
    0.3,
    0.2,
    0.12,
    0.08,
    0.05,
    0.03,
    0.02,
    0.01,
    0.005,
    0.002,
    1e-3,
    1e-4,
    1e-5,
    1e-6,
    1e-10,
)
REG_TO_BIAS = 30.0  # bias ridge (in observed entries) per unit of the relative ridge reg


@dataclass
class ALSResult:
    """U (m, k), V (n, k), ``mu``, ``row_bias`` (m,), ``col_bias`` (n,): the completed matrix is
    ``mu + b_i + c_j + U_i . V_j`` (``matrix`` forms it densely on first access: O(m n); prefer
    :meth:`predict` for large matrices). status "converged" | "not_converged" | "mean_model";
    reason ("tol", "max_iters", "time_limit", "validation"); n_iters (sweeps of the final fit);
    lam (absolute ridge) and reg (relative); bias_reg; train_rmse / val_rmse per sweep of the final
    fit; reg_path: one dict per ridge tried (reg, lam, val_rmse, sweeps, converged); holdout_rmse /
    mean_model_rmse on the held-out entries; wall_time (s)."""

    U: torch.Tensor
    V: torch.Tensor
    mu: float
    row_bias: torch.Tensor
    col_bias: torch.Tensor
    status: str
    n_iters: int
    lam: float
    reg: float = 0.0
    bias_reg: float = 0.0
    reason: str = ""
    train_rmse: list[float] = field(default_factory=list)
    val_rmse: list[float] = field(default_factory=list)
    reg_path: list[dict] = field(default_factory=list)
    holdout_rmse: float | None = None
    mean_model_rmse: float | None = None
    message: str = ""
    wall_time: float = 0.0
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.V.shape[0])

    @property
    def matrix(self) -> torch.Tensor:
        cached = self.__dict__.get("_matrix")
        if cached is None:
            cached = self.U @ self.V.T + self.row_bias[:, None] + self.col_bias[None, :] + self.mu
            self.__dict__["_matrix"] = cached
        return cached

    def predict(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The completed entries at ``(rows, cols)`` (1-D), without forming the matrix."""
        rows, cols = rows.long().to(self.U.device), cols.long().to(self.U.device)
        return entry_dots(self.U, self.V, rows, cols) + self.row_bias[rows] + self.col_bias[cols] + self.mu

    @property
    def ok(self) -> bool:
        return self.status == "converged"


def as_entries(observed, mask=None, dtype: torch.dtype = torch.float64) -> Entries:
    """The observed entries of ``observed``: a dense (m, n) tensor / NumPy array with ``mask``
    (bool; None: the non-NaN entries), a sparse COO / CSR tensor (its stored entries; ``mask``
    must be None), a scipy.sparse matrix / array (its stored entries) or an
    :class:`~torchlowrank.matrix.sparse.Entries` (returned as is, in ``dtype``). Sparse inputs are never densified. ValueError for a shape mismatch, an empty
    mask or NaN / Inf in an observed entry."""
    if isinstance(observed, Entries):
        if mask is not None:
            raise ValueError("Entries define their own observed entries: pass mask=None")
        if len(observed) == 0:
            raise ValueError("the mask observes no entries; mark at least one observed entry True")
        if observed.values.dtype == dtype:
            return observed
        return Entries(observed.rows, observed.cols, observed.values.to(dtype), observed.shape)
    if hasattr(observed, "tocoo") and not isinstance(observed, torch.Tensor):  # a scipy.sparse matrix / array
        if mask is not None:
            raise ValueError(
                "a sparse observed matrix defines its own mask (its stored entries): pass mask=None"
            )
        coo = observed.tocoo()
        coo.sum_duplicates()
        rows, cols = torch.from_numpy(coo.row.astype("int64")), torch.from_numpy(coo.col.astype("int64"))
        vals = torch.from_numpy(coo.data).to(dtype)
        if rows.numel() == 0:
            raise ValueError("the sparse matrix stores no entries; store at least one observed entry")
        if not bool(torch.isfinite(vals).all()):
            raise ValueError("observed entries contain NaN/Inf; drop them from the sparse matrix")
        return Entries(rows, cols, vals, tuple(int(x) for x in coo.shape))
    observed, mask = as_tensor(observed), as_tensor(mask)
    if not isinstance(observed, torch.Tensor) or observed.ndim != 2:
        raise ValueError("observed must be a 2-D torch tensor or NumPy array (m, n)")
    if observed.layout != torch.strided:
        if mask is not None:
            raise ValueError(
                "a sparse observed matrix defines its own mask (its stored entries): pass mask=None"
            )
        coo = observed.to_sparse_coo().coalesce()
        idx, vals = coo.indices(), coo.values()
        rows, cols = idx[0], idx[1]
    else:
        if mask is None:
            mask = ~torch.isnan(observed)
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a boolean tensor (m, n), got {type(mask).__name__}")
        if mask.shape != observed.shape:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but observed has {tuple(observed.shape)}; "
                "pass a boolean mask of the same shape as the matrix"
            )
        mask = mask.to(observed.device)
        rows, cols = mask.to(torch.bool).nonzero(as_tuple=True)
        vals = observed[rows, cols]
    if rows.numel() == 0:
        raise ValueError("the mask observes no entries; mark at least one observed entry True")
    vals = vals.to(dtype)
    if not bool(torch.isfinite(vals).all()):
        raise ValueError("observed entries contain NaN/Inf; drop them from the mask")
    return Entries(rows, cols, vals, tuple(observed.shape))


class _Fit:
    """The ALS state on a set of entries: factors, biases; sweeps with a deadline."""

    def __init__(self, E: Entries, mu: float, U, V, b, c):
        self.E, self.mu, self.U, self.V, self.b, self.c = E, mu, U, V, b, c
        self.y = E.values - mu
        self._workspace: dict = {}  # ridge_solve_rows' buffers, reused sweep after sweep

    def predict(self, rows, cols):
        return entry_dots(self.U, self.V, rows, cols) + self.b[rows] + self.c[cols]

    def half(self, lam: float, bias_reg: float, rows_side: bool) -> None:
        E = self.E
        k = self.U.shape[1]
        dt, dev = self.U.dtype, self.U.device
        diag = torch.full((k + 1,), lam, dtype=dt, device=dev)
        diag[k] = bias_reg
        other = self.V if rows_side else self.U
        F = torch.cat([other, torch.ones(other.shape[0], 1, dtype=dt, device=dev)], 1)
        x, sse = ridge_solve_rows(
            E,
            F,
            self.y,
            diag,
            offset=self.c if rows_side else self.b,
            transpose=not rows_side,
            workspace=self._workspace,
        )
        if rows_side:
            self.U, self.b = x[:, :k].contiguous(), x[:, k].contiguous()
        else:
            self.V, self.c = x[:, :k].contiguous(), x[:, k].contiguous()
            self._sse = float(sse)  # the train SSE after the sweep: one host sync per sweep

    def train_rmse(self, scale: float) -> float:
        """From the last half-sweep's normal equations; recomputed from the entries when that
        estimate is below 1e-6 of ``scale`` (where its cancellation error would show)."""
        E = self.E
        rmse = math.sqrt(max(self._sse, 0.0) / len(E))
        if rmse <= 1e-6 * scale or not math.isfinite(rmse):
            rmse = float((self.predict(E.rows, E.cols) - self.y).square().mean().sqrt())
        return rmse

    def run(self, lam, bias_reg, max_sweeps, tol, deadline, val=None, record=None, val_tol=None):
        """Sweeps until the train RMSE's relative change <= tol (or RMSE <= 1e-2 tol * scale) —
        and, with ``val_tol``, the validation RMSE's relative change <= val_tol too —, max_sweeps,
        or the deadline (a sweep is not started when the last one would end past it).
        Returns (reason, sweeps)."""
        scale = max(float(self.y.square().mean().sqrt()), 1e-300)
        prev, prev_v, last = math.inf, math.inf, 0.0
        for it in range(1, max_sweeps + 1):
            if deadline is not None and time.perf_counter() + last > deadline:
                return "time_limit", it - 1
            t0 = time.perf_counter()
            self.half(lam, bias_reg, True)
            self.half(lam, bias_reg, False)
            rmse = self.train_rmse(scale)  # one host sync per sweep
            v = (
                self.val_rmse(val)
                if val is not None and (record is not None or val_tol is not None)
                else None
            )
            last = time.perf_counter() - t0
            if record is not None:
                record["train"].append(rmse)
                if v is not None:
                    record["val"].append(v)
            if not math.isfinite(rmse):
                return "diverged", it
            val_still = val_tol is not None and v is not None and not abs(prev_v - v) <= val_tol * prev_v
            if ((it > 1 and abs(prev - rmse) <= tol * prev) or rmse <= 1e-2 * tol * scale) and not val_still:
                return "tol", it
            prev, prev_v = rmse, v if v is not None else prev_v
        return "max_iters", max_sweeps

    def result(
        self, status: str, n_iters: int, lam: float, reg: float, bias_reg: float, reason: str, **fields
    ) -> ALSResult:
        """This state as an :class:`ALSResult` (``fields``: its other fields by name)."""
        return ALSResult(
            self.U, self.V, self.mu, self.b, self.c, status, n_iters, lam, reg, bias_reg, reason, **fields
        )

    def val_rmse(self, val) -> float:
        r, c, v = val
        return float((self.predict(r, c) + self.mu - v).square().mean().sqrt())

    def state(self):
        return (self.U.clone(), self.V.clone(), self.b.clone(), self.c.clone())

    def load(self, st):
        self.U, self.V, self.b, self.c = (x.clone() for x in st)


def spectral_start(E: Entries, k: int, mu: float, generator: torch.Generator, dtype, power_iters: int = 4):
    """The mean model (bias ridge 1) of the entries and the top-``k`` SVD of its residual
    (:func:`~torchlowrank.matrix.sparse.sparse_top_svd` with ``power_iters``):
    ``(b (m,), c (n,), Us (m, k), S (k,), Vs (n, k))``; ``Us * sqrt(S / p)``, ``Vs * sqrt(S / p)``
    (p the sampling rate) are balanced factors of the residual's rank-k part, the spectral start of
    ALS."""
    mm = fit_mean_model(E.rows, E.cols, E.values.to(torch.float64), E.shape, reg=1.0)
    b, c = mm.row.to(dtype), mm.col.to(dtype)
    r = (E.values - mu - b[E.rows] - c[E.cols]).to(dtype)
    Us, S, Vs = sparse_top_svd(E, r, k, generator=generator, dtype=dtype, power_iters=power_iters)
    return b, c, Us, S, Vs


def _init(E: Entries, rank: int, mu: float, seed: int, dtype):
    """:func:`spectral_start` at ``rank`` with a small seeded perturbation; and s_1 of the residual
    (for lam)."""
    m, n = E.shape
    g = torch.Generator().manual_seed(seed)
    b, c, Us, S, Vs = spectral_start(E, rank, mu, g, dtype)
    p = len(E) / (m * n)
    s1 = float(S[0]) if S.numel() else 0.0
    sq = (S / p).clamp_min(0).sqrt()
    noise = 1e-3 * float(sq.mean()) if sq.numel() else 0.0
    U = Us * sq + noise * torch.randn(m, rank, generator=g, dtype=dtype, device="cpu").to(E.device)
    V = Vs * sq + noise * torch.randn(n, rank, generator=g, dtype=dtype, device="cpu").to(E.device)
    return U, V, b, c, s1


def _as_val(validation, dev, dtype):
    r, c, v = validation
    r = r if isinstance(r, torch.Tensor) else torch.as_tensor(r)
    c = c if isinstance(c, torch.Tensor) else torch.as_tensor(c)
    v = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    return r.long().to(dev), c.long().to(dev), v.to(dev, dtype)


@torch.no_grad()
def als(
    observed,
    mask=None,
    rank: int = 10,
    *,
    reg="auto",
    bias_reg: float | None = None,
    max_iters: int = 500,
    tol: float = 1e-7,
    validation: tuple | None = None,
    holdout: float = 0.1,
    time_limit: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    warn: bool = True,
    init: ALSResult | None = None,
) -> ALSResult:
    """Ridge ALS with row / column biases at rank ``rank`` on the observed entries (module
    docstring). observed: (m, n) dense with ``mask`` (None: the non-NaN entries) or a sparse COO /
    CSR tensor. Everything stays on observed's device, in ``dtype`` (float64 or float32).

    reg: the relative ridge (``lam = reg * s_1``), or "auto" (default): chosen on ``validation =
    (rows, cols, values)`` or, without one, on a seeded ``holdout`` fraction of the observed
    entries (then refitted on all of them), over :data:`REG_GRID` from large to small with warm
    starts (the path stops once the held-out RMSE rose twice past its best; when it fell by a
    quarter at each of two steps in a row, as on exactly low-rank data, the smallest ridge is tried
    at once and kept if it is better). A result not better
    than the mean model on the held-out entries is replaced by the mean model (status
    "mean_model", RuntimeWarning).

    Stops when the relative change of the train RMSE over a sweep is below ``tol`` ("converged"),
    after ``max_iters`` sweeps or ``time_limit`` seconds for the whole call (checked between
    sweeps: a sweep that would end past the limit is not started) ("not_converged", RuntimeWarning
    unless ``warn=False``). ``init``: an ALSResult of the same shape and rank to start from (its
    factors, biases and ridge scale ``s_1``: a refit of a validated solution on more entries, as
    the ridge polish of :func:`complete` does). ValueError for a bad rank / reg / input.
    """
    t_start = time.perf_counter()
    try:
        rank = operator.index(rank)
    except TypeError:
        raise ValueError(f"rank must be a positive int, got {rank!r}") from None
    auto = isinstance(reg, str)
    if auto and reg != "auto":
        raise ValueError(f"reg must be a number >= 0 or 'auto', got {reg!r}")
    if not auto and not (isinstance(reg, (int, float)) and reg >= 0):
        raise ValueError(f"reg must be >= 0 or 'auto', got {reg!r}")
    if bias_reg is not None and not bias_reg >= 0:
        raise ValueError(f"bias_reg must be >= 0, got {bias_reg!r}")
    if not 0 <= holdout <= 0.5:
        raise ValueError(f"holdout must be in [0, 0.5], got {holdout!r}")
    if time_limit is not None and not time_limit >= 0:
        raise ValueError(f"time_limit must be >= 0 or None, got {time_limit!r}")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    E_all = as_entries(observed, mask, dtype)
    m, n = E_all.shape
    if isinstance(rank, bool) or not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in 1..{min(m, n)}, got {rank!r}")
    dev = E_all.device
    deadline = None if time_limit is None else t_start + time_limit
    mu = float(E_all.values.double().mean())
    val = None if validation is None else _as_val(validation, dev, dtype)
    E_fit, held = E_all, None
    if auto and val is None and holdout > 0 and len(E_all) >= 100:
        pick = holdout_split(E_all.rows, E_all.cols, holdout, seed, (m, n))
        if int(pick.sum()) >= 10:
            held = pick
            E_fit = E_all.subset(~pick)
            val = (E_all.rows[pick], E_all.cols[pick], E_all.values[pick])
    if init is not None:
        if init.U.shape != (m, rank) or init.V.shape != (n, rank):
            raise ValueError(
                f"init has factors {tuple(init.U.shape)}, {tuple(init.V.shape)}; expected ({m}, {rank}), "
                f"({n}, {rank})"
            )
        U, V = init.U.to(dev, dtype).clone(), init.V.to(dev, dtype).clone()
        b = init.row_bias.to(dev, dtype) + (init.mu - mu)  # the same predictions around the new mean
        c = init.col_bias.to(dev, dtype).clone()
        s1 = init.lam / init.reg if init.reg > 0 else _init(E_fit, rank, mu, seed, dtype)[4]
    else:
        U, V, b, c, s1 = _init(E_fit, rank, mu, seed, dtype)
    fit = _Fit(E_fit, mu, U, V, b, c)
    path: list[dict] = []
    regs = REG_GRID if auto else (float(reg),)
    best = (math.inf, None, None, None)
    mm_rmse = None
    if auto and val is not None:
        sel_deadline = None if deadline is None else t_start + 0.7 * time_limit
        rises, jumped = 0, False

        def fit_at(rg: float) -> tuple[float, float]:
            """Fit at ridge rg (warm from the current state), log it on the path: (held-out RMSE, bias ridge)."""
            breg = REG_TO_BIAS * rg if bias_reg is None else bias_reg
            # selection: train and held-out RMSE both settled to 1e-4 (exact data keeps improving the held-out one)
            why, sweeps = fit.run(
                rg * s1, breg, min(max_iters, 100), max(tol, 1e-4), sel_deadline, val=val, val_tol=1e-4
            )
            v = fit.val_rmse(val)
            path.append(
                {"reg": rg, "lam": rg * s1, "val_rmse": v, "sweeps": sweeps, "converged": why == "tol"}
            )
            return v, breg

        for rg in regs:
            if sel_deadline is not None and time.perf_counter() > sel_deadline and path:
                break
            v, breg = fit_at(rg)
            if v < best[0]:
                best, rises = (v, rg, fit.state(), breg), 0
            elif v > 1.001 * best[0]:
                rises += 1
                if rises >= 2:
                    break
            vs = [p["val_rmse"] for p in path]
            if not jumped and rg > regs[-1] and len(vs) >= 3 and vs[-1] <= 0.75 * vs[-2] <= 0.5625 * vs[-3]:
                # the held-out error falls with the ridge itself (exact low-rank data): try the
                # smallest ridge at once; kept if it is better, else the path goes on from here
                jumped, saved, rj = True, fit.state(), regs[-1]
                vj, brj = fit_at(rj)
                if vj < best[0]:
                    best = (vj, rj, fit.state(), brj)
                    break
                fit.load(saved)
        _, mm_reg, mm_rmse = best_mean_model(
            E_fit.rows,
            E_fit.cols,
            E_fit.values.to(torch.float64),
            (m, n),
            tuple(x if i < 2 else x.to(torch.float64) for i, x in enumerate(val)),
        )
        chosen, chosen_breg = best[1], best[3]
        if chosen is None or not best[0] < mm_rmse:
            mean = fit_mean_model(E_all.rows, E_all.cols, E_all.values.to(torch.float64), (m, n), reg=mm_reg)
            z = torch.zeros
            res = ALSResult(
                z(m, rank, dtype=dtype, device=dev),
                z(n, rank, dtype=dtype, device=dev),
                mean.mu,
                mean.row.to(dtype),
                mean.col.to(dtype),
                "mean_model",
                0,
                0.0,
                reason="validation",
                reg_path=path,
                holdout_rmse=best[0],
                mean_model_rmse=mm_rmse,
            )
            res.message = (
                f"ALS at rank {rank} did not beat the mean model (row / column biases) on the held-out "
                f"entries (RMSE {best[0]:.4g} vs {mm_rmse:.4g} at the best ridge): returned the mean model. "
                "A smaller rank or more observed entries may help."
            )
            res.wall_time = time.perf_counter() - t_start
            if warn:
                warnings.warn(res.message, RuntimeWarning, stacklevel=3)
            return res
        fit.load(best[2])
        if held is not None:  # refit on all entries from the selected solution
            fit = _Fit(E_all, mu, fit.U, fit.V, fit.b, fit.c)
            val_rec = None
        else:
            val_rec = val
    else:
        chosen = regs[0]
        chosen_breg = REG_TO_BIAS * chosen if bias_reg is None else bias_reg
        val_rec = val
    rec = {"train": [], "val": []}
    why, sweeps = fit.run(chosen * s1, chosen_breg, max_iters, tol, deadline, val_rec, rec)
    status = "converged" if why == "tol" else "not_converged"
    res = fit.result(
        status,
        sweeps,
        chosen * s1,
        chosen,
        chosen_breg,
        why,
        train_rmse=rec["train"],
        val_rmse=rec["val"],
        reg_path=path,
        holdout_rmse=None if not path else best[0],
        mean_model_rmse=mm_rmse,
    )
    res.wall_time = time.perf_counter() - t_start
    last = rec["train"][-1] if rec["train"] else float("nan")
    if status == "converged":
        res.message = f"converged after {sweeps} sweeps at reg={chosen:g} (train RMSE {last:.4g})"
    else:
        budget = (
            f"max_iters={max_iters} sweeps"
            if why == "max_iters"
            else f"the time limit ({time_limit} s) after {sweeps} sweeps"
            if why == "time_limit"
            else why
        )
        res.message = (
            f"ALS did not converge: stopped at {budget} (train RMSE {last:.4g}, still changing); raise "
            "max_iters / time_limit"
            + (
                " (the ridge, chosen on held-out entries, keeps more sweeps from fitting noise)"
                if auto
                else ""
            )
        )
        if warn:
            warnings.warn(res.message, RuntimeWarning, stacklevel=3)  # past the no_grad wrapper
    return res
