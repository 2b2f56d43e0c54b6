"""Heuristics for the one-call API: a stable gradient-descent step and an assumed rank r_hat."""

from __future__ import annotations

import torch

from .problems import Completion

__all__ = ["suggest_lr", "suggest_rank", "reference_lr"]


def _rescaled_top(problem: Completion, k: int) -> torch.Tensor:
    A = problem.observed_matrix() / problem.fraction
    if min(A.shape) <= 400 or 4 * (k + 10) > min(A.shape):
        return torch.linalg.svdvals(A)[:k]
    return _topk(A, k)


def _topk(A: torch.Tensor, k: int) -> torch.Tensor:
    from ..linalg import truncated_svd

    return truncated_svd(A, k)[1]


def suggest_lr(problem: Completion, depth: int, factor: float = 1.0) -> float:
    """``factor / (c p L s^(2(L-1)/L))``: c the loss scale (1/|Omega| for "mean"), p the observed
    fraction, s the top singular value of the rescaled observations ``P_Omega(M) / p`` (an estimate
    of ||M||_2).

    At balance each factor has singular values s^(1/L), so along the top singular pair the
    end-to-end curvature is about ``c p L s^(2(L-1)/L)`` (the mask keeps a fraction p of a spread-out
    rank-one direction); GD is stable below 2 / curvature, so ``factor`` < 2. ``factor = 1`` was
    stable in all our runs (d = 40..1000, p = 0.2..0.6); ~1.5 converges faster on large matrices.
    Divergence is detected and reported by the trainer. Tune it for your data: the step matters.
    """
    s = float(_rescaled_top(problem, 1)[0])
    return factor / (problem.scale * problem.fraction * depth * max(s, 1e-12) ** (2 * (depth - 1) / depth))


def reference_lr(shape: tuple[int, int], fraction: float) -> float:
    """The step of the authors' JAX reference, ``5e3 (d / 1000)^(4/3)`` for a loss averaged over all
    d^2 entries, converted to our mean over the observed entries (times the observed fraction).
    Meant for depth 3 and targets from :func:`low_rank_target` (singular values ~ sqrt(d))."""
    d = (shape[0] * shape[1]) ** 0.5
    return 5e3 * (d / 1000) ** (4 / 3) * fraction


def suggest_rank(problem: Completion, max_rank: int | None = None) -> int:
    """r_hat from the largest gap ``s_i / s_{i+1}`` among the top singular values of
    ``P_Omega(M) / p`` (at most ``min(shape) // 2`` and ``max_rank``, default 50). A heuristic:
    pass the rank when you know it; over-estimating it costs little with the compressed network."""
    cap = min(problem.shape) // 2
    if max_rank is not None:
        cap = min(cap, max_rank)
    cap = max(1, min(cap, 50))
    s = _rescaled_top(problem, cap + 1)
    if s.numel() < 2:
        return 1
    ratios = s[:-1] / s[1:].clamp_min(1e-300)
    return int(torch.argmax(ratios[:cap])) + 1
