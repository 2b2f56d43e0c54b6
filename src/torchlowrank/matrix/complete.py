"""``complete``: matrix completion with a (compressed) deep factorization, in one call, on a user's
data: invariant to the data's units and offset, the same for tall and wide matrices, stopping when
done and saying when it failed.

What ``complete`` does with the data (all undone in ``result.matrix``):

1. Mean model: ``M ~ mu + b_i + c_j + L`` — global mean and ridge row / column biases fitted to
   the observed entries (:func:`fit_mean_model`, ``center="biases"``; "mean" or "none" to
   change it). The network fits the residual ``L``. For an exactly low-rank M the residual has
   rank at most rank(M) + 2, so recovery stays exact; for ratings this is the usual baseline.
2. Units: the residual is divided by ``unit = s / NORMALIZED_TOP`` with s the top singular value of
   ``P_Omega(L) / p`` (an estimate of ||L||_2), so that the network always sees a target with top
   singular value ~10, where the default init scale and step were tuned. The run is then the same
   for ``a * M + b`` at any a > 0, b (up to rounding).
3. Orientation: a tall matrix (m > n) is completed as its transpose (the compressed network's
   gradient-built subspace lies on the longer side), and the result transposed back.
4. Rows / columns without any observed entry are predicted by the mean model (their factor rows
   are held at zero), with a warning.

How the network is trained (``adaptive``, ``polish``; both on by default):

5. Adaptive step: full-batch GD with the bold-driver rule of :func:`train_gd` — a step that
   raises the loss is undone and halved, every other one grows the step by 5%. It starts at the
   stability limit of the plateau estimated from the init scale (:func:`initial_step_boost`, ~200x
   the step that is stable at the solution), so the network leaves the initial plateau in tens of
   iterations (a fixed step spent ~8000 there); after the escape the step settles at the local
   stability limit. The loss never increases (beyond rounding).
6. Polish (without a validation set): at every check after the escape, the singular values of the
   end-to-end matrix (O((m + n) k^2) from the k-wide factors) are split at the first clear gap
   (ratio >= 1e3) into the r directions that escaped the initialisation and the rest, which depth
   keeps at the init scale (the implicit low-rank bias). Alternating least squares at rank r, with
   the row / column biases in the same least squares, then starts from the network's solution;
   while that fit stalls short of the tolerance it adds the top singular pair of its residual as
   one more direction (at most 4, each kept only if it takes >= 20% of the residual: the
   directions that have yet to escape, e.g. the small end of a decaying spectrum; a fit that needed
   them must also predict a seeded 5% of the observed entries held out of a refit, to 1e-6
   relative). The result is accepted only if it fits the observed entries to ``tol``; the trainer re-evaluates the loss
   itself, writes the solution into the network (``result.model`` is the polished network) and
   reports "converged" with ``history.polished_at`` / ``polish_info``; otherwise it restores the
   network and descends on, retrying when the escaped rank changes or the iteration count
   doubles. On noisy data nothing fits to ``tol``, so the polish never fires and the run ends as
   before (stationary / budget / early stopping). Because the rank is the smallest that fits, an
   over-estimated r_hat costs nothing.
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from ..linalg import truncated_svd
from .als import _as_val, as_entries
from .centering import MeanModel, best_mean_model, fit_mean_model, holdout_split
from .compressed import CompressedFactorization, check_rank
from .exact_screen import check_entries, fit_if_exactly_low_rank
from .factorization import DeepFactorization, as_positive_int
from .inputs import as_tensor
from .polish import RankPolish
from .problems import Completion, relative_error
from .ridge_select import EXACT, refit_ridge_als, select_ridge_als
from .sparse import Entries
from .steps import suggest_lr, suggest_rank
from .trainer import FAILURE_STATUSES, History, train_gd

__all__ = [
    "CompletionResult",
    "complete",
    "default_rank",
    "initial_step_boost",
    "NORMALIZED_TOP",
    "MEAN_MODEL_STATUS",
]

NORMALIZED_TOP = 10.0  # top singular value of the (rescaled) residual the network is trained on


class CompletionResult:
    """The result of :func:`complete`.

    matrix: the completed (m, n) matrix (float64, the data's units and orientation), formed on
    first access when the result is not a dense network fit (O(m n) memory: for large matrices use
    :meth:`predict`, which never forms it); history: the run's :class:`History` (RMSEs in the
    data's units, recovery error against ``truth``; ``selected`` says which candidate this is);
    model: the trained network — of the *normalised* residual, and of the transpose when
    ``transposed`` (None on the sparse route); problem: the normalised :class:`Completion` (None
    on the sparse route); rank: r_hat used (None for the uncompressed network); lr: the step used
    (on the normalised problem); mean_model: the fitted :class:`MeanModel`; unit: the residual's
    scale (matrix = mean + unit * network for the network); transposed: whether the network ran
    on M^T; ridge_result: the :class:`~torchlowrank.matrix.ridge_select.ScaledALS` when ridge ALS
    was selected (its factors ``ridge_result.result.U`` (m, k), ``V`` (n, k))."""

    def __init__(
        self,
        matrix: torch.Tensor | None,
        history: History,
        model: torch.nn.Module | None,
        problem: Completion | None,
        rank: int | None,
        lr: float,
        mean_model: MeanModel | None = None,
        unit: float = 1.0,
        transposed: bool = False,
        ridge_result: object | None = None,
    ):
        self._matrix = matrix
        self._predict = None
        self._dense = None
        self.history, self.model, self.problem, self.rank, self.lr = history, model, problem, rank, lr
        self.mean_model, self.unit, self.transposed, self.ridge_result = (
            mean_model,
            unit,
            transposed,
            ridge_result,
        )

    def set_predictor(self, predict, dense) -> None:
        """Replace the result by ``predict(rows, cols) -> (N,)`` and ``dense() -> (m, n)`` (called
        on first access of :attr:`matrix`)."""
        self._predict, self._dense, self._matrix = predict, dense, None

    @property
    def matrix(self) -> torch.Tensor:
        if self._matrix is None:
            if self._dense is None:
                raise ValueError("this result holds no matrix")
            self._matrix = self._dense()
        return self._matrix

    def predict(self, rows, cols) -> torch.Tensor:
        """The completed entries at ``(rows, cols)`` (1-D integer tensors / arrays, the caller's
        orientation), float64, without forming the matrix (unless it is already formed)."""
        rows, cols = torch.as_tensor(rows).long(), torch.as_tensor(cols).long()
        if self._predict is not None and self._matrix is None:
            return self._predict(rows, cols)
        M = self.matrix
        return M[rows.to(M.device), cols.to(M.device)]

    @property
    def status(self) -> str:
        return self.history.status

    @property
    def ok(self) -> bool:
        return self.history.ok


class _NormalizedCompletion(Completion):
    """A Completion of the normalised data ``y = (M - mu) / unit`` with row / column biases b, c
    refitted jointly with the network: at every evaluation one exact ridge sweep ``c <- argmin``,
    ``b <- argmin`` of ``||y - f - b_i - c_j||^2_Omega + reg (||b||^2 + ||c||^2)`` given the
    network's current predictions f, then the network's loss and gradients on ``y - b - c``
    (block coordinate descent; the biases cost O(|Omega|) per step). Errors in the data's units."""

    def __init__(
        self,
        y_matrix,
        mask,
        mu: float,
        unit: float,
        truth_w,
        fit_biases: bool,
        reg: float,
        b0: torch.Tensor,
        c0: torch.Tensor,
        **kw,
    ):
        super().__init__(y_matrix, mask, **kw)
        self.unit, self.mu = unit, mu
        self.truth = truth_w  # in the data's units and the working orientation
        self.y = self.values.clone()
        self.fit_biases, self.reg = fit_biases, reg
        m, n = self.shape
        self._rc = torch.bincount(self.rows, minlength=m).to(torch.float64)
        self._cc = torch.bincount(self.cols, minlength=n).to(torch.float64)
        self.b, self.c = b0.clone(), c0.clone()
        self.values = self.y - self.b[self.rows] - self.c[self.cols]

    def trained_state(self):
        return (self.b.clone(), self.c.clone())

    def load_trained_state(self, state) -> None:
        self.b, self.c = state[0].clone(), state[1].clone()
        self.values = self.y - self.b[self.rows] - self.c[self.cols]

    def entry_offsets(self, rows, cols):
        return self.b[rows] + self.c[cols]

    def _refit(self, pred: torch.Tensor) -> None:
        r = self.y - pred
        m, n = self.shape
        rden, cden = (self._rc + self.reg).clamp_min(1e-300), (self._cc + self.reg).clamp_min(1e-300)
        self.c = (
            torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, self.cols, r - self.b[self.rows])
            / cden
        )
        self.b = (
            torch.zeros(m, dtype=r.dtype, device=r.device).index_add_(0, self.rows, r - self.c[self.cols])
            / rden
        )
        self.values = self.y - self.b[self.rows] - self.c[self.cols]

    def factored_loss_and_grads(self, X, Bt):
        r = self._residual(X, Bt)
        if self.fit_biases:
            pred = r + self.values
            self._refit(pred)
            r = pred.sub_(self.values)
        return self._loss_and_grads_from_residual(r, X, Bt)

    def loss_and_grad(self, Phi):
        if self.fit_biases:
            self._refit(Phi.reshape(-1).take(self._flat))
        return super().loss_and_grad(Phi)

    def offset_matrix(self) -> torch.Tensor:
        return self.b[:, None] + self.c[None, :]

    def recovery_error(self, Phi):
        if self.truth is None:
            return None
        return relative_error(self.unit * (Phi + self.offset_matrix()) + self.mu, self.truth)


