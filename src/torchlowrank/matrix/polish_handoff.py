"""How :func:`~torchlowrank.matrix.train_gd` hands its model to a polish (e.g. the exact ALS
polish of :mod:`~torchlowrank.matrix.polish`) and takes it back: the polish may replace the
parameters (and the problem's fitted terms) by a solution it computed; the trainer re-evaluates
the loss itself and keeps the solution only if it reaches the target, otherwise everything is
restored as it was."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PolishOutcome", "attempt_polish"]


@dataclass
class PolishOutcome:
    """``accepted``: the polished solution reached the target and stays. ``info``: the message for
    ``History.polish_info`` (None: nothing to report). ``loss`` / ``grads``: the loss and gradients
    at the point the trainer continues from, when the parameters were touched (None otherwise)."""

    accepted: bool
    info: str | None = None
    loss: torch.Tensor | None = None
    grads: list[torch.Tensor] | None = None


def attempt_polish(
    polish, t: int, model, problem, target_loss: float, deadline: float | None
) -> PolishOutcome:
    """Call ``polish(t, model, problem, target_loss)`` (with its ``deadline`` attribute set, when it
    has one and ``deadline`` is given) and judge its solution by the trainer's own loss."""
    params = list(model.factor_parameters())
    saved = [p.detach().clone() for p in params]
    saved_terms = problem.trained_state()
    if deadline is not None and hasattr(polish, "deadline"):  # the polish keeps the time limit too
        polish.deadline = deadline
    msg = polish(t, model, problem, target_loss)
    attempts = getattr(polish, "attempts", None)
    info = f"polish attempts (iteration, rank, relative residual): {attempts}" if attempts else None
    if not msg:
        return PolishOutcome(False, info)
    loss, grads = model.loss_and_grads(problem)
    lp = float(loss)
    if math.isfinite(lp) and lp <= target_loss:
        return PolishOutcome(True, msg, loss, grads)
    for p, q in zip(params, saved):
        p.copy_(q)
    if saved_terms is not None:
        problem.load_trained_state(saved_terms)
    loss, grads = model.loss_and_grads(problem)
    return PolishOutcome(
        False, f"{msg}; rejected: the trainer's loss {lp:.3g} > {target_loss:.3g}", loss, grads
    )
