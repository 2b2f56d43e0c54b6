"""Nuclear-norm baseline with the same interface as :class:`~torchlowrank.regularizers.Q3R`.

Regularizer ``lam * sum_blocks ||W||_*`` (sum of singular values). :meth:`NuclearNorm.step` adds the
sub-gradient ``lam * U V^T`` (over the singular directions with s > 0; for a full-rank matrix this is
the gradient) to ``.grad`` -- or, ``decoupled=True``, subtracts ``lr`` times it from ``W`` -- using a
full SVD of every block at every step (float32, no autograd). :meth:`NuclearNorm.prox` is the
proximal alternative: call it after ``optimizer.step()`` to soft-threshold every block's singular
values by ``lr * lam`` (singular value thresholding), which sets small singular values exactly to 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..linalg import compute_dtype, robust_svd
from ..targets import Targets
from ._base import Block, MatrixRegularizer, Split, _write_block

__all__ = ["NuclearNorm"]


class NuclearNorm(MatrixRegularizer):
    """``lam * sum ||W||_*`` over the targeted matrices; layer selection, ``split``, ``decoupled``,
    ``optimizer`` exactly as for :class:`Q3R`.

    Usage: ``loss.backward(); reg.step(); optimizer.step()`` (sub-gradient), or
    ``loss.backward(); optimizer.step(); reg.prox()`` (proximal gradient).
    """

    def __init__(
        self,
        model_or_modules: nn.Module | Any,
        lam: float,
        targets: Targets = None,
        *,
        exclude: Targets = None,
        decoupled: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        split: Split = None,
    ) -> None:
        super().__init__(
            model_or_modules,
            lam,
            targets,
            exclude=exclude,
            split=split,
            decoupled=decoupled,
            optimizer=optimizer,
        )
        self.steps = 0

    def _svd(self, block: Block, W: torch.Tensor):
        if not torch.isfinite(W).all():
            raise ValueError(
                f"weight of {block.name!r} contains NaN/Inf at step {self.steps}; training diverged"
            )
        return robust_svd(W)

    def _block_gradient(self, block: Block, W: torch.Tensor) -> torch.Tensor:
        U, S, Vh = self._svd(block, W)
        keep = S > S.max() * max(W.shape) * torch.finfo(S.dtype).eps if S.numel() else S > 0
        return (U[:, keep] @ Vh[keep]).to(W.dtype)

    def step(self, lr: float | None = None) -> None:
        """Add ``lam * U V^T`` to ``.grad`` (decoupled: ``W -= lr * lam * U V^T``); call after ``backward()``."""
        self._apply(lr)
        self.steps += 1

    @torch.no_grad()
    def prox(self, lr: float | None = None) -> None:
        """W <- U diag(max(s - lr * lam, 0)) V^T for every block (call after ``optimizer.step()``);
        ``lr`` from the argument or from ``optimizer=``."""
        lrs = self._lrs(lr)
        mats = [b.matrix(b.param.detach()).to(compute_dtype(b.param.dtype)) for b in self.blocks]
        svds = [self._svd(b, W) for b, W in zip(self.blocks, mats)]
        for b, W, (U, S, Vh), step in zip(self.blocks, mats, svds, lrs):
            shrunk = (U * (S - step * self.lam).clamp_min(0)) @ Vh
            _write_block(b, b.param.data, shrunk - W)

    def value(self) -> torch.Tensor:
        """``lam * sum ||W||_*`` (float32 scalar, differentiable wrt the weights)."""
        dev = self.blocks[0].param.device
        total = torch.zeros((), device=dev)
        with torch.autocast(device_type=dev.type, enabled=False):
            for b in self.blocks:
                W = b.matrix(b.param)
                W = W.to(compute_dtype(W.dtype))
                total = total + torch.linalg.matrix_norm(W, ord="nuc")
        return self.lam * total

    def advance(self) -> None:
        """Count a step (for users of ``loss + reg.value()``); nothing else to update."""
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "lam": self.lam}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        return f"NuclearNorm({len(self.blocks)} matrices, lam={self.lam}, decoupled={self.decoupled})"