def _coerce_inputs(observed, mask) -> tuple[torch.Tensor, torch.Tensor]:
    observed, mask = as_tensor(observed), as_tensor(mask)
    if not isinstance(observed, torch.Tensor):
        raise ValueError(
            f"observed must be a torch tensor or NumPy array (m, n), got {type(observed).__name__}"
        )
    if observed.layout != torch.strided:
        if observed.ndim != 2:
            raise ValueError(f"observed must be a 2-D matrix, got shape {tuple(observed.shape)}")
        if mask is not None:
            raise ValueError(
                "a sparse observed matrix defines its own mask (its stored entries): pass mask=None"
            )
        try:
            coo = observed.to_sparse_coo().coalesce()
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"cannot read the sparse layout {observed.layout}: convert it with "
                f".to_sparse_coo() or .to_dense() and pass a mask ({exc})"
            ) from None
        idx = coo.indices()
        dense = torch.zeros(coo.shape, dtype=torch.float64, device=coo.device)
        mask = torch.zeros(coo.shape, dtype=torch.bool, device=coo.device)
        dense[idx[0], idx[1]] = coo.values().to(torch.float64)
        mask[idx[0], idx[1]] = True
        return dense, mask
    if mask is None:
        mask = ~torch.isnan(observed)
    elif not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a boolean tensor (m, n), got {type(mask).__name__}")
    if mask.layout != torch.strided:
        mask = mask.to_dense()
    if mask.dtype != torch.bool:
        if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be boolean (or 0/1): True where the entry is observed")
        mask = mask.to(torch.bool)
    return observed, mask


def initial_step_boost(depth: int, init_scale: float) -> float:
    """The adaptive step's start, as a multiple of :func:`suggest_lr` (the stable step at the
    solution, top singular value ``NORMALIZED_TOP``): ``max(1, (NORMALIZED_TOP / eps^L)^((L-2)/L) / 10)``.
    Near the initialisation the factors have scale eps, the curvature along the top direction is
    that of the residual term, ``~ s eps^(L-2)`` instead of ``~ L s^(2(L-1)/L)``, so a step larger by
    about ``(s / eps^L)^((L-2)/L)`` is stable there (2154 at L = 3, eps = 1e-3); a tenth of it is
    the start, and a step that raises the loss is halved (one iteration each)."""
    L = depth
    return max(1.0, (NORMALIZED_TOP / init_scale**L) ** ((L - 2) / L) / 10.0)


