"""Compress a model by replacing dense layers with factorized ones (DESIGN §4.2).

- ``factorize(model, rank)``: every targeted Linear / HF Conv1D / Conv2d becomes a LowRankLinear /
  LowRankConv2d of the given rank (an int, or a fraction of each layer's full rank).
- ``truncate(model, param_fraction)``: SVD-truncate each targeted layer to keep at most
  ``param_fraction`` of its parameters, i.e. rank k = floor(p * m * n / (m + n + 1)) (U, S and V hold
  k (m + n + 1) numbers); with ``allocation="energy"`` the same total budget is shared across layers
  greedily by captured singular-value energy.
Both work in place, use the exact truncated SVD (best rank-k approximation, Eckart-Young), and return
a :class:`CompressionReport` whose model totals are the model's real parameter counts (shared
parameters counted once).

Safety: every SVD is computed and every layer validated before the model is touched, so an error
(NaN weight, meta tensor, bad rank) leaves the model exactly as it was. Layers whose weight is tied
to another module (GPT-2's ``lm_head`` = ``wte``) and layers inside adapters are refused when named
explicitly and skipped with a warning when ``targets=None``; the new factors keep the original
weight's ``requires_grad``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .factorized import FactorizedConv2d, FactorizedLinear
from .layer_types import (
    is_meta,
    matrix_view,
    max_rank,
    parameter_holders,
    plain_conv_reason,
    shared_weight_holders,
)
from .layers import LowRankConv2d, LowRankLinear
from .ranks import singular_values
from .results import markdown_table
from .sharded import is_sharded_module
from .targets import Targets, find_targets, replace_module

__all__ = [
    "count_parameters",
    "rank_for_fraction",
    "factorize",
    "truncate",
    "CompressionReport",
    "LayerCompression",
]


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
    """k = floor(p * m * n / (m + n + 1)) for a weight (m, n) (conv kernels: n = in * kh * kw): the
    largest rank whose factors U (m, k), S (k,), V (n, k) hold at most p * m * n numbers, so that a
    truncated layer never has more parameters than the fraction asked for (p = 1 never grows it)."""
    check_fraction(param_fraction, "param_fraction")
    m, n = shape[0], math.prod(shape[1:])
    return math.floor(param_fraction * m * n / (m + n + 1) + 1e-9)


def check_fraction(p: float, what: str) -> None:
    """``ValueError`` unless ``p`` is a number in (0, 1]."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {p!r}")


# the kinds of matrix view (torchlowrank.layer_types) that have a factorized replacement here
REPLACEABLE = ("linear", "hf_conv1d", "conv2d")


def _replaceable(m: nn.Module) -> bool:
    view = matrix_view(m)
    # grouped Conv2d (a kernel view) is a candidate so that it is skipped or refused with its reason
    return view is not None and (view.kind in REPLACEABLE or isinstance(m, nn.Conv2d))


def _unsupported_reason(m: nn.Module) -> str | None:
    if isinstance(m, nn.Conv2d) and plain_conv_reason(m, "LowRankConv2d"):
        return (
            f"Conv2d with groups={m.groups}, padding_mode={m.padding_mode!r} (LowRankConv2d supports "
            "groups=1 and zero padding only)"
        )
    return None


