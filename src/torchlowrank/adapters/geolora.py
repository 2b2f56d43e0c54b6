"""Geometric adapters (GeoLoRA): Delta W = scaling * U diag(S) V^T trained on the rank-k manifold.

The update of every adapted layer is a :class:`GeoLoRAUnit` (a bias-free :class:`LowRankLinear`
from the layer's input to its output), so :class:`torchlowrank.LowRankAdam` finds it and steps it
from the one backward pass (DESIGN §4.5); with ``tau > 0`` each layer's rank follows its stepped
singular values. The frozen base layer and the wrapper's interface (``merge``, ``save_adapter``,
``export_peft``) are those of the other adapters.

    cfg = tlr.GeoLoRAConfig(r=8, tau=0.05, rank_budget=200_000, modules_to_save=["classifier"])
    tlr.adapt(model, cfg)
    opt = tlr.geolora_optimizer(model, lr=1e-3)
    for batch in data:
        loss(model(batch)).backward(); opt.step(); opt.zero_grad(); tlr.rebalance_ranks(model, opt)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layer_types import matrix_view
from ..layers import LowRankLinear
from ..linalg import orthogonal_init
from .config import GeoLoRAConfig
from .layers import AdapterLayer, adapter_dtype

__all__ = [
    "GeoLoRAUnit",
    "GeoLoRAAdapter",
    "wrap_geolora",
    "geolora_optimizer",
    "rebalance_ranks",
    "adapter_ranks",
]

KINDS = ("linear", "hf_conv1d")


class GeoLoRAUnit(LowRankLinear):
    """The update x -> x V diag(S) U^T, U (out, k), S (k,), V (in, k), no bias (a LowRankAdam unit)."""

    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, rank, bias=False, device=device, dtype=dtype)
        self.reset_geolora()

    @torch.no_grad()
    def reset_geolora(self) -> None:
        """U, V Haar-orthonormal, S = 0 (Delta W = 0); nothing computed on the meta device."""
        if self.U.device.type == "meta":
            return
        self.U.copy_(orthogonal_init(self.U.shape[0], self.rank, dtype=torch.float64))
        self.V.copy_(orthogonal_init(self.V.shape[0], self.rank, dtype=torch.float64))
        self.S.zero_()

    @torch.no_grad()
    def resize(self, k: int) -> None:
        """Zero factors of rank k (new Parameters if k differs), to be filled by a load."""
        if k != self.rank:
            self.set_factors(
                self.U.new_zeros(self.U.shape[0], k),
                self.S.new_zeros(k),
                self.V.new_zeros(self.V.shape[0], k),
            )


class GeoLoRAAdapter(AdapterLayer):
    """A frozen nn.Linear / HF Conv1D plus ``lora_unit`` (:class:`GeoLoRAUnit`): y = base(x) +
    scaling * unit(dropout(x)). ``r`` is the unit's current rank; ``lora_factors`` its [U, S, V]."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        scaling: float = 1.0,
        dropout: float = 0.0,
        name: str = "layer",
        factor_dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)
        view = matrix_view(base_layer)
        if view is None or view.kind not in KINDS:
            raise ValueError(
                f"{name} is a {type(base_layer).__name__}; GeoLoRA adapters support nn.Linear and HF Conv1D "
                "(exclude this layer, or use LoRAConfig for convolutions and embeddings)"
            )
        self.base_layer = base_layer
        m, n = self.matrix_shape()
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(m, n):
            raise ValueError(
                f"{name} ({type(base_layer).__name__} with weight matrix {m} x {n}): r must be in "
                f"1..{min(m, n)}; lower r or exclude this layer"
            )
        w = base_layer.weight
        self.depth, self.scaling = 2, float(scaling)
        self.lora_unit = GeoLoRAUnit(
            n, m, r, device=w.device, dtype=w.dtype if factor_dtype is None else factor_dtype
        )
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.compressed = False
        self.disabled = False
        self.init = "geolora"
        self.weight_is_dense = False

    @property
    def r(self) -> int:
        """The current rank k of the update."""
        return self.lora_unit.rank

    @property
    def lora_factors(self) -> list[nn.Parameter]:
        """[U (m, k), S (k,), V (n, k)] (the trainable tensors)."""
        u = self.lora_unit
        return [u.U, u.S, u.V]

    def named_factors(self) -> list[tuple[str, nn.Parameter]]:
        u = self.lora_unit
        return [("lora_unit.U", u.U), ("lora_unit.S", u.S), ("lora_unit.V", u.V)]

    @property
    def lora_A(self) -> nn.Parameter:
        return self.lora_unit.V

    @property
    def lora_B(self) -> nn.Parameter:
        return self.lora_unit.U

    def delta_matrix(self) -> torch.Tensor:
        """Delta W = scaling * U diag(S) V^T, shape (m, n) (differentiable)."""
        return self.lora_unit.dense_weight() * self.scaling

    def collapsed_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (m, k), A (k, n)) with B A = Delta W, balanced: A = diag(sqrt|S|) V^T,
        B = scaling * U diag(sign(S) sqrt|S|) (detached)."""
        with torch.no_grad():
            u = self.lora_unit
            root = u.S.abs().sqrt()
            B = u.U * (torch.sign(u.S) * root * self.scaling)
            A = root[:, None] * u.V.T
            return B.clone(), A.contiguous().clone()

    def reset_geolora(self) -> None:
        self.lora_unit.reset_geolora()

    def init_lora_factors(self, init: str = "default") -> None:
        raise ValueError("GeoLoRA adapters have one init (U, V orthonormal, S = 0): use reset_geolora()")

    def reset_narrow(self, eps: float) -> None:
        raise ValueError("GeoLoRA adapters have one init (U, V orthonormal, S = 0): use reset_geolora()")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            return out
        x = self._adapter_input(x)
        h = self.lora_unit(self.lora_dropout(x) if self.lora_dropout is not None else x)
        if self.scaling != 1.0:
            h = h * self.scaling
        return out + h.to(out.dtype)

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_unit.U.dtype
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x

    def extra_repr(self) -> str:
        m, n = self.matrix_shape()
        return f"matrix={m}x{n}, rank={self.r}, scaling={self.scaling:g}"


def wrap_geolora(module: nn.Module, config: GeoLoRAConfig, name: str) -> GeoLoRAAdapter:
    """The GeoLoRA wrapper of ``module`` (ValueError for other layer types or too large an r)."""
    if isinstance(module, AdapterLayer):
        raise ValueError(f"{name} already is an adapter; merge it first")
    return GeoLoRAAdapter(
        module,
        config.r,
        scaling=config.scaling,
        dropout=config.dropout,
        name=name,
        factor_dtype=adapter_dtype(module.weight, config.autocast_adapter_dtype),
    )


def _geolora_state(model: nn.Module):
    from .model import adapter_layers, adapter_state

    state = adapter_state(model)
    if state is None or not isinstance(state.config, GeoLoRAConfig):
        raise ValueError("needs a model adapted with tlr.adapt(model, tlr.GeoLoRAConfig(...))")
    return state, adapter_layers(model)


def geolora_optimizer(model: nn.Module, lr: float = 1e-3, **kwargs: Any):
    """A :class:`LowRankAdam` on ``model`` with the config's tau, min_rank, max_rank and rank_every and
    ``second_moment="elementwise"`` (override any of them, or other LowRankAdam arguments, by
    keyword). The adapter units get the geometric step, modules_to_save plain Adam; the frozen base
    is not touched.

    Why elementwise: with LowRankAdam's own default (one second moment per layer, ``"unit"``) every
    entry of the 2r x 2r core is divided by the root mean square of the whole core gradient. An
    adapter's core gradient sits mostly in the basis blocks (the new directions G V, G^T U), so the
    Galerkin (S) entries got a small fraction of lr per step and ||Delta W|| stopped growing after
    the first few steps (docs/reproductions/geolora-finetune.md). Elementwise, each singular value
    moves by about lr per step, as each entry of LoRA's B does under Adam."""
    from ..optim import LowRankAdam

    state, _ = _geolora_state(model)
    cfg = state.config
    options = dict(
        tau=cfg.tau,
        min_rank=cfg.min_rank,
        max_rank=cfg.max_rank,
        rank_every=cfg.rank_every,
        second_moment="elementwise",
    )
    options.update(kwargs)
    return LowRankAdam(model, lr=lr, **options)


