"""Compress a model by replacing dense layers with factorized ones (DESIGN §4.2).

- ``factorize(model, rank)``: every targeted Linear / Conv2d becomes a LowRankLinear /
  LowRankConv2d of the given rank (an int, or a fraction of each layer's full rank).
- ``truncate(model, param_fraction)``: SVD-truncate each targeted layer to keep ``param_fraction``
  of its parameters, i.e. rank k = floor(p * m * n / (m + n)); with ``allocation="energy"`` the
  same total budget is shared across layers greedily by captured singular-value energy.
Both work in place and return a :class:`CompressionReport`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from .layers import LowRankConv2d, LowRankLinear, max_rank
from .ranks import singular_values
from .results import markdown_table
from .targets import Targets, find_targets, replace_module

__all__ = ["count_parameters", "rank_for_fraction", "factorize", "truncate", "CompressionReport", "LayerCompression"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (shared parameters counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def rank_for_fraction(shape: tuple[int, ...], param_fraction: float) -> int:
    """k = floor(p * m * n / (m + n)) for a weight (m, n) (conv kernels: n = in * kh * kw)."""
    _check_fraction(param_fraction, "param_fraction")
    m, n = shape[0], math.prod(shape[1:])
    return math.floor(param_fraction * m * n / (m + n) + 1e-9)


def _check_fraction(p: float, what: str) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {p!r}")


def _is_factorizable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros")


@dataclass
class LayerCompression:
    name: str
    shape: tuple[int, ...]
    rank: int
    full_rank: int
    params_before: int
    params_after: int
    energy_kept: float  # sum of kept s_i^2 / sum s_i^2


@dataclass
class CompressionReport:
    """Per-layer ranks and parameter counts before / after, plus model totals."""

    layers: list[LayerCompression] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def targeted_params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def targeted_params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def ranks(self) -> dict[str, int]:
        return {layer.name: layer.rank for layer in self.layers}

    columns = ["layer", "shape", "rank", "full rank", "params before", "params after", "energy kept"]

    def rows(self) -> list[list]:
        return [[l.name, "x".join(map(str, l.shape)), l.rank, l.full_rank, l.params_before, l.params_after,
                 round(l.energy_kept, 4)] for l in self.layers]

    def to_markdown(self) -> str:
        return markdown_table(self.columns, self.rows())

    def __str__(self) -> str:
        lines = [self.to_markdown(),
                 f"targeted layers: {self.targeted_params_before:,} -> {self.targeted_params_after:,} parameters; "
                 f"model: {self.model_params_before:,} -> {self.model_params_after:,}"]
        return "\n".join(lines)


def _replace_with_rank(model: nn.Module, name: str, module: nn.Module, rank: int) -> LayerCompression:
    W = module.weight.detach()
    s2 = singular_values(W).double() ** 2
    before = sum(p.numel() for p in module.parameters())
    new = LowRankLinear.from_linear(module, rank) if isinstance(module, nn.Linear) else LowRankConv2d.from_conv2d(module, rank)
    new.train(module.training)
    replace_module(model, name, new)
    after = sum(p.numel() for p in new.parameters())
    kept = float(s2[:rank].sum() / s2.sum()) if float(s2.sum()) > 0 else 1.0
    return LayerCompression(name, tuple(W.shape), rank, max_rank(tuple(W.shape)), before, after, kept)


def factorize(model: nn.Module, rank: int | float, targets: Targets = None) -> CompressionReport:
    """Replace targeted nn.Linear / nn.Conv2d layers by LowRankLinear / LowRankConv2d, in place.

    rank: an int (the same for every layer, must be <= each layer's full rank) or a float in (0, 1]
    (that fraction of each layer's full rank, at least 1). Initialised with the truncated SVD.
    """
    found = find_targets(model, targets, predicate=_is_factorizable)
    before = count_parameters(model)
    plan = []
    for name, module in found:
        full = max_rank(tuple(module.weight.shape))
        if isinstance(rank, float):
            _check_fraction(rank, "rank (as a fraction of full rank)")
            k = max(1, math.floor(rank * full + 1e-9))
        elif isinstance(rank, int) and not isinstance(rank, bool):
            if not 1 <= rank <= full:
                raise ValueError(f"rank {rank} is outside 1..{full} for layer {name!r} of shape "
                                 f"{tuple(module.weight.shape)}; pass a fraction (e.g. 0.25) or exclude the layer via targets")
            k = rank
        else:
            raise ValueError(f"rank must be an int or a float fraction in (0, 1], got {rank!r}")
        plan.append((name, module, k))
    report = CompressionReport([_replace_with_rank(model, n, m, k) for n, m, k in plan], before)
    report.model_params_after = count_parameters(model)
    return report


def _energy_allocation(found: list[tuple[str, nn.Module]], budget: float) -> dict[str, int]:
    """Greedy: repeatedly give one more rank to the layer whose next singular value adds the most
    relative energy (s_k^2 / ||W||_F^2) per parameter it costs (m + n), within ``budget`` parameters."""
    spectra, costs, ranks, caps = {}, {}, {}, {}
    for name, module in found:
        W = module.weight
        s2 = singular_values(W).double() ** 2
        spectra[name] = s2 / s2.sum().clamp_min(1e-300)
        costs[name] = W.shape[0] + math.prod(W.shape[1:])
        ranks[name] = 1  # every layer keeps at least rank 1
        # beyond m*n/(m+n) the factors hold more weights than the dense layer
        caps[name] = max(1, min(len(s2), rank_for_fraction(tuple(W.shape), 1.0)))
    used = sum(costs.values())
    if used > budget:
        raise ValueError(f"param_fraction is too small: even rank 1 for every targeted layer needs {used} "
                         f"parameters, the budget is {int(budget)}")
    while True:
        best, best_gain = None, 0.0
        for name, s2 in spectra.items():
            k = ranks[name]
            if k < caps[name] and used + costs[name] <= budget:
                gain = float(s2[k]) / costs[name]
                if gain > best_gain:
                    best, best_gain = name, gain
        if best is None:
            return ranks
        ranks[best] += 1
        used += costs[best]


def truncate(model: nn.Module, param_fraction: float, targets: Targets = None, allocation: str = "uniform") -> CompressionReport:
    """SVD-truncate targeted Linear / Conv2d layers to keep ``param_fraction`` of their parameters, in place.

    allocation="uniform": each layer (m, n) gets rank k = floor(p * m * n / (m + n)), so its factors
    U, V hold k (m + n) <= p * m * n weights (plus k for S and the bias, reported in params_after).
    allocation="energy": one global budget p * sum(m * n) shared across layers by singular-value
    energy (greedy; at least rank 1 each). Raises ``ValueError`` if a layer would get rank 0.
    """
    _check_fraction(param_fraction, "param_fraction")
    if allocation not in ("uniform", "energy"):
        raise ValueError(f"allocation must be 'uniform' or 'energy', got {allocation!r}")
    found = find_targets(model, targets, predicate=_is_factorizable)
    before = count_parameters(model)
    if allocation == "uniform":
        ranks = {}
        for name, module in found:
            k = rank_for_fraction(tuple(module.weight.shape), param_fraction)
            if k < 1:
                raise ValueError(f"param_fraction={param_fraction} leaves rank 0 for layer {name!r} of shape "
                                 f"{tuple(module.weight.shape)}; raise the fraction or use allocation='energy'")
            ranks[name] = k
    else:
        budget = param_fraction * sum(m.weight.shape[0] * math.prod(m.weight.shape[1:]) for _, m in found)
        ranks = _energy_allocation(found, budget)
    report = CompressionReport([_replace_with_rank(model, n, m, ranks[n]) for n, m in found], before)
    report.model_params_after = count_parameters(model)
    return report
