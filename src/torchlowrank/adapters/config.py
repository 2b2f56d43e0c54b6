"""Adapter configurations: PEFT-like dataclasses for LoRA and Deep LoRA (DESIGN §4.3).

``LoRAConfig``: Delta W = (alpha / r) B A (``alpha / sqrt(r)`` with ``use_rslora``), A (r, in),
B (out, r). ``DeepLoRAConfig``: Delta W = W_L ... W_1 with W_1 (r, in), inner W_l (r, r), W_L (out, r),
no alpha scaling. Both select layers with ``target_modules`` (``"all-linear"``, a list of names or
name suffixes, or a regular expression matching whole names), skip ``exclude_modules``, and train
``modules_to_save`` (e.g. a classifier head) in full.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["LoRAConfig", "DeepLoRAConfig", "GeoLoRAConfig", "AdapterConfig", "config_from_dict", "ALL_LINEAR"]

ALL_LINEAR = "all-linear"
LORA_INITS = ("default", "gaussian", "pissa")

Targets = str | list[str] | tuple[str, ...] | None


def _check_targets(value: Any, what: str, allow_none: bool = True) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(
        f"{what} must be 'all-linear', a regular expression string or a list of module names, got {value!r}"
    )


def _normalise_module_fields(config: Any) -> None:
    """Validate ``target_modules`` / ``exclude_modules`` / ``modules_to_save`` in place (a lone
    string in ``modules_to_save`` is one module name, not a regex)."""
    config.target_modules = _check_targets(config.target_modules, "target_modules")
    config.exclude_modules = _check_targets(config.exclude_modules, "exclude_modules")
    config.modules_to_save = _check_targets(config.modules_to_save, "modules_to_save")
    if isinstance(config.modules_to_save, str):
        config.modules_to_save = [config.modules_to_save]


def _check_positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int (the adapter's rank, e.g. 8), got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_bool(value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {value!r}")


def _check_pattern(value: Any, what: str, rank: bool) -> dict | None:
    """A per-layer rank / alpha pattern: None (or empty) or {regex: positive int / number}."""
    if not value:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{what} must be a dict {{layer name pattern: value}} or None, got {value!r}")
    for k, v in value.items():
        if rank:
            _check_positive_int(v, f"{what}[{k!r}]")
        elif not (_is_number(v) and v > 0):
            raise ValueError(f"{what}[{k!r}] must be a positive number, got {v!r}")
        try:
            re.compile(k)
        except re.error as e:
            raise ValueError(f"{what} key {k!r} is not a regular expression ({e})") from e
    return dict(value)


def _pattern_value(pattern: dict | None, name: str, default: Any) -> Any:
    """PEFT's rule: the value of the first key (in order) matching the end of ``name`` at a dot."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return default


def _check_lora_fields(config, name: str, lora_alpha: float | None, lora_dropout: float | None) -> None:
    """Fold PEFT's aliases (``lora_alpha``, ``lora_dropout``) into ``config`` and check r, alpha, dropout."""
    if lora_alpha is not None:
        if config.alpha is not None and config.alpha != lora_alpha:
            raise ValueError(f"give alpha or its alias lora_alpha, not both ({config.alpha} vs {lora_alpha})")
        config.alpha = lora_alpha
    if lora_dropout is not None:
        config.dropout = lora_dropout
    _check_positive_int(config.r, f"{name}.r")
    if config.alpha is not None and not (_is_number(config.alpha) and config.alpha > 0):
        raise ValueError(
            f"{name}.alpha must be a positive number (scaling = alpha / r; alpha = 0 would "
            f"switch the adapter off) or None for alpha = r, got {config.alpha!r}"
        )
    if not _is_number(config.dropout) or not 0.0 <= config.dropout < 1.0:
        raise ValueError(
            f"{name}.dropout must be a probability in [0, 1) (0 = no dropout), got {config.dropout!r}"
        )


