"""AdamW with one second moment per parameter tensor (as Adam-mini does per block): the ablation
arm that asks whether factorized AdamW's edge over LowRankAdam on the language model comes from
Adam's per-coordinate step sizes. LowRankAdam's default ``second_moment="unit"`` keeps one second
moment per layer; this optimizer gives plain A B^T factors the same kind of normalisation, with
everything else as ``torch.optim.AdamW``.

For each tensor p with gradient g (step t, lr, betas (b1, b2), eps, weight decay wd):

    p <- p (1 - lr wd)
    m <- b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) mean(g^2)          # one number per tensor
    p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

__all__ = ["PerTensorAdamW"]


class PerTensorAdamW(Optimizer):
    """AdamW whose second moment is the running mean of ``g^2`` over each whole tensor."""

    def __init__(
        self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0
    ):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros((), dtype=p.dtype, device=p.device)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if wd != 0:
                    p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).add_(g.square().mean(), alpha=1 - b2)
                denom = (v / (1 - b2**t)).sqrt().add_(eps)
                p.add_(m / denom, alpha=-lr / (1 - b1**t))
        return loss