def _matrix(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a layer applies (detached)."""
    return matrix_view(module).read().detach()


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The weight's shape as reports list it: (out, in), conv kernels (out, in, kh, kw)."""
    return matrix_view(module).tensor_shape


def _adapter_wrappers(model: nn.Module) -> list[str]:
    # duck-typed (no import of torchlowrank.adapters / peft): adapter layers wrap a ``base_layer``
    return [n for n, m in model.named_modules() if isinstance(getattr(m, "base_layer", None), nn.Module)]


def select_layers(model: nn.Module, targets: Targets, what: str) -> list[tuple[str, nn.Module]]:
    """Targeted Linear / Conv1D / Conv2d layers that can be replaced. Layers inside an adapter raise;
    tied or unsupported layers raise when targeted explicitly and are skipped with a warning when
    ``targets=None``."""
    if is_sharded_module(model):
        raise ValueError(
            f"{what} replaces layers, which a model sharded by fully_shard (FSDP2) does not allow (the "
            f"new layers would be unsharded, outside the sharding hooks): {what} the unsharded model, "
            "then fully_shard it"
        )
    found = find_targets(model, targets, predicate=_replaceable)
    index = parameter_holders(model)
    wrappers = _adapter_wrappers(model)
    chosen, skipped = [], []
    for name, module in found:
        inside = next((w for w in wrappers if name.startswith(w + ".")), None)
        tied = shared_weight_holders(model, module, index)
        if inside is not None:
            reason = (
                f"it is the base layer of the adapter {inside!r}: merge the adapters first "
                "(tlr.merge(model)) or truncate before adapting"
            )
        elif tied:
            reason = (
                f"its weight is tied to {', '.join(tied)}: replacing it would untie them and grow the model. "
                "Exclude it, or untie it first (e.g. model.lm_head.weight = nn.Parameter(W.clone()))"
            )
        else:
            reason = _unsupported_reason(module)
        if reason is None:
            chosen.append((name, module))
        elif targets is not None or inside is not None:  # adapted layers are refused even with targets=None
            raise ValueError(f"{what}: cannot replace layer {name!r}: {reason}")
        else:
            skipped.append(f"{name} ({reason})")
    if skipped:
        warnings.warn(f"{what}: skipped {len(skipped)} layer(s): " + "; ".join(skipped), stacklevel=3)
    if not chosen:
        raise ValueError(
            f"{what}: no layer left to replace" + (f"; skipped: {'; '.join(skipped)}" if skipped else "")
        )
    return chosen


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
        return [
            [
                l.name,
                "x".join(map(str, l.shape)),
                l.rank,
                l.full_rank,
                l.params_before,
                l.params_after,
                round(l.energy_kept, 4),
            ]
            for l in self.layers
        ]

    def to_markdown(self) -> str:
        return markdown_table(self.columns, self.rows())

    def __str__(self) -> str:
        lines = [
            self.to_markdown(),
            f"targeted layers: {self.targeted_params_before:,} -> {self.targeted_params_after:,} parameters; "
            f"model: {self.model_params_before:,} -> {self.model_params_after:,}",
        ]
        return "\n".join(lines)


def _as_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear computing what an HF Conv1D computes (for the A B^T layers, which take Linear)."""
    W = module.weight
    lin = nn.Linear(W.shape[0], W.shape[1], bias=module.bias is not None, device="meta")
    lin.weight = nn.Parameter(W.detach().T, requires_grad=W.requires_grad)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach(), requires_grad=module.bias.requires_grad)
    return lin


def _build_factorized(
    name: str, module: nn.Module, rank: int, parametrization: str = "USV"
) -> tuple[nn.Module, LayerCompression]:
    """The factorized replacement of one layer and its report row; touches nothing in the model."""
    W = module.weight
    if is_meta(W):
        raise ValueError(
            f"layer {name!r} is on the 'meta' device (no values to decompose); load the real weights first"
        )
    try:
        kind = matrix_view(module).kind
        if parametrization == "AB":
            if kind == "conv2d":
                new = FactorizedConv2d.from_conv2d(module, rank)
            else:  # FactorizedLinear is built from an nn.Linear
                new = FactorizedLinear.from_linear(
                    _as_linear(module) if kind == "hf_conv1d" else module, rank
                )
        elif kind == "conv2d":
            new = LowRankConv2d.from_conv2d(module, rank)
        else:
            new = LowRankLinear.from_linear(module, rank)
        s2 = singular_values(_matrix(module)).double() ** 2
    except ValueError as e:
        raise ValueError(f"layer {name!r}: {e}") from e
    for p in new.parameters():
        if p is not getattr(new, "bias", None):
            p.requires_grad_(W.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(module.bias.requires_grad)
    new.train(module.training)
    before = sum(p.numel() for p in module.parameters())
    after = sum(p.numel() for p in new.parameters())
    kept = float(s2[:rank].sum() / s2.sum()) if float(s2.sum()) > 0 else 1.0
    shape = weight_shape(module)
    return new, LayerCompression(name, shape, rank, max_rank(shape), before, after, kept)


def _apply(
    model: nn.Module, plan: list[tuple[str, nn.Module, int]], parametrization: str = "USV"
) -> CompressionReport:
    before = count_parameters(model)
    built = [
        (name, *_build_factorized(name, module, k, parametrization)) for name, module, k in plan
    ]  # may raise: model untouched
    for name, new, _ in built:
        replace_module(model, name, new)
    report = CompressionReport([row for _, _, row in built], before)
    report.model_params_after = count_parameters(model)
    return report


def factorize(
    model: nn.Module, rank: int | float, targets: Targets = None, parametrization: str = "USV"
) -> CompressionReport:
    """Replace targeted nn.Linear / HF Conv1D / nn.Conv2d layers by factorized ones, in place.

    rank: an int (the same for every layer, must be <= each layer's full rank) or a float in (0, 1]
    (that fraction of each layer's full rank, at least 1). Initialised with the exact truncated SVD
    (the best rank-k approximation). On any error the model is left unchanged.
    parametrization: ``"USV"`` (default) gives LowRankLinear / LowRankConv2d, W = U diag(S) V^T with
    orthonormal U, V — the layers the geometric optimizers (``tlr.optim.LowRankAdam``) train;
    ``"AB"`` gives the plain baseline FactorizedLinear / FactorizedConv2d, W = A B^T with the balanced
    split A = U sqrt(S), B = V sqrt(S), for ordinary optimizers.
    """
    if parametrization not in ("USV", "AB"):
        raise ValueError(
            f"parametrization must be 'USV' (U diag(S) V^T) or 'AB' (A B^T), got {parametrization!r}"
        )
    found = select_layers(model, targets, "factorize")
    plan = []
    for name, module in found:
        full = max_rank(weight_shape(module))
        if isinstance(rank, float):
            check_fraction(rank, "rank (as a fraction of full rank)")
            k = max(1, math.floor(rank * full + 1e-9))
        elif isinstance(rank, int) and not isinstance(rank, bool):
            if not 1 <= rank <= full:
                raise ValueError(
                    f"rank {rank} is outside 1..{full} for layer {name!r} of shape "
                    f"{weight_shape(module)}; pass a fraction (e.g. 0.25) or exclude the layer via targets"
                )
            k = rank
        else:
            raise ValueError(f"rank must be an int or a float fraction in (0, 1], got {rank!r}")
        plan.append((name, module, k))
    return _apply(model, plan, parametrization)


def _energy_allocation(found: list[tuple[str, nn.Module]], budget: float) -> dict[str, int]:
    """Greedy: repeatedly give one more rank to the layer whose next singular value adds the most
    relative energy (s_k^2 / ||W||_F^2) per parameter it costs (m + n), within ``budget`` parameters."""
    spectra, costs, ranks, caps = {}, {}, {}, {}
    for name, module in found:
        W = _matrix(module)
        try:
            s2 = singular_values(W).double() ** 2
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from e
        spectra[name] = s2 / s2.sum().clamp_min(1e-300)
        costs[name] = W.shape[0] + W.shape[1] + 1  # a column of U, a row of V^T, an entry of S
        ranks[name] = 1  # every layer keeps at least rank 1
        # beyond m*n/(m+n+1) the factors hold more numbers than the dense layer
        caps[name] = max(1, min(len(s2), rank_for_fraction(tuple(W.shape), 1.0)))
    used = sum(costs.values())
    if used > budget:
        raise ValueError(
            f"param_fraction is too small: even rank 1 for every targeted layer needs {used} "
            f"parameters, the budget is {int(budget)}"
        )
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


def truncate(
    model: nn.Module, param_fraction: float, targets: Targets = None, allocation: str = "uniform"
) -> CompressionReport:
    """SVD-truncate targeted Linear / HF Conv1D / Conv2d layers to at most ``param_fraction`` of their
    weight parameters, in place, with the exact truncated SVD (best rank-k approximation).

    allocation="uniform": each layer (m, n) gets rank k = floor(p * m * n / (m + n + 1)), so its
    factors U, S, V hold k (m + n + 1) <= p * m * n numbers (the bias is kept as it is).
    allocation="energy": one global budget p * sum(m * n) shared across layers by singular-value
    energy (greedy; at least rank 1 each). Raises ``ValueError`` if a layer would get rank 0, naming
    it; on any error the model is left unchanged.
    """
    check_fraction(param_fraction, "param_fraction")
    if allocation not in ("uniform", "energy"):
        raise ValueError(f"allocation must be 'uniform' or 'energy', got {allocation!r}")
    found = select_layers(model, targets, "truncate")
    if allocation == "uniform":
        ranks = {}
        for name, module in found:
            k = rank_for_fraction(weight_shape(module), param_fraction)
            if k < 1:
                raise ValueError(
                    f"param_fraction={param_fraction} leaves rank 0 for layer {name!r} of shape "
                    f"{weight_shape(module)}; raise the fraction or use allocation='energy'"
                )
            ranks[name] = k
    else:
        for name, module in found:
            if is_meta(module.weight):
                raise ValueError(
                    f"layer {name!r} is on the 'meta' device (no values to decompose); load the real weights first"
                )
        budget = param_fraction * sum(math.prod(weight_shape(m)) for _, m in found)
        ranks = _energy_allocation(found, budget)
    return _apply(model, [(n, m, ranks[n]) for n, m in found])