@dataclass
class LoRAConfig:
    """LoRA (Hu et al. 2021): W = W0 + scaling * B A, scaling = alpha / r (or alpha / sqrt(r), rsLoRA).

    r: rank of the update. alpha: scale numerator; None means alpha = r (scaling 1). PEFT's name
    ``lora_alpha`` is accepted as an alias (and ``lora_dropout`` for ``dropout``).
    dropout: dropout probability on the adapter's input (0 = none; applied only when > 0).
    target_modules: ``"all-linear"`` (every nn.Linear / HF Conv1D except the output head), a list of
    module names or name suffixes (nn.Linear, nn.Conv2d, nn.Embedding, HF Conv1D), or a regex.
    use_rslora: scale by alpha / sqrt(r). autocast_adapter_dtype: keep the factors in float32 when
    the base layer is float16 / bfloat16 (PEFT's default; the adapter path is computed in float32 and
    its output cast back), so small products do not underflow. init: ``"default"`` (A Kaiming-uniform, B zero),
    ``"gaussian"`` (A ~ N(0, 1/r^2), B zero) or ``"pissa"`` (A, B from the top-r SVD of W0, and W0
    replaced by its residual). modules_to_save: modules trained in full and saved with the adapter.
    exclude_modules: names / suffixes / regex never adapted.
    rank_pattern / alpha_pattern: per-layer r / alpha as in PEFT (``{pattern: value}``); a layer takes
    the value of the first pattern that matches the end of its name (a regular expression matching
    whole dotted components: ``"query"`` matches ``encoder.layer.0.attention.self.query``), else r /
    alpha. A loaded PEFT folder with per-layer ranks (``tlr.export_peft`` of a GeoLoRA adapter)
    keeps them here.
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: Targets = ALL_LINEAR
    use_rslora: bool = False
    init: str = "default"
    modules_to_save: list[str] | None = None
    exclude_modules: Targets = None
    autocast_adapter_dtype: bool = True
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    lora_alpha: dataclasses.InitVar[float | None] = None
    lora_dropout: dataclasses.InitVar[float | None] = None

    adapter_type = "lora"

    def __post_init__(self, lora_alpha: float | None, lora_dropout: float | None) -> None:
        _check_lora_fields(self, "LoRAConfig", lora_alpha, lora_dropout)
        self.rank_pattern = _check_pattern(self.rank_pattern, "LoRAConfig.rank_pattern", rank=True)
        self.alpha_pattern = _check_pattern(self.alpha_pattern, "LoRAConfig.alpha_pattern", rank=False)
        _check_bool(self.use_rslora, "LoRAConfig.use_rslora")
        _check_bool(self.autocast_adapter_dtype, "LoRAConfig.autocast_adapter_dtype")
        if self.init not in LORA_INITS:
            raise ValueError(f"LoRAConfig.init must be one of {LORA_INITS}, got {self.init!r}")
        _normalise_module_fields(self)

    @property
    def depth(self) -> int:
        return 2

    @property
    def scaling(self) -> float:
        """The factor multiplying B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        alpha = self.r if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_of(self, name: str) -> int:
        """The rank of layer ``name``: its rank_pattern entry, else r."""
        return _pattern_value(self.rank_pattern, name, self.r)

    def scaling_of(self, name: str) -> float:
        """The scaling of layer ``name``: its alpha (alpha_pattern, else alpha, else r) over its rank."""
        r = self.rank_of(name)
        alpha = _pattern_value(self.alpha_pattern, name, r if self.alpha is None else self.alpha)
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def to_dict(self) -> dict[str, Any]:
        return {"adapter_type": self.adapter_type, **dataclasses.asdict(self)}


@dataclass
class DeepLoRAConfig:
    """Deep LoRA (Yaras et al. 2024): Delta W = W_L ... W_1, depth L >= 2, width r, no alpha scaling.

    init_scale: eps; with ``compress=False`` every factor is initialised orthogonal at scale eps
    (narrow Deep LoRA). With ``compress=True`` the factors are built from one batch's end-to-end
    gradient by :func:`init_compressed` (until then they hold the narrow init): first factor
    eps * right^T, inner eps * I_r, last eps * left; the outer factors then train with learning
    rate ``gamma * lr`` (see :func:`adapter_param_groups`). ``compress=True`` needs an even r.
    autocast_adapter_dtype (default True): float32 factors on a float16 / bfloat16 base (products of
    L factors at scale eps underflow in half precision: eps^L = 1e-9 for the defaults).
    Other fields as in :class:`LoRAConfig`.
    """

    r: int = 8
    depth: int = 3
    init_scale: float = 1e-3
    compress: bool = True
    gamma: float = 0.01
    target_modules: Targets = ALL_LINEAR
    modules_to_save: list[str] | None = None
    exclude_modules: Targets = None
    autocast_adapter_dtype: bool = True

    adapter_type = "deep_lora"

    def __post_init__(self) -> None:
        _check_positive_int(self.r, "DeepLoRAConfig.r")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 2:
            raise ValueError(
                f"DeepLoRAConfig.depth must be an int >= 2 (depth 2 is LoRA-shaped), got {self.depth!r}"
            )
        if not _is_number(self.init_scale) or self.init_scale <= 0:
            raise ValueError(
                f"DeepLoRAConfig.init_scale must be a positive number (eps, e.g. 1e-3), got "
                f"{self.init_scale!r}"
            )
        _check_bool(self.compress, "DeepLoRAConfig.compress")
        _check_bool(self.autocast_adapter_dtype, "DeepLoRAConfig.autocast_adapter_dtype")
        if self.compress and self.r % 2:
            raise ValueError(
                f"compressed Deep LoRA needs an even r (half from each gradient side), got r={self.r}; "
                "use an even r or compress=False"
            )
        if not _is_number(self.gamma) or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(
                f"DeepLoRAConfig.gamma must be in [0, 1] (the outer factors' learning rate is "
                f"gamma * lr; 0.01 is the paper's value), got {self.gamma!r}"
            )
        _normalise_module_fields(self)

    @property
    def scaling(self) -> float:
        return 1.0

    @property
    def dropout(self) -> float:
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"adapter_type": self.adapter_type, **dataclasses.asdict(self)}


