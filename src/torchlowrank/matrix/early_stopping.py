"""Early stopping of :func:`~torchlowrank.matrix.train_gd` on a validation set: the best
validation RMSE so far, the parameters (and the problem's own fitted terms, e.g. biases) at it,
and the count of evaluations without improvement, which starts only after the escape from the
small initialisation's plateau (before it, no evaluation improves and none should count)."""

from __future__ import annotations

import math

import torch

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Keeps the best state of ``params`` by validation RMSE; ``patience`` evaluations without
    improvement after the escape end the run (None: never, the best state is still kept)."""

    def __init__(self, params: list[torch.Tensor], problem, patience: int | None):
        self.params, self.problem, self.patience = params, problem, patience
        self.best_val, self.best_iteration, self.since_best = math.inf, None, 0
        self._best: list[torch.Tensor] | None = None
        self._best_terms = None

    def update(self, t: int, val_rmse: float, escaped: bool) -> bool:
        """Record the evaluation at iteration ``t``; True when the patience is spent."""
        if val_rmse < self.best_val:
            self.best_val, self.best_iteration, self.since_best = val_rmse, t, 0
            self._best = [p.detach().clone() for p in self.params]
            self._best_terms = self.problem.trained_state()  # terms fitted beside the network, or None
            return False
        if not escaped:
            return False
        self.since_best += 1
        return self.patience is not None and self.since_best >= self.patience

    def escaped(self) -> None:
        """The escape happened now: evaluations without improvement count from here."""
        self.since_best = 0

    def restore(self) -> None:
        """Put the best parameters (and the problem's fitted terms) back."""
        if self._best is None:
            return
        for p, b in zip(self.params, self._best):
            p.copy_(b)
        if self._best_terms is not None:
            self.problem.load_trained_state(self._best_terms)
