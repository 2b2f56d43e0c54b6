"""Full-batch gradient descent for deep factorizations, with scale-free stopping rules, honest
statuses, divergence detection, early stopping on a validation set, and a history.

The loop runs on hand-written gradients (``model.loss_and_grads(problem)``) without autograd. The
loss is read back to the host only every ``check_every`` iterations (divergence / tolerance checks)
and the end-to-end matrix is only formed every ``eval_every`` iterations (recovery / test errors).

Statuses (``History.status``):

- ``"converged"``: the relative train residual ``sqrt(loss / loss(0))`` fell to ``tol`` (by gradient
  descent, or by an exact ``polish`` of the run's solution that the trainer re-checked), or the
  recovery error to ``target_error``, or the loss stopped moving (relative decrease below
  ``ftol`` over the last ``window`` iterations and not accelerating, after the escape from the
  initial plateau);
  ``History.reason`` says which ("tol", "target_error", "stationary").
- ``"early_stopped"``: no validation improvement for ``patience`` evaluations counted from the
  escape (the best parameters are restored).
- ``"not_converged"``: the budget (``max_iters`` or ``time_limit``) ran out while still improving.
- ``"stalled_at_init"``: the budget ran out before the loss fell by ``escape`` (default 1%) from
  its initial value: the run never left the small initialisation.
- ``"diverged"``: a non-finite loss, or one above ``blowup`` times the initial one.

The last three are failures: each also raises a ``RuntimeWarning`` that says what to change.

Step size: fixed (``lr``), or with ``adaptive=True`` the "bold driver" rule on the full-batch
loss (plus ``weight_decay / 2`` times the squared norm of the trained factors when weight decay is
on): after every step that did not increase it the step is multiplied by ``grow``
(default 1.05); a step that increased it (or made it non-finite) is undone — parameters and the
problem's own fitted terms restored — and the step halved. Each gradient evaluation counts as one
iteration, rejected or not. The loss is then monotone, and the step follows the local curvature:
on the initial plateau of a small initialisation (curvature ~ init scale) it grows by orders of
magnitude, which is where fixed-step GD spends most of its iterations.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace

import torch

from .bold_driver import BoldDriver
from .early_stopping import EarlyStopping
from .polish_handoff import attempt_polish

__all__ = ["History", "GDConfig", "train_gd", "final_status", "SUCCESS_STATUSES", "FAILURE_STATUSES"]

SUCCESS_STATUSES = ("converged", "early_stopped")
FAILURE_STATUSES = ("not_converged", "stalled_at_init", "diverged")


@dataclass
class History:
    """What a run recorded, every ``eval_every`` iterations (and at the last one).

    iterations; train_loss; recovery_error (||Phi - M||_F / ||M||_F, when the truth is known);
    test_rmse / val_rmse (held-out entries, when given); wall_time (seconds of training, excluding
    the time spent computing these records). status: "converged" | "early_stopped" |
    "not_converged" | "stalled_at_init" | "diverged" (see the module docstring); reason: why it
    stopped ("tol", "target_error", "stationary", "patience", "max_iters", "time_limit",
    "blowup"); message explains it; escaped_at: first checked iteration at which the loss was
    ``escape`` below its initial value (None if never). polished_at: the iteration at which an exact
    polish of the solution finished the run (None if none did); polish_info: what the polish
    attempts did; final_lr: the step at the end (it changes with ``adaptive=True``).
    holdout_rmse / mean_model_rmse: the network's best and the mean model's RMSE on the entries
    :func:`complete` held out (None when it held none out), ridge_polish_rmse that of the ridge
    polish; selected: "network" | "ridge_polish" | "blend" | "mean_model"; refit: what was fitted
    after the selection on them; blend_rmse / blend_weight: the held-out RMSE and network weight of
    the best blend of network and ridge ALS (None when no blend beat both).
    """

    iterations: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    recovery_error: list[float] = field(default_factory=list)
    test_rmse: list[float] = field(default_factory=list)
    val_rmse: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    status: str = ""
    reason: str = ""
    message: str = ""
    escaped_at: int | None = None
    n_iters: int = 0
    train_time: float = 0.0
    best_iteration: int | None = None
    polished_at: int | None = None
    polish_info: str = ""
    final_lr: float | None = None
    holdout_rmse: float | None = None
    mean_model_rmse: float | None = None
    refit: str = ""
    ridge_polish_rmse: float | None = None
    selected: str = ""
    blend_rmse: float | None = None
    blend_weight: float | None = None

    def time_to(self, error: float) -> float | None:
        """Training time at the first record with recovery error <= ``error`` (None if never)."""
        for e, t in zip(self.recovery_error, self.wall_time):
            if e <= error:
                return t
        return None

    def iterations_to(self, error: float) -> int | None:
        for e, it in zip(self.recovery_error, self.iterations):
            if e <= error:
                return it
        return None

    @property
    def ok(self) -> bool:
        """True for "converged" and "early_stopped"."""
        return self.status in SUCCESS_STATUSES

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _rmse(model, entries, unit: float = 1.0, problem=None) -> float:
    rows, cols, vals = entries
    X, Bt = model.factor_pair()
    pred = (X.index_select(0, rows) * Bt.index_select(0, cols)).sum(1)
    offsets = problem.entry_offsets(rows, cols) if problem is not None else None
    if offsets is not None:  # a problem with bias terms fitted beside the network
        pred = pred + offsets
    return unit * float((pred - vals.to(pred.dtype)).square().mean().sqrt())


@dataclass
class GDConfig:
    """The options of :func:`train_gd` (see there), validated in one place."""

    max_iters: int = 10_000
    tol: float = 1e-9
    ftol: float = 0.0
    window: int = 1000
    target_error: float | None = None
    weight_decay: float = 0.0
    eval_every: int = 10
    check_every: int = 10
    blowup: float = 1e6
    escape: float = 0.01
    validation: tuple | None = None
    patience: int | None = None
    time_limit: float | None = None
    callback: object = None
    num_threads: int | None = None
    progress: bool | None = None
    adaptive: bool = False
    grow: float = 1.05
    polish: object = None
    decay_from_escape: bool = False

    def validate(self, lr, problem) -> None:
        """ValueError for a bad option (or an lr / problem that cannot go with them)."""
        if self.num_threads is not None and (
            isinstance(self.num_threads, bool)
            or not isinstance(self.num_threads, int)
            or self.num_threads < 1
        ):
            raise ValueError(f"num_threads must be a positive int or None, got {self.num_threads!r}")
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if self.eval_every < 1 or self.check_every < 1 or self.window < 1:
            raise ValueError("eval_every, check_every and window must be >= 1")
        if not (self.tol >= 0 and self.ftol >= 0 and 0 < self.escape < 1):
            raise ValueError(
                f"need tol >= 0, ftol >= 0 and 0 < escape < 1, got {self.tol!r}, {self.ftol!r}, "
                f"{self.escape!r}"
            )
        if self.adaptive and not (self.grow >= 1 and math.isfinite(self.grow)):
            raise ValueError(f"grow must be a finite number >= 1, got {self.grow!r}")
        if self.polish is not None and not callable(self.polish):
            raise ValueError("polish must be None or a callable polish(t, model, problem, target_loss)")
        if self.target_error is not None and problem.truth is None:
            raise ValueError("target_error needs the true matrix: pass truth= to the problem")
        if self.time_limit is not None and not self.time_limit >= 0:
            raise ValueError(f"time_limit must be >= 0 seconds or None, got {self.time_limit!r}")


def stationary(checks: list[tuple[int, float]], span: int, escaped_at: int, ftol: float) -> bool:
    """The loss at the checks ``(iteration, loss)`` fell by at most ``ftol`` (relative) over the last
    ``span`` checks, and by no more than over the ``span`` checks before, all after the escape (a
    saddle between two learned directions looks flat too, but there the decrease accelerates as
    the next direction grows)."""
    j = len(checks) - 1 - span
    i0 = j - span
    if i0 < 0 or checks[i0][0] < escaped_at:
        return False
    d1, d0 = checks[j][1] - checks[-1][1], checks[i0][1] - checks[j][1]
    return d1 <= ftol * checks[j][1] and d1 <= d0


def final_status(reason: str | None, escaped: bool) -> str:
    """The status a stop ``reason`` means (module docstring)."""
    if reason == "blowup":
        return "diverged"
    if reason in ("tol", "target_error", "stationary"):
        return "converged"
    if reason == "patience":
        return "early_stopped"
    return "not_converged" if escaped else "stalled_at_init"


@torch.no_grad()
def train_gd(model, problem, lr: float, *, config: GDConfig | None = None, **options) -> History:
    """Full-batch GD: ``W <- W - lr * s * (grad + weight_decay * W)`` for every factor, s the factor's
    ``model.lr_scales()`` multiplier (gamma for the outer factors of a compressed network).

    Stops at the first of (statuses in the module docstring): relative train residual
    ``sqrt(loss / loss(0)) <= tol`` (scale-free; 0 disables; checked every ``check_every``);
    recovery error <= ``target_error`` (checked every ``eval_every``, needs ``problem.truth``);
    relative loss decrease ``<= ftol`` over the last ``window`` iterations, and no larger than over
    the window before, once escaped (off by default, ``ftol=0``: deep factorizations learn in stages
    and sit on flat saddles between them, which look stationary — the depth-width reproduction
    stopped at 0.7-0.9 recovery error with ftol=1e-10; a stationary stop above a 1e-6 relative
    residual warns); no
    validation improvement for ``patience`` evaluations after the escape (``validation = (rows,
    cols, values)``; the best parameters are restored); ``max_iters``; ``time_limit`` seconds of
    wall-clock time (evaluations and the polish included); divergence. ``callback(t, model)`` runs
    at every evaluation. ``num_threads``: torch
    CPU threads for the loop, restored afterwards (default None: the caller's setting is left
    alone). Validation / test RMSEs are multiplied by ``problem.unit`` when the problem has one
    (a normalised problem reporting in the data's units).

    adaptive / grow: the bold-driver step (module docstring); ``lr`` is then the initial step.
    decay_from_escape: apply ``weight_decay`` only from the escape on (weight decay pulls a small
    initialisation to zero faster than the loss's gradient, ~init^(2(L-1)), pushes it out).
    polish: None, or a callable ``polish(t, model, problem, target_loss) -> str | None`` tried at
    every check after the escape; it may replace the model's parameters (and the problem's fitted
    terms) by a solution it computed and return a message. The trainer then re-evaluates the loss
    itself: if it is <= ``target_loss`` (the loss at relative residual ``tol``) the run stops
    "converged" (reason "tol", ``History.polished_at`` set); otherwise the parameters are restored
    and descent continues (the polisher decides when to try again). Returns a :class:`History`.

    The options are the fields of :class:`GDConfig`: pass them as keywords or as ``config=``.
    """
    if config is not None and options:
        raise ValueError("pass the options either as config= or as keywords, not both")
    try:
        cfg = config if config is not None else GDConfig(**options)
    except TypeError as exc:
        raise ValueError(f"unknown train_gd option: {exc}") from None
    cfg.validate(lr, problem)
    if cfg.num_threads is not None:
        saved = torch.get_num_threads()
        torch.set_num_threads(cfg.num_threads)
        try:
            return train_gd(model, problem, lr, config=replace(cfg, num_threads=None))
        finally:
            torch.set_num_threads(saved)
    (
        max_iters,
        tol,
        ftol,
        window,
        target_error,
        weight_decay,
        eval_every,
        check_every,
        blowup,
        escape,
        validation,
        patience,
        time_limit,
        callback,
        progress,
        adaptive,
        grow,
        polish,
        decay_from_escape,
    ) = (
        cfg.max_iters,
        cfg.tol,
        cfg.ftol,
        cfg.window,
        cfg.target_error,
        cfg.weight_decay,
        cfg.eval_every,
        cfg.check_every,
        cfg.blowup,
        cfg.escape,
        cfg.validation,
        cfg.patience,
        cfg.time_limit,
        cfg.callback,
        cfg.progress,
        cfg.adaptive,
        cfg.grow,
        cfg.polish,
        cfg.decay_from_escape,
    )
    unit = float(problem.unit)
    params = list(model.factor_parameters())
    scales = model.lr_scales()
    zero_loss = max(problem.zero_loss(), 1e-300)
    driver = BoldDriver(params, scales, problem, lr, grow, zero_loss) if adaptive else None
    eta = float(lr)
    wd_prev = weight_decay if not decay_from_escape else 0.0
    hist = History()

    early = EarlyStopping(params, problem, patience)
    train_time = 0.0
    loss0 = None
    checks: list[tuple[int, float]] = []  # (iteration, loss) at every check, for the stationarity test

    def record(t: int, loss: torch.Tensor) -> str | None:
        hist.iterations.append(t)
        hist.train_loss.append(float(loss))
        hist.wall_time.append(train_time)
        stop = None
        if problem.truth is not None:
            err = problem.recovery_error(model.end_to_end())
            hist.recovery_error.append(err)
            if target_error is not None and err <= target_error:
                stop = "target_error"
        if problem.test is not None:
            hist.test_rmse.append(_rmse(model, problem.test, unit, problem))
        if validation is not None:
            v = _rmse(model, validation, unit, problem)
            hist.val_rmse.append(v)
            if early.update(t, v, hist.escaped_at is not None):
                stop = "patience"
            hist.best_iteration = early.best_iteration
        if callback is not None:
            callback(t, model)
        return stop

    from ..progress import progress_bar

    bar = progress_bar(total=max_iters, desc="gd", enabled=progress)
    reason = None
    t = 0
    wall0 = time.perf_counter()  # time_limit counts wall-clock time, evaluations and polish included
    try:
        for t in range(max_iters + 1):
            t0 = time.perf_counter()
            loss, grads = model.loss_and_grads(problem)
            wd = weight_decay if (not decay_from_escape or hist.escaped_at is not None) else 0.0
            if wd != wd_prev:  # the objective changed (weight decay switched on): a new reference point
                wd_prev = wd
                if driver is not None:
                    driver.forget()
            if driver is not None:
                loss, grads = driver.judge(loss, grads, wd)
                eta = driver.eta
            train_time += time.perf_counter() - t0
            checked = t % check_every == 0 or t == max_iters
            if checked:
                lv = float(loss)
                if driver is not None and driver.exhausted:
                    if (
                        driver.last_trial_finite
                    ):  # no step decreases the loss: a (numerically) stationary point
                        reason = "stationary"
                        rel_now = math.sqrt(max(lv, 0.0) / zero_loss)
                        hist.message = (
                            f"converged: no step decreased the train loss any more (the adaptive step fell "
                            f"to {eta:.3g} from lr={lr:g}) at iteration {t}, relative train residual "
                            f"{rel_now:.3g}: a numerically stationary point"
                        )
                    else:
                        reason = "blowup"
                        hist.message = (
                            f"gradient descent made no progress at iteration {t}: every step, down to "
                            f"{eta:.3g} (from lr={lr:g}), gave a non-finite loss; the problem's gradients "
                            "may be wrong or not finite"
                        )
                    break
                if loss0 is None:
                    loss0 = max(lv, 1e-300)
                if not math.isfinite(lv) or lv > blowup * loss0:
                    reason = "blowup"
                    hist.message = (
                        f"gradient descent diverged at iteration {t} (train loss {lv:.3g}, initial "
                        f"{loss0:.3g}); the step lr={lr:g} is too large for this problem: retry with "
                        f"a smaller step, e.g. lr={lr / 4:g}"
                    )
                    break
                if hist.escaped_at is None and lv <= (1 - escape) * loss0:
                    hist.escaped_at = t
                    early.escaped()
                checks.append((t, lv))
                if tol > 0 and lv <= tol * tol * zero_loss:
                    reason = "tol"
                elif polish is not None and hist.escaped_at is not None and tol > 0:
                    t1 = time.perf_counter()
                    deadline = None if time_limit is None else wall0 + time_limit
                    out = attempt_polish(polish, t, model, problem, tol * tol * zero_loss, deadline)
                    if out.info is not None:
                        hist.polish_info = out.info
                    if out.loss is not None:  # the parameters were touched: continue from where it left them
                        loss, grads = out.loss, out.grads
                        if out.accepted:
                            reason, hist.polished_at = "tol", t
                        elif driver is not None:  # the restored point is the reference again
                            driver.remember(loss, grads, wd)
                    train_time += time.perf_counter() - t1
                elif hist.escaped_at is not None and ftol > 0 and t - hist.escaped_at >= window:
                    if stationary(checks, window // check_every, hist.escaped_at, ftol):
                        reason = "stationary"
            if t % eval_every == 0 or t == max_iters or reason is not None:
                stop = record(t, loss)
                if stop is not None and reason is None:
                    reason = stop
            if reason is not None:
                break
            if t == max_iters:
                reason = "max_iters"
                break
            if time_limit is not None and time.perf_counter() - wall0 >= time_limit:
                reason = "time_limit"
                record(t, loss)
                break
            t0 = time.perf_counter()
            for p, g, sc in zip(params, grads, scales):
                if wd != 0 and sc != 0:
                    p.mul_(1.0 - eta * sc * wd)
                if sc != 0:
                    p.sub_(g, alpha=eta * sc)
            train_time += time.perf_counter() - t0
            if bar is not None and t % 100 == 0:
                bar.update(100)
    finally:
        if bar is not None:
            bar.close()
    if reason == "patience":
        early.restore()
    status = final_status(reason, hist.escaped_at is not None)
    hist.status, hist.reason = status, reason
    hist.n_iters = t
    hist.train_time = train_time
    hist.final_lr = eta
    budget = (
        f"the iteration budget (max_iters={max_iters})"
        if reason == "max_iters"
        else f"the time limit ({time_limit} s) after {t} iterations"
    )
    rel = math.sqrt(max(hist.train_loss[-1], 0.0) / zero_loss) if hist.train_loss else float("nan")
    if not hist.message:
        hist.message = {
            "target_error": f"converged: recovery error <= {target_error} at iteration {t}",
            "tol": f"converged: relative train residual {rel:.3g} <= tol={tol:g} at iteration {t}"
            + (f" ({hist.polish_info})" if hist.polished_at is not None else ""),
            "stationary": f"converged: the train loss fell by less than a fraction ftol={ftol:g} over the last "
            f"{window} iterations (iteration {t}, relative train residual {rel:.3g})",
            "patience": f"early stopped: validation RMSE did not improve for {patience} evaluations after the "
            f"escape at iteration {hist.escaped_at}; restored the parameters of iteration "
            f"{hist.best_iteration}",
        }.get(reason, "")
        if status == "not_converged":
            hist.message = (
                f"not converged: stopped at {budget} while the train loss was still falling "
                f"(relative train residual {rel:.3g}, tol={tol:g})."
            )
            if validation is None:
                hist.message += (
                    " Raise max_iters / time_limit only if the data should be fitted exactly: on noisy "
                    "data more iterations fit the noise (early stopping on a validation set tells when "
                    "to stop)."
                )
        elif status == "stalled_at_init":
            hist.message = (
                f"stalled at init: stopped at {budget} before the train loss fell by {escape:.0%} "
                f"from its initial value ({rel:.3g} relative residual): the network never left "
                f"its small initialisation; raise init_scale, the step lr={lr:g} or max_iters "
                f"(or normalise the data: tlr.matrix.complete does)"
            )
    if reason == "stationary" and rel > 1e-6:
        warnings.warn(
            f"{hist.message}. The loss is flat but the fit is not exact: this is the optimum of noisy "
            "data, or a saddle between two learning stages of the deep factorization (they look alike). "
            "If the data should be fitted exactly, pass ftol=0 to run on to tol / max_iters.",
            RuntimeWarning,
            stacklevel=3,
        )
    if status in FAILURE_STATUSES:
        warnings.warn(hist.message, RuntimeWarning, stacklevel=3)  # past the no_grad wrapper
    return hist