@dataclass
class GeoLoRAConfig:
    """Geometric low-rank adapter (the GeoLoRA idea, Schotthoefer et al. 2025): Delta W =
    scaling * U diag(S) V^T with U (out, k), S (k,), V (in, k), trained by :class:`LowRankAdam` on the
    manifold of rank-k matrices from one backward pass, the rank k adapted during training.

    r: the initial rank. alpha / ``lora_alpha``: scaling = alpha / r with this *initial* r (None:
    alpha = r, scaling 1); the scaling stays fixed while the rank changes. Init: U, V Haar-orthonormal,
    S = 0, so Delta W = 0 at the start; the first geometric step still moves, since it augments the
    bases with the gradient's range (G V, G^T U) and steps the 2r x 2r core.
    tau: relative truncation of every layer's stepped core at rank decisions (the rank is the
    smallest k with ||s[k:]|| <= tau ||s||; 0 keeps ranks fixed). min_rank / max_rank: per-layer
    bounds (max_rank None: the layer's full rank). rank_budget: None, or a cap on the adapter's
    trainable parameters summed over layers (a rank-k layer holds k (out + in + 1)), enforced by
    :func:`rebalance_ranks` after each optimizer step by giving every layer a rank cap from a global
    ranking of the singular values. rank_every: decide ranks at every rank_every-th step.
    Only nn.Linear and Hugging Face Conv1D layers can carry it. Other fields as in :class:`LoRAConfig`.
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: Targets = ALL_LINEAR
    modules_to_save: list[str] | None = None
    exclude_modules: Targets = None
    autocast_adapter_dtype: bool = True
    tau: float = 0.1
    min_rank: int = 1
    max_rank: int | None = None
    rank_budget: int | None = None
    rank_every: int = 1
    lora_alpha: dataclasses.InitVar[float | None] = None
    lora_dropout: dataclasses.InitVar[float | None] = None

    adapter_type = "geolora"

    def __post_init__(self, lora_alpha: float | None, lora_dropout: float | None) -> None:
        _check_lora_fields(self, "GeoLoRAConfig", lora_alpha, lora_dropout)
        _check_bool(self.autocast_adapter_dtype, "GeoLoRAConfig.autocast_adapter_dtype")
        if not _is_number(self.tau) or not 0.0 <= self.tau < 1.0:
            raise ValueError(
                f"GeoLoRAConfig.tau must be in [0, 1) (relative truncation; 0 keeps ranks fixed), got {self.tau!r}"
            )
        _check_positive_int(self.min_rank, "GeoLoRAConfig.min_rank")
        if self.max_rank is not None:
            _check_positive_int(self.max_rank, "GeoLoRAConfig.max_rank")
            if self.max_rank < max(self.r, self.min_rank):
                raise ValueError(
                    f"GeoLoRAConfig.max_rank ({self.max_rank}) must be >= r ({self.r}) and min_rank "
                    f"({self.min_rank}), or None"
                )
        if self.min_rank > self.r:
            raise ValueError(f"GeoLoRAConfig.min_rank ({self.min_rank}) must be <= r ({self.r})")
        if self.rank_budget is not None:
            _check_positive_int(self.rank_budget, "GeoLoRAConfig.rank_budget")
            if self.tau == 0:
                raise ValueError(
                    "GeoLoRAConfig.rank_budget needs tau > 0: ranks only change at rank decisions of a "
                    "rank-adaptive optimizer (e.g. tau=0.01)"
                )
        _check_positive_int(self.rank_every, "GeoLoRAConfig.rank_every")
        _normalise_module_fields(self)

    @property
    def depth(self) -> int:
        return 2

    @property
    def scaling(self) -> float:
        """alpha / r with the initial r (fixed while the rank changes)."""
        return (self.r if self.alpha is None else self.alpha) / self.r

    def to_dict(self) -> dict[str, Any]:
        return {"adapter_type": self.adapter_type, **dataclasses.asdict(self)}


AdapterConfig = LoRAConfig | DeepLoRAConfig | GeoLoRAConfig


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Inverse of ``config.to_dict()``; raises ValueError for an unknown adapter type or field."""
    d = dict(d)
    kind = d.pop("adapter_type", None)
    cls = {"lora": LoRAConfig, "deep_lora": DeepLoRAConfig, "geolora": GeoLoRAConfig}.get(kind)
    if cls is None:
        raise ValueError(f"unknown adapter_type {kind!r}; expected 'lora', 'deep_lora' or 'geolora'")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}")
    return cls(**d)
