"""``complete``: matrix completion with a (compressed) deep factorization, in one call."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .compressed import CompressedFactorization, check_rank
from .factorization import DeepFactorization
from .problems import Completion
from .steps import suggest_lr, suggest_rank
from .trainer import History, train_gd

__all__ = ["CompletionResult", "complete"]


@dataclass
class CompletionResult:
    """matrix: the completed (m, n) matrix (float64); history: the run's :class:`History`;
    model: the trained network; problem: the :class:`Completion`; rank: r_hat used (None for the
    uncompressed network); lr: the step used."""

    matrix: torch.Tensor
    history: History
    model: torch.nn.Module
    problem: Completion
    rank: int | None
    lr: float


def complete(observed: torch.Tensor, mask: torch.Tensor, depth: int = 3, rank: int | None = None,
             compressed: bool = True, *, width: int | None = None, lr: float | None = None,
             gamma: float = 0.01, init_scale: float = 1e-3, reduction: str = "mean",
             max_iters: int = 20_000, tol: float = 0.0, target_error: float | None = None,
             truth: torch.Tensor | None = None, test: tuple | None = None, validation: tuple | None = None,
             patience: int | None = None, eval_every: int = 50, weight_decay: float = 0.0,
             seed: int = 0, progress: bool | None = None) -> CompletionResult:
    """Complete ``observed`` (m, n) from the entries where ``mask`` (m, n, bool) is True.

    compressed=True trains the 2 r_hat-wide compressed network (DESIGN §4.4; ``rank`` = r_hat,
    default :func:`suggest_rank`, needs ``2 rank <= min(m, n)``; outer factors at ``gamma * lr``);
    compressed=False trains the depth-``depth`` network of width ``width`` (default min(m, n)).
    ``lr`` defaults to :func:`suggest_lr` for the mean-reduced loss. Stopping: ``max_iters``,
    ``tol`` on the train loss, ``target_error`` on the recovery error (needs ``truth``), or early
    stopping on ``validation = (rows, cols, values)`` with ``patience`` evaluations (the best
    parameters are kept). Raises ValueError for mismatched shapes, an empty mask, NaN in the
    observed entries, or ``2 rank > min(shape)``.

    Example::

        res = tlr.matrix.complete(M_obs, mask, depth=3, rank=5)
        res.matrix, res.history.train_loss[-1]
    """
    problem = Completion(observed, mask, reduction=reduction, truth=truth, test=test)
    gen = torch.Generator().manual_seed(seed)
    if compressed:
        if rank is None:
            rank = suggest_rank(problem)
        check_rank(rank, problem.shape)
        model = CompressedFactorization.from_problem(problem, rank, depth=depth, init_scale=init_scale,
                                                     gamma=gamma, generator=gen)
    else:
        model = DeepFactorization(problem.shape, depth=depth, width=width, init_scale=init_scale, generator=gen)
        rank = None
    if lr is None:
        lr = suggest_lr(problem, depth)
    hist = train_gd(model, problem, lr, max_iters=max_iters, tol=tol, target_error=target_error,
                    eval_every=eval_every, validation=validation, patience=patience,
                    weight_decay=weight_decay, progress=progress)
    with torch.no_grad():
        matrix = model.end_to_end().detach()
    return CompletionResult(matrix, hist, model, problem, rank, lr)