def adapter_ranks(model: nn.Module) -> dict[str, int]:
    """The current rank of every GeoLoRA layer, by layer name."""
    _, layers = _geolora_state(model)
    return {name: layer.r for name, layer in layers}


@torch.no_grad()
def rebalance_ranks(model: nn.Module, optimizer, budget: int | None = None) -> dict[str, int]:
    """Enforce the global parameter budget (``config.rank_budget`` unless ``budget`` is given) at the
    optimizer's next rank decision; call after each ``optimizer.step()``. Returns the per-layer caps.

    Every singular value of every layer, times the layer's scaling, is ranked globally; walking down
    the ranking, each value claims one rank of its layer at a cost of (out + in + 1) parameters until
    the budget less a reserve of one growth rank per layer is spent. A layer's cap (the optimizer's
    ``max_rank`` for its unit) is its claimed ranks plus one, so the next decision keeps the total
    within the budget while each layer may still add its best new direction, which competes at the
    following rebalance. With no budget the caps are the config's max_rank. The caps are upper
    bounds; ``tau`` still truncates below them.
    """
    state, layers = _geolora_state(model)
    cfg = state.config
    budget = cfg.rank_budget if budget is None else budget
    groups = {id(g["params"][1]): g for g in optimizer.param_groups if g.get("unit") is not None}
    caps: dict[str, int] = {}
    if budget is None:
        for name, layer in layers:
            caps[name] = cfg.max_rank or min(layer.matrix_shape())
    else:
        costs = {name: sum(layer.matrix_shape()) + 1 for name, layer in layers}
        floor = {name: cfg.min_rank for name, _ in layers}
        spend = sum(costs[n] * (floor[n] + 1) for n in floor)
        if spend > budget:
            raise ValueError(
                f"rank_budget={budget} is below {spend}, the parameters of min_rank + 1 = {cfg.min_rank + 1} "
                "ranks on every adapted layer; raise the budget or adapt fewer layers"
            )
        claimed = dict(floor)
        values = []
        for name, layer in layers:
            s = (layer.lora_unit.S.detach().abs().float() * abs(layer.scaling)).sort(descending=True).values
            values += [(float(v), name) for v in s[cfg.min_rank :].tolist()]
        values.sort(key=lambda t: -t[0])
        for _, name in values:
            if spend + costs[name] > budget:
                break
            claimed[name] += 1
            spend += costs[name]
        for name, layer in layers:
            full = min(layer.matrix_shape())
            caps[name] = min(claimed[name] + 1, full, cfg.max_rank or full)
    for name, layer in layers:
        group = groups.get(id(layer.lora_unit.S))
        if group is None:
            raise ValueError(
                f"the optimizer does not step {name}'s adapter: build it with tlr.geolora_optimizer(model) "
                "(or LowRankAdam(model, ...)) after tlr.adapt"
            )
        group["max_rank"] = max(caps[name], group["min_rank"])
    return caps
