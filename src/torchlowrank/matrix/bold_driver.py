"""The adaptive step of :func:`~torchlowrank.matrix.train_gd` ("bold driver"; its module
docstring): after a step that did not raise the objective the step grows by ``grow``; a step that
raised it (beyond its rounding error) or made it non-finite is undone — the parameters and the
problem's own fitted terms restored — and the step halves."""

from __future__ import annotations

import math

import torch

__all__ = ["BoldDriver"]


class BoldDriver:
    """The step ``eta`` of a full-batch descent of ``params`` (each with its ``scales`` multiplier,
    0 = not trained) on ``problem``, starting at ``lr``. The objective is the loss plus ``wd / 2``
    times the squared norm of the trained factors. ``zero_loss``: the loss of the zero model (the
    scale of the rounding error allowed in a comparison)."""

    def __init__(
        self,
        params: list[torch.Tensor],
        scales: list[float],
        problem,
        lr: float,
        grow: float,
        zero_loss: float,
    ):
        self.params, self.scales, self.problem = params, scales, problem
        self.lr = self.eta = float(lr)
        self.grow, self.zero_loss = grow, zero_loss
        self.has_state = problem.trained_state() is not None
        self.accepted: tuple | None = (
            None  # (objective, grads, params, problem state, loss) of the last accepted point
        )
        self.n_rejected = 0
        self.last_trial_finite = True

    def objective(self, loss: torch.Tensor, wd: float) -> float:
        out = float(loss)
        if wd:
            out += 0.5 * wd * sum(float(p.square().sum()) for p, sc in zip(self.params, self.scales) if sc)
        return out

    def remember(
        self, loss: torch.Tensor, grads: list[torch.Tensor], wd: float, objective: float | None = None
    ) -> None:
        """Make the current point the accepted one (the reference the next step is judged against)."""
        self.accepted = (
            self.objective(loss, wd) if objective is None else objective,
            grads,
            [p.detach().clone() for p in self.params],
            self.problem.trained_state() if self.has_state else None,
            loss,
        )

    def forget(self) -> None:
        """No reference point (the objective changed, e.g. weight decay switched on)."""
        self.accepted = None

    def judge(
        self, loss: torch.Tensor, grads: list[torch.Tensor], wd: float
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss and gradients to step from: the current point's if the last step did not raise
        the objective (the step grows), else the accepted point's, restored (the step halves)."""
        lt = self.objective(loss, wd)
        a = self.accepted
        if a is not None and not (lt <= a[0] + 1e-13 * math.sqrt(max(a[0], 0.0) * self.zero_loss)):
            self.last_trial_finite = math.isfinite(lt)
            for p, q in zip(self.params, a[2]):
                p.copy_(q)
            if a[3] is not None:
                self.problem.load_trained_state(a[3])
            self.eta *= 0.5
            self.n_rejected += 1
            return a[4], a[1]
        if a is not None:
            self.eta *= self.grow
        self.remember(loss, grads, wd, lt)
        return loss, grads

    @property
    def exhausted(self) -> bool:
        """No step decreases the objective any more: the step fell below 1e-10 of ``lr``."""
        return self.eta < 1e-10 * self.lr
