"""Full-batch gradient descent for deep factorizations, with stopping rules, divergence detection,
early stopping on a validation set, and a history.

The loop runs on hand-written gradients (``model.loss_and_grads(problem)``) without autograd. The
loss is read back to the host only every ``check_every`` iterations (divergence / tolerance checks)
and the end-to-end matrix is only formed every ``eval_every`` iterations (recovery / test errors).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch

__all__ = ["History", "train_gd"]


@dataclass
class History:
    """What a run recorded, every ``eval_every`` iterations (and at the last one).

    iterations; train_loss; recovery_error (||Phi - M||_F / ||M||_F, when the truth is known);
    test_rmse / val_rmse (held-out entries, when given); wall_time (seconds of training, excluding
    the time spent computing these records). status: "target_reached" | "tol_reached" |
    "max_iters" | "early_stopped" | "diverged" | "time_limit"; message explains it.
    """

    iterations: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    recovery_error: list[float] = field(default_factory=list)
    test_rmse: list[float] = field(default_factory=list)
    val_rmse: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    status: str = ""
    message: str = ""
    n_iters: int = 0
    train_time: float = 0.0
    best_iteration: int | None = None

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

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _rmse(model, entries) -> float:
    rows, cols, vals = entries
    X, Bt = model.factor_pair()
    pred = (X.index_select(0, rows) * Bt.index_select(0, cols)).sum(1)
    return float((pred - vals.to(pred.dtype)).square().mean().sqrt())


@torch.no_grad()
def train_gd(model, problem, lr: float, *, max_iters: int = 10_000, tol: float = 0.0,
             target_error: float | None = None, weight_decay: float = 0.0, eval_every: int = 10,
             check_every: int = 10, blowup: float = 1e6, validation: tuple | None = None,
             patience: int | None = None, time_limit: float | None = None, callback=None,
             num_threads: int | str | None = "auto", progress: bool | None = None) -> History:
    """Full-batch GD: ``W <- W - lr * s * (grad + weight_decay * W)`` for every factor, s the factor's
    ``model.lr_scales()`` multiplier (gamma for the outer factors of a compressed network).

    Stops at the first of: recovery error <= ``target_error`` (checked every ``eval_every``, needs
    ``problem.truth``); train loss <= ``tol`` (checked every ``check_every``); ``max_iters``;
    ``time_limit`` seconds of training; no validation improvement for ``patience`` evaluations
    (``validation = (rows, cols, values)``; the best parameters are restored); divergence (a
    non-finite loss, or a loss above ``blowup`` times the initial one: a warning suggests a smaller
    step). ``callback(t, model)`` runs at every evaluation. ``num_threads``: torch CPU threads for the
    loop (restored afterwards); None keeps the current setting; "auto" uses 1 for networks of width
    <= 64 (the compressed one), whose operations are too small to share between threads (on a busy
    machine every parallel region then waits for a free core). Returns a :class:`History`.
    """
    if num_threads == "auto":
        num_threads = 1 if min(min(p.shape) for p in model.factor_parameters()) <= 64 else None
    if num_threads is not None:
        saved = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            return train_gd(model, problem, lr, max_iters=max_iters, tol=tol, target_error=target_error,
                            weight_decay=weight_decay, eval_every=eval_every, check_every=check_every,
                            blowup=blowup, validation=validation, patience=patience, time_limit=time_limit,
                            callback=callback, num_threads=None, progress=progress)
        finally:
            torch.set_num_threads(saved)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if eval_every < 1 or check_every < 1:
        raise ValueError("eval_every and check_every must be >= 1")
    if target_error is not None and problem.truth is None:
        raise ValueError("target_error needs the true matrix: pass truth= to the problem")
    params = list(model.factor_parameters())
    scales = model.lr_scales()
    steps = [lr * s for s in scales]
    decays = [1.0 - lr * s * weight_decay for s in scales]
    hist = History()
    best_val, best_state, since_best = math.inf, None, 0
    train_time = 0.0
    loss0 = None

    def record(t: int, loss: torch.Tensor) -> str | None:
        nonlocal best_val, best_state, since_best
        hist.iterations.append(t)
        hist.train_loss.append(float(loss))
        hist.wall_time.append(train_time)
        stop = None
        if problem.truth is not None:
            err = problem.recovery_error(model.end_to_end())
            hist.recovery_error.append(err)
            if target_error is not None and err <= target_error:
                stop = "target_reached"
        if getattr(problem, "test", None) is not None:
            hist.test_rmse.append(_rmse(model, problem.test))
        if validation is not None:
            v = _rmse(model, validation)
            hist.val_rmse.append(v)
            if v < best_val:
                best_val, since_best, hist.best_iteration = v, 0, t
                best_state = [p.detach().clone() for p in params]
            else:
                since_best += 1
                if patience is not None and since_best >= patience:
                    stop = "early_stopped"
        if callback is not None:
            callback(t, model)
        return stop

    from ..progress import progress_bar

    bar = progress_bar(total=max_iters, desc="gd", enabled=progress)
    status = "max_iters"
    t = 0
    loss = None
    try:
        for t in range(max_iters + 1):
            t0 = time.perf_counter()
            loss, grads = model.loss_and_grads(problem)
            train_time += time.perf_counter() - t0
            if t % check_every == 0 or t == max_iters:
                lv = float(loss)
                if loss0 is None:
                    loss0 = max(lv, 1e-300)
                if not math.isfinite(lv) or lv > blowup * loss0:
                    status = "diverged"
                    hist.message = (f"gradient descent diverged at iteration {t} (train loss {lv:.3g}, initial "
                                    f"{loss0:.3g}); the step lr={lr:g} is too large for this problem: retry with "
                                    f"a smaller step, e.g. lr={lr / 4:g}")
                    warnings.warn(hist.message, RuntimeWarning, stacklevel=2)
                    break
                if lv <= tol:
                    status = "tol_reached"
            if t % eval_every == 0 or t == max_iters or status == "tol_reached":
                stop = record(t, loss)
                if stop is not None:
                    status = stop
            if status != "max_iters" or t == max_iters:
                break
            if time_limit is not None and train_time >= time_limit:
                status = "time_limit"
                record(t, loss)
                break
            t0 = time.perf_counter()
            for p, g, a, dcy in zip(params, grads, steps, decays):
                if dcy != 1.0:
                    p.mul_(dcy)
                if a != 0:
                    p.sub_(g, alpha=a)
            train_time += time.perf_counter() - t0
            if bar is not None and t % 100 == 0:
                bar.update(100)
    finally:
        if bar is not None:
            bar.close()
    if status == "early_stopped" and best_state is not None:
        for p, b in zip(params, best_state):
            p.copy_(b)
    hist.status = status
    hist.n_iters = t
    hist.train_time = train_time
    if not hist.message:
        hist.message = {
            "target_reached": f"recovery error <= {target_error} at iteration {t}",
            "tol_reached": f"train loss <= {tol} at iteration {t}",
            "max_iters": f"stopped at the iteration budget ({max_iters})",
            "early_stopped": f"validation RMSE did not improve for {patience} evaluations; restored the "
                             f"parameters of iteration {hist.best_iteration}",
            "time_limit": f"stopped at the time limit ({time_limit} s) after {t} iterations",
        }.get(status, status)
    return hist