def default_rank(problem: Completion) -> int:
    """The r_hat ``complete`` uses when none is given: generous, because over-estimating it is
    what the deep compressed network tolerates (its cost is linear in r_hat):
    ``min(min(m, n) // 2, max(16, 2 * suggest_rank))``."""
    cap = max(1, min(problem.shape) // 2)
    return max(1, min(cap, max(16, 2 * suggest_rank(problem))))


def _checked_network_args(depth, width, rank, compressed, center, truth, lr, shape) -> tuple:
    """(depth, width, rank) as ints after the checks of the network's arguments (ValueError that
    says what to change); checked before any fit, so a bad argument fails on every route."""
    depth = as_positive_int(depth, "depth")
    if width is not None:
        width = as_positive_int(width, "width")
    if rank is not None:
        rank = as_positive_int(rank, "rank (r_hat)")
        if not compressed:
            raise ValueError(
                "rank is the compressed network's r_hat and is not used with compressed=False: "
                "set width= for the uncompressed network's width, or drop compressed=False"
            )
    if center not in ("biases", "mean", "none"):
        raise ValueError(f"center must be 'biases', 'mean' or 'none', got {center!r}")
    if truth is not None and tuple(truth.shape) != tuple(shape):
        raise ValueError(f"truth has shape {tuple(truth.shape)}, expected {tuple(shape)}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    return depth, width, rank


def _complete_once(
    observed,
    mask,
    depth: int = 3,
    rank: int | None = None,
    compressed: bool = True,
    *,
    width: int | None = None,
    lr: float | None = None,
    gamma: float = 0.01,
    init_scale: float = 1e-3,
    center: str = "biases",
    bias_reg: float = 0.0,
    normalize: bool = True,
    reduction: str = "mean",
    max_iters: int = 20_000,
    tol: float = 1e-9,
    ftol: float = 1e-10,
    time_limit: float | None = None,
    target_error: float | None = None,
    truth: torch.Tensor | None = None,
    test: tuple | None = None,
    validation: tuple | None = None,
    patience: int | None = None,
    eval_every: int = 50,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool | None = None,
    adaptive: bool = True,
    polish: bool | None = None,
    warn_empty: bool = True,
    hint_from: History | None = None,
    deadline: float | None = None,
) -> CompletionResult:
    """One fit of the network on the entries where ``mask`` is True (no held-out selection):
    the arguments, the data handling and the result are :func:`complete`'s (its docstring), plus
    ``hint_from`` (the history whose trend words the not-converged warning) and ``deadline`` (a
    ``time.perf_counter()`` value shared with the caller's other fits)."""
    observed, mask = _coerce_inputs(observed, mask)
    if observed.ndim != 2:
        raise ValueError(f"observed must be a 2-D matrix, got shape {tuple(observed.shape)}")
    if mask.shape != observed.shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but observed has shape {tuple(observed.shape)}; "
            "pass a boolean mask of the same shape as the matrix"
        )
    depth, width, rank = _checked_network_args(
        depth, width, rank, compressed, center, truth, lr, observed.shape
    )
    dev = observed.device
    m0, n0 = observed.shape
    transposed = m0 > n0
    O, W = (observed.T, mask.T) if transposed else (observed, mask)
    W = W.to(dev)
    m, n = O.shape
    idx = W.nonzero()
    if idx.shape[0] == 0:
        raise ValueError("the mask observes no entries; mark at least one observed entry True")
    rows, cols = idx[:, 0], idx[:, 1]
    vals = O.to(torch.float64)[rows, cols]
    if not torch.isfinite(vals).all():
        bad = int((~torch.isfinite(vals)).sum())
        raise ValueError(
            f"{bad} observed entries are NaN/Inf; drop them from the mask "
            "(mask &= torch.isfinite(observed)) or fill them"
        )
    mean = fit_mean_model(rows, cols, vals, (m, n), center=center, reg=bias_reg)
    mu = mean.mu
    resid = vals - mean.predict(rows, cols)
    unit = 1.0
    if normalize:
        p = idx.shape[0] / (m * n)
        R = torch.zeros((m, n), dtype=torch.float64, device=dev)
        R[rows, cols] = resid / p
        s = float(truncated_svd(R, 1)[1][0]) if resid.abs().max() > 0 else 0.0
        if s > 0 and math.isfinite(s):
            unit = s / NORMALIZED_TOP
        del R
    swap = (lambda e: (e[1], e[0], e[2])) if transposed else (lambda e: e)

    def to_work(entries):
        if entries is None:
            return None
        r, c, v = swap(entries)
        r, c, v = (x if isinstance(x, torch.Tensor) else torch.as_tensor(x, device=dev) for x in (r, c, v))
        r, c, v = r.long().to(dev), c.long().to(dev), v.to(dev, torch.float64)
        return r, c, (v - mu) / unit

    truth_w = None if truth is None else (truth.T if transposed else truth).to(dev, torch.float64)
    Y = torch.zeros((m, n), dtype=torch.float64, device=dev)
    Y[rows, cols] = (vals - mu) / unit
    problem = _NormalizedCompletion(
        Y,
        W,
        mu,
        unit,
        truth_w,
        center == "biases",
        bias_reg,
        mean.row / unit,
        mean.col / unit,
        reduction=reduction,
        test=to_work(test),
    )
    del Y
    val_w = to_work(validation)
    row_empty = mean.row_counts == 0
    col_empty = mean.col_counts == 0
    n_re, n_ce = int(row_empty.sum()), int(col_empty.sum())
    if (n_re or n_ce) and warn_empty:
        nr, nc = (n_ce, n_re) if transposed else (n_re, n_ce)  # in the caller's orientation
        warnings.warn(
            f"{nr} rows and {nc} columns have no observed entry: they are predicted by the mean model "
            "(global mean plus the other side's bias), not by the low-rank part",
            UserWarning,
            stacklevel=2,
        )
    gen = torch.Generator().manual_seed(seed)
    if compressed:
        if rank is None:
            rank = default_rank(problem)
        rank = check_rank(rank, problem.shape)
        model = CompressedFactorization.from_problem(
            problem, rank, depth=depth, init_scale=init_scale, gamma=gamma, generator=gen
        )
        if n_re or n_ce:  # rows of the outer factors that no gradient reaches: hold them at zero
            model.left.data[row_empty] = 0
            model.right.data[col_empty] = 0
    else:
        model = DeepFactorization(
            problem.shape, depth=depth, width=width, init_scale=init_scale, generator=gen, device=dev
        )
        if n_re or n_ce:
            model.factors[-1].data[row_empty] = 0
            model.factors[0].data[:, col_empty] = 0
        rank = None
    if lr is None:
        lr = suggest_lr(problem, depth)
        if adaptive:  # start at the plateau's own stability limit (a tenth of it); halvings bring it down
            lr *= initial_step_boost(depth, init_scale)
    if polish is None:
        polish = compressed and validation is None and tol > 0
    if polish and not compressed:
        raise ValueError(
            "polish=True needs the compressed network (compressed=True): the polish rewrites its "
            "k-wide factors"
        )
    polisher = RankPolish() if polish else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if deadline is not None:  # the caller's time limit, setup included
            time_limit = max(deadline - time.perf_counter(), 0.0)
        hist = train_gd(
            model,
            problem,
            lr,
            max_iters=max_iters,
            tol=tol,
            ftol=ftol,
            target_error=target_error,
            eval_every=eval_every,
            validation=val_w,
            patience=patience,
            time_limit=time_limit,
            weight_decay=weight_decay,
            progress=progress,
            adaptive=adaptive,
            polish=polisher,
            decay_from_escape=True,
        )
    for w in caught:  # re-issue the trainer's warnings as the caller's, with what complete() can change
        if hist.status in FAILURE_STATUSES and str(w.message) == hist.message:
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if hist.status in FAILURE_STATUSES:
        hint = {
            "stalled_at_init": " For complete(): raise init_scale (e.g. 1e-2) or max_iters.",
            "not_converged": _not_converged_hint(
                hist if hint_from is None else hint_from, val_w is not None or hint_from is not None
            ),
            "diverged": " For complete(): pass a smaller lr.",
        }[hist.status]
        if (
            hint_from is not None
        ):  # a refit after a held-out selection: the trainer's no-validation note does not apply
            hist.message = hist.message.split(" Raise max_iters / time_limit only")[0]
        hist.message += hint
        warnings.warn(hist.message, RuntimeWarning, stacklevel=3)
    with torch.no_grad():
        X, Bt = model.factor_pair()
        matrix = unit * (X @ Bt.T + problem.offset_matrix()) + mu
    mean = MeanModel(mu, unit * problem.b, unit * problem.c, mean.row_counts, mean.col_counts)
    if transposed:
        matrix = matrix.T.contiguous()
        mean = mean.transpose()
    return CompletionResult(matrix, hist, model, problem, rank, lr, mean, unit, transposed)


DENSE_CELLS = 1 << 26  # m n above which complete() takes the sparse route by default (64 M cells)


def _shape_of(observed) -> tuple[int, int] | None:
    """The (m, n) of an input without densifying it (None when it is not a 2-D matrix)."""
    shape = getattr(observed, "shape", None)
    if shape is None or len(shape) != 2:
        return None
    return int(shape[0]), int(shape[1])


def _complete_sparse(
    observed,
    mask,
    *,
    rank: int | None,
    holdout: float,
    validation: tuple | None,
    time_limit: float | None,
    seed: int,
    center: str,
    test: tuple | None,
    tol: float = 1e-9,
) -> CompletionResult:
    """The sparse route of :func:`complete`: the mean model and ridge ALS
    (:func:`~torchlowrank.matrix.ridge_select.select_ridge_als`: rank, ridge and scaling chosen on
    the held-out entries), on the observed entries only; no network, no (m, n) array."""
    start = time.perf_counter()
    dl = None if time_limit is None else start + time_limit
    if rank is not None:
        rank = as_positive_int(rank, "rank")
    if center not in ("biases", "mean", "none"):
        raise ValueError(f"center must be 'biases', 'mean' or 'none', got {center!r}")
    E = as_entries(observed, mask)
    m, n = E.shape
    if validation is not None:
        E_fit, val = E, _as_val(validation, E.device, torch.float64)
    else:
        if holdout == 0:
            raise ValueError(
                "the sparse route chooses the rank and the ridge on held-out entries: keep holdout > 0 "
                "or pass validation=(rows, cols, values)"
            )
        pick = holdout_split(E.rows, E.cols, holdout, seed, (m, n))
        if int(pick.sum()) < 10:
            raise ValueError(
                f"only {int(pick.sum())} entries could be held out of {len(E)}: too few observed entries "
                "for the sparse route; pass sparse=False (the network) or more entries"
            )
        E_fit, val = E.subset(~pick), (E.rows[pick], E.cols[pick], E.values[pick])
    n_val = int(val[0].numel())
    _, mm_reg, mm_rmse = best_mean_model(E_fit.rows, E_fit.cols, E_fit.values, (m, n), val, center)
    held = None if validation is not None else pick
    exact = _exact_low_rank(E, E_fit, val, mm_rmse, seed, dl, start, test, tol, rank, held)
    if exact is not None:
        return exact
    # candidates stop at a relative change of 1e-4 (the winner's refit on all entries goes on to 1e-7)
    # a rank that fits the held-out entries to NEAR_EXACT of their spread ends the search (and is
    # screened for exactness: _exact_low_rank's searched)
    ridge = select_ridge_als(
        E_fit, val, suggested_rank=rank, seed=seed, deadline=dl, tol=1e-4, stop_at=NEAR_EXACT
    )
    exact = _exact_low_rank(E, E_fit, val, mm_rmse, seed, dl, start, test, tol, rank, held, ridge)
    if exact is not None:
        return exact
    hist = History()
    hist.mean_model_rmse, hist.ridge_polish_rmse = mm_rmse, None if ridge is None else ridge[0]
    first = CompletionResult(None, hist, None, None, None, 0.0)
    if ridge is None or not ridge[0] < mm_rmse:
        mean_all = fit_mean_model(E.rows, E.cols, E.values, (m, n), center=center, reg=mm_reg)
        hist.selected, hist.status, hist.reason = "mean_model", MEAN_MODEL_STATUS, "validation"
        hist.message = (
            f"ridge ALS did not beat the mean model (row / column biases) on the {n_val} held-out entries "
            f"(RMSE {math.inf if ridge is None else ridge[0]:.4g} vs {mm_rmse:.4g}): returned the mean "
            "model, refitted on all entries. More observed entries or a time_limit that leaves room for "
            "the rank search may help."
        )
        warnings.warn(hist.message, RuntimeWarning, stacklevel=3)
        first.set_predictor(mean_all.predict, mean_all.dense)
        first.mean_model = mean_all
    else:
        _select_ridge(first, ridge, E, n_val, math.inf, mm_rmse, seed, dl, [])
    return _finish_als(first, start, test, E.device)


def _finish_als(first: CompletionResult, start: float, test: tuple | None, device) -> CompletionResult:
    """The bookkeeping of a result that is ridge ALS or the mean model (no network)."""
    hist = first.history
    if first.ridge_result is not None:
        first.rank = first.ridge_result.rank
    hist.n_iters = 0 if first.ridge_result is None else first.ridge_result.result.n_iters
    hist.train_time = time.perf_counter() - start
    if test is not None:
        tr, tc, tv = _as_val(test, device, torch.float64)
        hist.test_rmse.append(float((first.predict(tr, tc) - tv).square().mean().sqrt()))
    return first


NEAR_EXACT = 1e-2  # of the held-out values' spread: the sparse route's rank search stops there


def _exact_low_rank(
    E_all: Entries,
    E_fit: Entries,
    val: tuple,
    mm_rmse: float,
    seed: int,
    deadline: float | None,
    start: float,
    test: tuple | None,
    tol: float,
    rank: int | None = None,
    held: torch.Tensor | None = None,
    searched: tuple | None = None,
) -> CompletionResult | None:
    """The result of :func:`~torchlowrank.matrix.exact_screen.fit_if_exactly_low_rank` on ``E_fit``
    (``rank`` tried first; given at most half of the time left), refitted on all entries to the
    relative train residual ``tol``, or None when the data is not exactly low rank (to ``max(tol,
    EXACT)`` of the held-out entries' spread: a looser ``tol`` accepts a looser fit, and stops
    sooner). ``held`` (N,) bool, the held-out entries of ``E_all`` when ``val`` is made of them:
    the screen then fits on all entries but its smaller check set
    (:func:`~torchlowrank.matrix.exact_screen.check_entries`).

    ``searched``: the ridge ALS rank search's ``(held-out RMSE, ScaledALS)``; then only its rank
    is screened, and only when that fit predicted ``val`` to :data:`NEAR_EXACT` of their spread
    (unscaled, and not ``rank``, which the first screen tried). Near the information limit the
    sampling noise flattens the spectrum the screen reads its ranks from, and only the search
    finds the rank of exactly low-rank data (the 100,000 x 50,000 case of docs/matrix.md); noisy
    data never comes this close, so it costs them nothing."""
    screen: dict = {}
    if searched is not None:
        vv = val[2].to(torch.float64)
        spread = float((vv - vv.mean()).square().mean().sqrt())
        fit = searched[1]
        if fit.rank == rank or fit.scaled or not searched[0] <= NEAR_EXACT * spread:
            return None
        rank, screen = fit.rank, {"rank_source": "the rank search's choice", "spectrum_ranks": False}
    if held is not None:
        check = check_entries(held, seed)
        E_fit, val = E_all.subset(~check), (E_all.rows[check], E_all.cols[check], E_all.values[check])
    screen_deadline = None if deadline is None else (time.perf_counter() + deadline) / 2
    exact = fit_if_exactly_low_rank(
        E_fit, val, seed=seed, deadline=screen_deadline, tol=max(tol, EXACT), rank=rank, **screen
    )
    if exact is None:
        return None
    hist = History()
    hist.mean_model_rmse, hist.ridge_polish_rmse = mm_rmse, exact[0]
    first = CompletionResult(None, hist, None, None, None, 0.0)
    # als()'s tol: a relative change of the train RMSE, or the RMSE at 1e-2 tol of the data's scale
    _select_ridge(
        first, exact, E_all, int(val[0].numel()), math.inf, mm_rmse, seed, deadline, [], refit_tol=100 * tol
    )
    hist.polish_info = f"{exact[1].result.message}; {hist.polish_info}"
    hist.message += f" ({exact[1].result.message})"
    return _finish_als(first, start, test, E_all.device)


BLEND_WEIGHTS = (0.25, 0.5, 0.75)  # network weights tried for a blend of network and ridge ALS
SMALL_PROBLEM = 50_000  # observed entries up to which ridge ALS is chosen on 3 held-out splits, not 1


def _more_splits(E: Entries, fraction: float, seed: int, n: int = 2) -> list:
    """Two more seeded held-out splits ``(fit entries, (rows, cols, values))`` of the observed
    entries ``E`` for choosing the ridge ALS's rank and scaling on small problems (at most
    :data:`SMALL_PROBLEM` entries; none above: there one split of 10% is steady and fits cost)."""
    if len(E) > SMALL_PROBLEM:
        return []
    out = []
    for k in range(1, n + 1):
        pick = holdout_split(E.rows, E.cols, fraction, seed + 7919 * k, E.shape)
        if int(pick.sum()) >= 10:
            out.append((E.subset(~pick), (E.rows[pick], E.cols[pick], E.values[pick])))
    return out


def _learnt_rank(first: CompletionResult) -> int | None:
    """The rank the network learnt: its end-to-end singular values above 1e-3 of the largest (the
    directions that left the initialisation); None for the uncompressed network or a zero one."""
    if first.rank is None:
        return None
    with torch.no_grad():
        X, Bt = first.model.factor_pair()
        s = torch.linalg.svdvals(torch.linalg.qr(X)[1] @ torch.linalg.qr(Bt)[1].T)
    if not float(s[0]) > 0:
        return None
    return max(1, int((s > 1e-3 * s[0]).sum()))


def _select_ridge(
    first: CompletionResult,
    ridge: tuple,
    E_all: Entries,
    n_val: int,
    net_rmse: float,
    mm_rmse: float,
    seed: int,
    deadline: float | None,
    caught: list,
    refit_tol: float = 1e-7,
) -> None:
    """Make ``first`` the ridge ALS candidate ``ridge = (held-out RMSE, ScaledALS)``, refitted on all
    entries ``E_all`` (to :func:`~torchlowrank.matrix.als`'s ``tol=refit_tol``) when its validated
    fit was a converged ridge optimum (a refit of an unconverged one drifts further from the state
    that was scored)."""
    h1 = first.history
    als_rmse, chosen = ridge
    left = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
    if chosen.result.status == "converged":  # a ridge optimum: refit on all entries, warm from it
        fitted = refit_ridge_als(chosen, E_all, seed=seed, time_limit=left, tol=refit_tol)
        res = fitted.result
        refit_note = f"ridge ALS on all {len(E_all)} observed entries ({res.n_iters} sweeps)"
    else:  # stopped before its optimum (implicitly early-stopped): the held-out score is of this very state
        fitted, res = chosen, chosen.result
        refit_note = (
            f"none: the ridge ALS stopped before its optimum ({res.message}); its held-out score is of "
            f"that state, so it is kept as fitted without the {n_val} held-out entries"
        )
    how = f"rank {chosen.rank}, ridge reg={res.reg:g}" + (
        ", on entries divided by per-column / per-row scales" if chosen.scaled else ""
    )
    h1.selected = "ridge_polish"
    h1.status, h1.reason = (
        ("converged", "ridge_polish")
        if res.status == "converged" or fitted is chosen
        else ("not_converged", res.reason)
    )
    h1.polish_info = (
        f"ridge ALS with biases ({how}; rank, ridge and scaling chosen on the held-out entries); "
        f"refit: {refit_note} ({res.message})"
    )
    h1.refit = refit_note
    h1.message = (
        f"{'converged' if h1.status == 'converged' else 'not converged'}: ridge ALS ({how}) "
        + (
            f"beat the network on the {n_val} held-out entries (RMSE {als_rmse:.4g} vs {net_rmse:.4g}; "
            if math.isfinite(net_rmse)
            else f"was chosen on the {n_val} held-out entries (RMSE {als_rmse:.4g}; "
        )
        + f"mean model {mm_rmse:.4g}); refit: {refit_note}"
    )
    for w in caught:
        if not issubclass(w.category, RuntimeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if h1.status != "converged":
        h1.message += f"; {res.message}"
        warnings.warn(h1.message, RuntimeWarning, stacklevel=3)
    first.set_predictor(fitted.predict, fitted.dense)
    m, n = E_all.shape
    if chosen.scaled:  # the biases are in scaled units: the mean model of the data itself, for reference
        first.mean_model = fit_mean_model(E_all.rows, E_all.cols, E_all.values, (m, n))
    else:
        first.mean_model = MeanModel(
            res.mu,
            res.row_bias.double(),
            res.col_bias.double(),
            E_all.row_counts.double(),
            E_all.col_counts.double(),
        )
    first.ridge_result = fitted


def _not_converged_hint(hist: History, validated: bool) -> str:
    """What to change after a run that stopped at its budget: more iterations only when the
    held-out error was still falling."""
    if (
        validated
        and hist.best_iteration is not None
        and hist.n_iters > 0
        and hist.best_iteration < 0.8 * hist.n_iters
    ):
        return (
            f" The held-out error stopped improving at iteration {hist.best_iteration}, so more iterations will "
            "not help: more observed entries, a smaller rank or a larger weight_decay will."
        )
    if validated:
        return " The held-out error was still falling: raise max_iters / time_limit."
    return (
        " No entries were held out (validation=None, holdout=0), so nothing separates signal from noise: "
        "on noisy data keep the default holdout (or pass validation=), which stops before the noise is fitted; "
        "raise max_iters / time_limit only for data that should be fitted exactly."
    )


MEAN_MODEL_STATUS = "mean_model"


def complete(
    observed,
    mask=None,
    depth: int = 3,
    rank: int | None = None,
    compressed: bool = True,
    *,
    width: int | None = None,
    lr: float | None = None,
    gamma: float = 0.01,
    init_scale: float = 1e-3,
    center: str = "biases",
    bias_reg: float = 0.0,
    normalize: bool = True,
    reduction: str = "mean",
    max_iters: int = 20_000,
    tol: float = 1e-9,
    ftol: float = 1e-10,
    time_limit: float | None = None,
    target_error: float | None = None,
    truth: torch.Tensor | None = None,
    test: tuple | None = None,
    validation: tuple | None = None,
    holdout: float = 0.1,
    patience: int | None = None,
    eval_every: int = 50,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool | None = None,
    adaptive: bool = True,
    polish: bool | None = None,
    ridge_polish: bool = True,
    sparse: bool | None = None,
) -> CompletionResult:
    """Complete ``observed`` (m, n) from the entries where ``mask`` (m, n, bool) is True.

    observed: dense tensor / NumPy array (entries off the mask are ignored, NaN allowed; with
    ``mask=None`` the non-NaN entries are the observed ones), a sparse COO / CSR tensor or a
    SciPy sparse matrix (its stored entries are the observed ones; ``mask`` must be None).

    Sparse route (``sparse=True``, or by default when m n > :data:`DENSE_CELLS` = 2^26): no network
    and no (m, n) array — the mean model and the ridge ALS above, on the observed entries only
    (memory O(|Omega| + (m + n) k^2)); ``rank`` is then one more rank to try, ``holdout`` must be
    > 0 (or ``validation`` given), and the network's arguments (depth, lr, ...) are not used;
    ``result.model`` / ``problem`` are None. On every route ``result.predict(rows, cols)`` gives
    completed entries without forming the matrix (for ridge ALS and mean-model results);
    ``result.matrix`` forms the (m, n) matrix on first access — do not touch it for a huge matrix;
    ``result.ridge_result`` holds the factors (``.result.U`` (m, k), ``.result.V`` (n, k), biases,
    and the column / row scales).

    Held-out validation (the default, ``holdout=0.1``, when no ``validation`` is given): a seeded
    (``seed``) random 10% of the observed entries (never the last one of a row or column, see
    :func:`holdout_split`) is held out. First the exact screen
    (:func:`~torchlowrank.matrix.exact_screen.fit_if_exactly_low_rank`, with ``ridge_polish=True``,
    on every route): plain ALS at ``rank`` when it is given (the rank you expect), then at the
    ranks where the spectrum of the centred observations drops most; if one fits the held-out entries to max(``tol``, 1e-6) of their spread (exactly low-rank
    data), it is refitted on all entries to the relative train residual ``tol`` and returned
    (``history.selected == "ridge_polish"``, "exactly low rank" in the message, no network:
    ``model`` / ``problem`` are None) — a few sweeps where the
    network takes minutes; on noisy data it gives up after a few sweeps (once the held-out error,
    at its recent rate of fall, would not reach that level within 500 sweeps) and the run goes on
    as below. ``ridge_polish=False`` trains the network alone. The network is trained on the rest with early stopping on
    the held-out entries (``patience`` evaluations, default 10, counted after the escape from the
    initial plateau; the best parameters are kept) and the exact polish on; the mean model
    (``mu + b_i + c_j``, its bias ridge chosen on the same entries) is fitted beside it. Then:

    - unless the network fitted its entries to ``tol`` (exact data), ridge ALS with biases
      (``ridge_polish=True``; :func:`~torchlowrank.matrix.ridge_select.select_ridge_als`) is fitted
      to the same entries at ranks 1, 2, 3, 5, 8, 10, 12, 16, 20, 24, 32, 48, 64 (those <=
      min(m, n), plus min(m, n) and the rank the network learnt), ascending until two ranks in a
      row did not improve, each with its ridge chosen on the held-out entries — and, when the
      columns (or rows) differ in scale (90th / 10th percentile of their spreads >= 10, a raw
      table), again on the entries divided by the per-column spreads (multiplied back after).
      Up to 50,000 observed entries the rank and scaling are scored on the mean held-out RMSE of
      three seeded splits (one split's RMSE is dominated by a few large entries there);
    - the best of network, ridge ALS, their blend ``w net + (1 - w) ALS`` (w in 0.25, 0.5, 0.75)
      and the mean model on the held-out entries is kept (``history.selected`` "network",
      "ridge_polish", "blend" or "mean_model"); the ridge ALS is refitted on all entries at its
      rank, ridge and scaling (status "converged", reason "ridge_polish");
    - if neither beats the mean model on the held-out entries, the result is the mean
      model refitted on all entries, ``status == "mean_model"``, with a RuntimeWarning;
    - if the network fitted its entries to ``tol`` (exact low-rank data: converged by the polish
      or ``target_error``) it is the result as is (it already predicts the held-out entries);
    - otherwise the network is refitted on all observed entries from the same initialisation for
      the number of iterations that was best on the held-out entries (the whole ``max_iters``
      if the held-out error was still falling), if the ``time_limit`` leaves time for it (else the
      network fitted without the held-out entries is kept; ``history.refit`` says which).

    ``history.holdout_rmse`` / ``ridge_polish_rmse`` / ``mean_model_rmse`` hold the held-out RMSEs (data units),
    ``history.val_rmse`` the held-out curve. ``holdout=0`` (or a ``validation`` set) trains once on
    all entries, as before: then nothing stops the network from fitting noise.

    The data is centred by a mean model and rescaled (``center``, ``bias_reg``, ``normalize``; see
    the module docstring), so the defaults work at any scale and offset. compressed=True trains
    the 2 r_hat-wide compressed network (DESIGN §4.4; ``rank`` = r_hat, default
    :func:`default_rank` (generous), needs ``2 rank <= min(m, n)``; outer factors at
    ``gamma * lr``); compressed=False trains the depth-``depth`` network of width ``width`` (default
    min(m, n)) — there ``rank`` is not used and passing it is an error. ``lr`` defaults to
    :func:`suggest_lr`.

    adaptive: bold-driver step size (``lr`` is the initial step, by default :func:`suggest_lr` times
    :func:`initial_step_boost`; False: the fixed step :func:`suggest_lr`). polish: the
    exact ALS polish at the rank the network picked (module docstring, steps 5-6); default on when
    no explicit ``validation`` is given and ``tol > 0``; needs compressed=True. ``weight_decay``
    applies from the escape on (before, it would hold the small initialisation at zero).

    Stopping (see :func:`train_gd`): relative train residual <= ``tol`` (by descent or polish); loss stationary
    (relative decrease <= ``ftol`` over 1000 iterations); ``target_error`` on the recovery error
    (needs ``truth``); early stopping on the held-out entries or on ``validation = (rows, cols,
    values)``; ``max_iters``; ``time_limit`` seconds (for both fits together). ``result.status`` is
    "converged", "early_stopped", "mean_model", or a failure ("not_converged", "stalled_at_init",
    "diverged", each with a RuntimeWarning that says what helps). ``test = (rows, cols, values)``
    is recorded in ``history.test_rmse``.

    Raises ValueError for mismatched shapes, an empty mask, NaN in the observed entries, a bad
    rank / depth, ``2 rank > min(shape)``, ``rank`` with compressed=False, or ``holdout`` outside
    [0, 0.5].

    Example::

        res = tlr.matrix.complete(M_obs, mask)          # ratings, any units
        res.matrix, res.status, res.history.message
        res = tlr.matrix.complete(S)                    # S: torch / SciPy sparse (m, n), huge
        res.predict(rows, cols)
    """
    start = time.perf_counter()
    dl = None if time_limit is None else start + time_limit
    if time_limit is not None and not time_limit >= 0:
        raise ValueError(f"time_limit must be >= 0 seconds or None, got {time_limit!r}")
    kw = dict(
        deadline=dl,
        depth=depth,
        rank=rank,
        compressed=compressed,
        width=width,
        lr=lr,
        gamma=gamma,
        init_scale=init_scale,
        center=center,
        bias_reg=bias_reg,
        normalize=normalize,
        reduction=reduction,
        tol=tol,
        ftol=ftol,
        target_error=target_error,
        truth=truth,
        test=test,
        eval_every=eval_every,
        weight_decay=weight_decay,
        seed=seed,
        progress=progress,
        adaptive=adaptive,
    )
    if not (isinstance(holdout, (int, float)) and 0 <= holdout <= 0.5):
        raise ValueError(f"holdout must be a fraction in [0, 0.5] of the observed entries, got {holdout!r}")
    if sparse is None:
        shape = _shape_of(observed)
        sparse = shape is not None and shape[0] * shape[1] > DENSE_CELLS
    if sparse:
        return _complete_sparse(
            observed,
            mask,
            rank=rank,
            holdout=holdout,
            validation=validation,
            time_limit=time_limit,
            seed=seed,
            center=center,
            test=test,
            tol=tol,
        )
    if validation is not None or holdout == 0:
        return _complete_once(
            observed,
            mask,
            max_iters=max_iters,
            time_limit=time_limit,
            validation=validation,
            patience=patience,
            polish=polish,
            **kw,
        )
    observed, mask = _coerce_inputs(observed, mask)
    if observed.ndim != 2 or mask.shape != observed.shape:  # _complete_once says what is wrong
        return _complete_once(observed, mask, max_iters=max_iters, time_limit=time_limit, **kw)
    idx = mask.nonzero()
    rows, cols = idx[:, 0], idx[:, 1]
    pick = holdout_split(rows, cols, holdout, seed, tuple(mask.shape))
    n_val = int(pick.sum())
    if n_val < 10:  # too few entries to judge anything on: one fit on all of them
        return _complete_once(
            observed, mask, max_iters=max_iters, time_limit=time_limit, patience=patience, polish=polish, **kw
        )
    vr, vc = rows[pick], cols[pick]
    vv = observed[vr, vc].to(torch.float64)
    train_mask = mask.clone()
    train_mask[vr, vc] = False
    if polish is None:
        polish = compressed and tol > 0
    _checked_network_args(depth, width, rank, compressed, center, truth, lr, observed.shape)
    empty_rows = int((torch.bincount(rows, minlength=mask.shape[0]) == 0).sum())
    empty_cols = int((torch.bincount(cols, minlength=mask.shape[1]) == 0).sum())
    if empty_rows or empty_cols:
        warnings.warn(
            f"{empty_rows} rows and {empty_cols} columns have no observed entry: they are predicted by "
            "the mean model (global mean plus the other side's bias), not by the low-rank part",
            UserWarning,
            stacklevel=2,
        )
    tr_rows, tr_cols = rows[~pick], cols[~pick]
    tr_vals = observed[tr_rows, tr_cols].to(torch.float64)
    mm, mm_reg, mm_rmse = best_mean_model(tr_rows, tr_cols, tr_vals, tuple(mask.shape), (vr, vc, vv), center)
    all_vals = observed[rows, cols].to(torch.float64)
    E_all = Entries(rows, cols, all_vals, tuple(mask.shape))
    E_fit = E_all.subset(~pick) if ridge_polish else None  # the ridge ALS candidates' entries
    if ridge_polish:  # exactly low-rank data: a plain ALS at the rank its spectrum shows recovers it fast
        exact = _exact_low_rank(E_all, E_fit, (vr, vc, vv), mm_rmse, seed, dl, start, test, tol, rank, pick)
        if exact is not None:
            return exact
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _complete_once(
            observed,
            train_mask,
            max_iters=max_iters,
            time_limit=time_limit,
            validation=(vr, vc, vv),
            patience=10 if patience is None else patience,
            polish=polish,
            warn_empty=False,
            **kw,
        )
    h1 = first.history
    net_rmse = min(h1.val_rmse) if h1.val_rmse else math.inf
    if not math.isfinite(net_rmse):
        net_rmse = math.inf
    h1.holdout_rmse, h1.mean_model_rmse = net_rmse, mm_rmse
    failed = h1.status in ("stalled_at_init", "diverged")
    exact = h1.reason in ("tol", "target_error")
    if exact and not failed:  # fitted to tol (exact data) and validated: keep it
        h1.selected = "network"
        h1.refit = "none: the network fitted its entries to tol and predicts the held-out ones"
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return first
    ridge = None  # ridge ALS, rank / ridge / scaling chosen on the same held-out entries
    if ridge_polish:
        ridge = select_ridge_als(
            E_fit,
            (vr, vc, vv),
            suggested_rank=_learnt_rank(first),
            seed=seed,
            deadline=dl,
            more_splits=_more_splits(E_all, holdout, seed),
        )
        exact = _exact_low_rank(
            E_all, E_fit, (vr, vc, vv), mm_rmse, seed, dl, start, test, tol, rank, pick, ridge
        )
        if exact is not None:
            return exact
    als_rmse = math.inf if ridge is None else ridge[0]
    h1.ridge_polish_rmse = None if ridge is None else als_rmse
    if failed:
        net_rmse = math.inf
    if not min(net_rmse, als_rmse) < mm_rmse:
        # neither beat the mean model on held-out entries: the mean model, refitted on all entries
        mean_all = fit_mean_model(rows, cols, all_vals, tuple(mask.shape), center=center, reg=mm_reg)
        h1.selected = "mean_model"
        if not failed:
            h1.status, h1.reason = MEAN_MODEL_STATUS, "validation"
            h1.message = (
                f"the low-rank network did not beat the mean model (row / column biases) on the "
                f"{n_val} held-out entries (RMSE {net_rmse:.4g}, ridge ALS {als_rmse:.4g}, vs "
                f"{mm_rmse:.4g}): returned the mean model, refitted on all entries. The data may hold no "
                "low-rank structure beyond the means at this sampling; more observed entries, a smaller "
                "rank or a larger weight_decay may help; more iterations will not."
            )
        else:
            h1.message += " The result is the mean model (row / column biases), refitted on all entries."
        for w in caught:
            if not issubclass(w.category, RuntimeWarning) or failed:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if not failed:
            warnings.warn(h1.message, RuntimeWarning, stacklevel=2)
        first.set_predictor(mean_all.predict, mean_all.dense)
        first.mean_model = mean_all
        return first
    blend = None  # (held-out RMSE, weight of the network) of a weighted mean of network and ridge ALS
    if ridge is not None and math.isfinite(net_rmse):
        p_net, p_als = first.predict(vr, vc), ridge[1].predict(vr, vc)
        for wgt in BLEND_WEIGHTS:
            e = float((wgt * p_net + (1 - wgt) * p_als - vv).square().mean().sqrt())
            if e < min(net_rmse, als_rmse, math.inf if blend is None else blend[0]):
                blend = (e, wgt)
    h1.blend_rmse, h1.blend_weight = (None, None) if blend is None else blend
    if (
        als_rmse < net_rmse and blend is None
    ):  # the ridge ALS won on the held-out entries: refit it on all entries
        _select_ridge(first, ridge, E_all, n_val, net_rmse, mm_rmse, seed, dl, caught)
        return first

    def finish(res: CompletionResult) -> CompletionResult:
        """The network ``res`` as the result, or its blend with the ridge ALS refitted on all entries."""
        if blend is None:
            return res
        h, (e, wgt) = res.history, blend
        chosen = ridge[1]
        left = None if dl is None else max(dl - time.perf_counter(), 0.0)
        if chosen.result.status == "converged" and (left is None or left > 0):
            fitted = refit_ridge_als(chosen, E_all, seed=seed, time_limit=left)
        else:
            fitted = chosen
        M_net = res.matrix
        h.selected = "blend"
        h.polish_info = (
            f"blend: {wgt:g} x network + {1 - wgt:g} x ridge ALS (rank {chosen.rank}, reg {fitted.result.reg:g}"
            f"{', scaled' if chosen.scaled else ''}), the weight chosen on the {n_val} held-out entries "
            f"(RMSE {e:.4g}; network {net_rmse:.4g}, ridge ALS {als_rmse:.4g}, mean model {mm_rmse:.4g})"
        )
        h.message += "; " + h.polish_info
        res.ridge_result = fitted
        res.set_predictor(
            lambda r, c: (
                wgt * M_net[r.to(M_net.device), c.to(M_net.device)] + (1 - wgt) * fitted.predict(r, c)
            ),
            lambda: wgt * M_net + (1 - wgt) * fitted.dense(),
        )
        return res

    h1.selected = "network"
    # refit on all entries for the number of iterations that was best on the held-out entries
    early = h1.status == "early_stopped" or (
        h1.best_iteration is not None and h1.best_iteration < 0.8 * h1.n_iters
    )
    iters = int(h1.best_iteration) if early and h1.best_iteration is not None else max_iters
    spent = time.perf_counter() - start
    per_iter = h1.train_time / max(h1.n_iters, 1)
    left = None if time_limit is None else time_limit - spent
    if left is not None and left < 1.1 * per_iter * iters:
        h1.refit = (
            f"none: the time limit leaves {max(left, 0):.3g} s, the refit on all entries needs about "
            f"{per_iter * iters:.3g} s; the network was fitted without the {n_val} held-out entries"
        )
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return finish(first)
    with warnings.catch_warnings(record=True) as caught2:
        warnings.simplefilter("always")
        second = _complete_once(
            observed,
            mask,
            max_iters=iters,
            time_limit=left,
            polish=polish,
            warn_empty=False,
            hint_from=h1,
            **kw,
        )
    h2 = second.history
    h2.val_rmse, h2.best_iteration = h1.val_rmse, h1.best_iteration
    h2.holdout_rmse, h2.mean_model_rmse, h2.ridge_polish_rmse = net_rmse, mm_rmse, h1.ridge_polish_rmse
    h2.selected = "network"
    h2.refit = f"on all {rows.numel()} observed entries for {h2.n_iters} iterations"
    if h2.reason in ("tol", "target_error", "stationary"):
        pass  # the refit converged on its own: its status stands
    elif early:
        h2.status, h2.reason = "early_stopped", "patience"
        h2.message = (
            f"early stopped: the held-out RMSE ({n_val} entries, {net_rmse:.4g}; mean model "
            f"{mm_rmse:.4g}) was best at iteration {h1.best_iteration}; refitted on all entries for "
            f"{h2.n_iters} iterations"
        )
        caught2 = [w for w in caught2 if not issubclass(w.category, RuntimeWarning)]
    for w in list(caught) + list(caught2):
        if issubclass(w.category, RuntimeWarning) and w in caught:
            continue  # the first fit's warnings: the refit's status replaces its status
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return finish(second)
