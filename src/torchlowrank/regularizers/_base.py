"""What the matrix regularizers share: choosing layers, viewing weights as matrices (slices of fused
projections included), and adding a gradient to ``.grad`` or applying it to the weight (decoupled).

A *block* is one regularized matrix: a whole weight, or one slice of a fused projection
(``split``). Which layers have a matrix, and where its output dimension lies, is
``torchlowrank.layer_types.matrix_view``'s answer; a block is taken from the stored weight flattened
after its first dimension:
- ``nn.Linear``: the weight (out, in) as is;
- convolutions (``nn.Conv2d``, groups=1): the kernel reshaped to (out, in * kh * kw);
- Hugging Face ``Conv1D`` (GPT-2): the stored weight (in, out) as is. It is the transpose of the
  (out, in) matrix the layer applies; the singular values, and hence every regularizer here, are the
  same for a matrix and its transpose, and the gradient of the transpose is the transpose of the
  gradient, so regularizing the stored layout is regularizing ``W.T``. Fused slices are taken along
  the output dimension, which is the *last* dimension of a Conv1D weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import sharded
from ..layer_types import DENSE_KINDS, is_hf_conv1d, matrix_view
from ..linalg import compute_dtype
from ..targets import Targets, find_targets, name_matches

__all__ = ["Block", "MatrixRegularizer", "is_hf_conv1d", "supported_module"]

Split = int | Mapping[str, int | Iterable[int]] | None


REGULARIZED = ", ".join(k.label for k in DENSE_KINDS if k.kind != "embedding")


def supported_module(module: nn.Module) -> bool:
    """Layers with an exact, stored matrix view (``torchlowrank.layer_types``: nn.Linear, nn.Conv2d
    with groups=1, HF Conv1D, ...). Embeddings are left out: a table tied to an output head is regularized
    once, as the head."""
    view = matrix_view(module)
    return view is not None and view.exact and not view.computed and view.kind != "embedding"


def _candidate(module: nn.Module) -> bool:
    # wider than supported_module so that an explicitly named unsupported layer gets a clear error
    return matrix_view(module) is not None or isinstance(getattr(module, "weight", None), torch.Tensor)


@dataclass
class Block:
    """One regularized matrix: rows ``start:stop`` along ``split_dim`` of ``param``'s matrix view."""

    name: str
    param: nn.Parameter
    split_dim: int  # 0: slices are rows of the matrix view (Linear, Conv2d); 1: columns (Conv1D)
    start: int
    stop: int
    rank: int  # target rank of this block (after fractions / overrides)
    state: dict = field(default_factory=dict)

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        """The (p, q) block of ``t`` (the parameter or a tensor of its shape), a view where possible."""
        if t.ndim == 2 and self.start == 0 and self.stop == t.shape[self.split_dim]:
            return t
        mat = t.reshape(t.shape[0], -1)
        return mat[self.start : self.stop] if self.split_dim == 0 else mat[:, self.start : self.stop]

    @property
    def shape(self) -> tuple[int, int]:
        p, q = self.param.shape[0], math.prod(self.param.shape[1:])
        return (self.stop - self.start, q) if self.split_dim == 0 else (p, self.stop - self.start)

    @property
    def full_rank(self) -> int:
        return min(self.shape)


def _split_sizes(spec, length: int, name: str) -> list[int]:
    if isinstance(spec, bool) or spec is None:
        raise ValueError(f"split for {name!r} must be an int or a list of sizes, got {spec!r}")
    if isinstance(spec, int):
        if spec < 1 or length % spec:
            raise ValueError(
                f"split={spec} does not divide the output dimension {length} of {name!r}; pass the "
                "slice sizes explicitly (e.g. split={'c_attn': [q, k, v]}) or exclude the layer"
            )
        return [length // spec] * spec
    sizes = list(spec)
    if (
        not sizes
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes)
        or sum(sizes) != length
    ):
        raise ValueError(
            f"split sizes {sizes!r} for {name!r} must be positive ints summing to its output "
            f"dimension {length}"
        )
    return sizes


def _lookup(mapping: Mapping[str, object] | None, name: str):
    """The value of the first key of ``mapping`` matching ``name`` (exact name or '.suffix')."""
    if not mapping:
        return None
    for key, value in mapping.items():
        if name_matches(name, [key]):
            return value
    return None


def resolve_rank(target_rank, full_rank: int, name: str) -> int:
    """An int target rank (>= 1) as is, or a float in (0, 1] as max(1, floor(fraction * min(m, n)))."""
    if isinstance(target_rank, bool) or not isinstance(target_rank, (int, float)):
        raise ValueError(
            f"target_rank for {name!r} must be an int >= 1 or a fraction in (0, 1], got {target_rank!r}"
        )
    if isinstance(target_rank, int):
        if target_rank < 1:
            raise ValueError(f"target_rank for {name!r} must be >= 1, got {target_rank}")
        return target_rank
    if not (0.0 < target_rank <= 1.0):
        raise ValueError(
            f"target_rank fraction for {name!r} must be in (0, 1] (of min(m, n) = {full_rank}), "
            f"got {target_rank!r}"
        )
    return max(1, math.floor(target_rank * full_rank + 1e-9))


def check_lam(lam, what: str = "lam") -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {lam!r}")
    return float(lam)


class MatrixRegularizer:
    """Base class: target selection, blocks, and the coupled / decoupled application of a gradient.

    Subclasses implement ``_block_gradient(block, W)`` (the gradient of the regularizer / lam wrt the
    block's matrix, in the compute dtype) or override ``_gradients()`` to batch blocks.
    """

    def __init__(
        self,
        model_or_modules,
        lam: float,
        targets: Targets = None,
        *,
        exclude: Targets = None,
        split: Split = None,
        target_rank=None,
        rank_overrides: Mapping[str, int | float] | None = None,
        decoupled: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.lam = check_lam(lam)
        self.decoupled = bool(decoupled)
        self.optimizer = optimizer
        modules = self._resolve_modules(model_or_modules, targets, exclude)
        if split is not None and not isinstance(split, (int, Mapping)) or isinstance(split, bool):
            raise ValueError(f"split must be None, an int, or a dict {{name: int or sizes}}, got {split!r}")
        if rank_overrides is not None and not isinstance(rank_overrides, Mapping):
            raise ValueError(
                f"rank_overrides must be a dict {{name or suffix: rank}}, got {rank_overrides!r}"
            )
        self.blocks: list[Block] = []
        seen: dict[int, str] = {}
        for name, module in modules:
            self._check_module(name, module)
            w = module.weight
            if id(w) in seen:  # tied weights (e.g. GPT-2's lm_head and wte): regularize the matrix once
                continue
            seen[id(w)] = name
            split_dim = matrix_view(module).out_dim
            length = w.shape[-1] if split_dim == 1 else w.shape[0]
            spec = split if isinstance(split, int) else _lookup(split, name)
            sizes = [length] if spec is None else _split_sizes(spec, length, name)
            r_spec = _lookup(rank_overrides, name)
            r_spec = target_rank if r_spec is None else r_spec
            start = 0
            for i, size in enumerate(sizes):
                bname = name if len(sizes) == 1 else f"{name}[{i}]"
                block = Block(bname, w, split_dim, start, start + size, 0)
                block.rank = resolve_rank(r_spec, block.full_rank, bname) if r_spec is not None else 0
                self.blocks.append(block)
                start += size
        if self.decoupled and optimizer is not None:
            missing = [b.name for b in self.blocks if self._group_of(b.param) is None]
            if missing:
                raise ValueError(
                    f"decoupled=True with optimizer=...: the weights of {missing} are not in the "
                    "optimizer's param_groups; add them or pass lr to step() instead"
                )

    # -- target selection ------------------------------------------------------------------------------
    @staticmethod
    def _resolve_modules(model_or_modules, targets: Targets, exclude: Targets) -> list[tuple[str, nn.Module]]:
        if isinstance(model_or_modules, nn.Module):
            has_children = any(True for _ in model_or_modules.children())
            if not has_children and _candidate(model_or_modules):
                if targets is not None:
                    raise ValueError(
                        "targets selects submodules by name; a single layer has none. Pass the layer "
                        "without targets, or pass the model that contains it"
                    )
                return [(type(model_or_modules).__name__, model_or_modules)]
            explicit = targets is not None
            found = find_targets(
                model_or_modules,
                targets,
                predicate=_candidate if explicit else supported_module,
                exclude=exclude,
            )
            return found
        if isinstance(model_or_modules, Mapping):
            items = list(model_or_modules.items())
        else:
            try:
                items = list(model_or_modules)
            except TypeError:
                raise ValueError(
                    f"model_or_modules must be an nn.Module, a list of modules or of (name, module) "
                    f"pairs, or a dict, got {type(model_or_modules).__name__}"
                ) from None
            items = [it if isinstance(it, tuple) else (f"modules[{i}]", it) for i, it in enumerate(items)]
        if not items:
            raise ValueError("model_or_modules is empty: pass a model or the layers to regularize")
        if targets is not None or exclude is not None:
            raise ValueError(
                "targets / exclude select submodules of a model; with an explicit list of modules "
                "leave them None"
            )
        for name, module in items:
            if not isinstance(module, nn.Module):
                raise ValueError(f"{name!r} is a {type(module).__name__}, not an nn.Module")
        return items

    @staticmethod
    def _check_module(name: str, module: nn.Module) -> None:
        view = matrix_view(module)
        if view is not None and view.kind == "factorized":
            raise ValueError(
                f"layer {name!r} is a {type(module).__name__}: it is already low-rank (rank "
                f"{getattr(module, 'rank', '?')}); regularize the dense model before tlr.factorize/truncate, "
                "or exclude it via targets/exclude"
            )
        if view is not None and not view.exact:
            raise ValueError(f"layer {name!r}: {view.note}; exclude it via targets/exclude")
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim < 2:
            shape = None if not isinstance(w, torch.Tensor) else tuple(w.shape)
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) has no 2-D weight (weight shape {shape}); "
                "choose Linear / Conv2d / Conv1D layers via targets"
            )
        if not supported_module(module):
            raise ValueError(
                f"layer {name!r} is a {type(module).__name__}; supported: {REGULARIZED}. Exclude it "
                "via targets/exclude"
            )
        if not w.is_floating_point():
            raise ValueError(f"layer {name!r} has a {w.dtype} weight; a floating-point weight is needed")

    # -- helpers -----------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Names of the regularized blocks (``layer`` or ``layer[i]`` for slices)."""
        return [b.name for b in self.blocks]

    def _group_of(self, p: torch.Tensor) -> dict | None:
        for group in self.optimizer.param_groups:
            if any(q is p for q in group["params"]):
                return group
        return None

    def _param_lr(self, p: torch.Tensor) -> float | torch.Tensor:
        """The lr of ``p``'s param group, as stored: a tensor lr (e.g. set by a scheduler) stays a tensor,
        so that reading it does not synchronise a GPU with the host."""
        group = self._group_of(p)
        if group is None:
            raise ValueError("a regularized weight is not in the optimizer's param_groups")
        return group["lr"]

    def _lrs(self, lr: float | None) -> list[float | torch.Tensor]:
        if lr is not None:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
                raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
            return [float(lr)] * len(self.blocks)
        if self.optimizer is None:
            raise ValueError(
                "decoupled=True needs a learning rate: construct with optimizer=opt (its param groups' "
                "lr is used, schedulers included) or call step(lr=...)"
            )
        return [self._param_lr(b.param) for b in self.blocks]

    def _block_gradient(self, block: Block, W: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    gradient_factor = 1.0  # the gradient of the regularizer is lam * gradient_factor * _gradients()

    def _gradients(self) -> list[torch.Tensor]:
        """d(regularizer / lam)/dW / gradient_factor for every block, in the compute dtype (override to batch blocks)."""
        return [
            self._block_gradient(b, b.matrix(b.param.detach()).to(compute_dtype(b.param.dtype)))
            for b in self.blocks
        ]

    def _apply(self, lr: float | None) -> None:
        """Coupled: ``.grad += lam * dR/dW``; decoupled: ``W -= lr * lam * dR/dW`` (AdamW's convention)."""
        lrs = self._lrs(lr) if self.decoupled else None
        with torch.no_grad(), torch.autocast(device_type=self.blocks[0].param.device.type, enabled=False):
            grads = self._gradients()  # every block first: a failure leaves weights and gradients untouched
            if self.lam == 0.0:
                return
            scale = self.lam * self.gradient_factor
            for i, (b, g) in enumerate(zip(self.blocks, grads)):
                if self.decoupled:
                    _write_block(b, sharded.local(b.param.data), g, -lrs[i] * scale)
                else:
                    if b.param.grad is None:
                        b.param.grad = torch.zeros_like(b.param)
                    _write_block(b, sharded.local(b.param.grad), g, scale)  # FSDP2: this rank's rows


def _write_block(
    b: Block, target: torch.Tensor, delta: torch.Tensor, alpha: float | torch.Tensor = 1.0
) -> None:
    """target[block] += alpha * delta (delta: the block's (p, q) matrix), in place, whatever target's strides.
    ``alpha`` may be a 0-d tensor (a tensor learning rate): it is multiplied in, never read back."""
    if isinstance(alpha, torch.Tensor):
        delta, alpha = delta * alpha.to(delta.dtype), 1.0
    view = b.matrix(target)
    if _shares_storage(view, target):
        view.add_(delta.to(target.dtype), alpha=alpha)
        return
    full = torch.zeros(target.shape[0], math.prod(target.shape[1:]), dtype=delta.dtype, device=delta.device)
    if b.split_dim == 0:
        full[b.start : b.stop] = alpha * delta
    else:
        full[:, b.start : b.stop] = alpha * delta
    target.add_(full.reshape(target.shape).to(target.dtype))


def _shares_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
