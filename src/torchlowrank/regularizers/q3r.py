"""Q3R: the quadratic reweighted rank regularizer (DESIGN §4.6).

For a weight matrix W (m, n) with singular values s_i, the smoothed log-det rank surrogate is

    F_eps(W) = sum_i f_eps(s_i),  f_eps(s) = eps^2 log(s / eps) + eps^2 / 2   (s >= eps)
                                              s^2 / 2                         (s <  eps).

Every ``period`` steps Q3R takes the top singular triplets of the current weight W0 (no autograd,
float32), lowers eps <- min(eps, s_{r+1}(W0)) (eps starts at +inf; r = target rank) and keeps
U (m, k), V (n, k), s (k,) with s > eps. This defines the weight operator

    R(X) = P_U X P_V,  P_U = U diag(eps / s) U^T + (I - U U^T)   (same for V),

so with c = eps / s - 1:  R(X) = X + U diag(c) U^T X + X V diag(c) V^T + U diag(c) (U^T X V) diag(c) V^T.
R is symmetric positive semi-definite, and the quadratic

    Q(W | W0) = F_eps(W0) + 1/2 (<W, R(W)> - <W0, R(W0)>)

majorizes F_eps and touches it at W = W0 (R's weights eps^2 / (s_i s_j) are the geometric means of
the per-side IRLS weights, elementwise at least the harmonic means for which Kuemmerle & Sigl
(2018) prove majorization; the tests check it on random matrices). Between reweightings the operator
is fixed and the penalty is a plain quadratic.

Factor convention: the regularizer is ``lam * <W, R(W)>`` (summed over the regularized matrices),
whose gradient is ``2 * lam * R(W)``; this is what :meth:`Q3R.step` adds to ``W.grad`` and what
:meth:`Q3R.value` returns (with a gradient). Directions with s_i <= eps (all of them while
eps = +inf) are weighted 1, so ``target_rank >= min(m, n)`` leaves R = identity: the regularizer is
then ``lam * ||W||_F^2``, i.e. plain L2 weight decay with gradient ``2 lam W``.
Per step the cost is ~4 k m n multiply-adds per matrix; the SVD is amortised over ``period`` steps.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as tlr_dist
from ..linalg import compute_dtype, truncated_svd
from ..targets import Targets
from ._base import MatrixRegularizer, Split

__all__ = ["Q3R", "q3r_operator", "smoothed_logdet", "q3r_reweight"]


def smoothed_logdet(s: torch.Tensor, eps: float) -> torch.Tensor:
    """F_eps = sum_i f_eps(s_i) for singular values s (k,); eps = +inf gives sum s_i^2 / 2."""
    if math.isinf(eps):
        return (s * s).sum() / 2
    big = s >= eps
    safe = torch.where(big, s, torch.ones_like(s) * max(eps, 1e-300))
    return torch.where(big, eps**2 * torch.log(safe / eps) + eps**2 / 2, s * s / 2).sum()


def q3r_operator(X: torch.Tensor, U: torch.Tensor, V: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """R(X) = (I + U diag(c) U^T) X (I + V diag(c) V^T).

    X: (m, n), U: (m, k), V: (n, k), c: (k,) = eps / s - 1. Cost 4 k m n (two passes of 2 k m n).
    """
    if c.numel() == 0:
        return X.clone()
    A = X + U @ (c[:, None] * (U.T @ X))
    return A + ((A @ V) * c) @ V.T


def q3r_reweight(W: torch.Tensor, rank: int, eps: float, *, method: str = "randomized", k_start: int = 0,
                 oversample: int = 8, n_iter: int = 2, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One reweighting: (U (m, k), s (k,), V (n, k), eps') with eps' = min(eps, s_{rank+1}(W)), s > eps'.

    W: (m, n) float32/float64, no autograd. The SVD is truncated to the top ``k`` triplets, starting at
    ``max(rank + 1, k_start)`` and doubling while the smallest computed s is still above eps' (so no kept
    direction is missed); ``method`` is passed to :func:`torchlowrank.linalg.truncated_svd`
    ("randomized" switches to "full" when the sketch would be most of the matrix).
    ``rank >= min(m, n)``: nothing is kept and eps stays as it is (+inf: R = identity, weight decay).
    ``s_{rank+1} = 0`` leaves eps unchanged too.
    """
    full = min(W.shape)
    if rank >= full:
        return W.new_zeros(W.shape[0], 0), W.new_zeros(0), W.new_zeros(W.shape[1], 0), eps
    k = min(full, max(rank + 1, k_start))
    while True:
        how = "full" if (method != "full" and k + oversample >= full) else method
        U, S, Vh = truncated_svd(W, k, method=how, oversample=oversample, n_iter=n_iter, generator=generator)
        # a zero s_{r+1} (rank <= r, e.g. an update W - W0 at its start) carries no scale: keep eps
        new_eps = min(eps, float(S[rank])) if float(S[rank]) > 0 else eps
        if float(S[-1]) <= new_eps or k == full:
            break
        k = min(full, 2 * k)
    keep = S > new_eps
    return U[:, keep], S[keep], Vh[keep].T, new_eps


class Q3R(MatrixRegularizer):
    """Quadratic reweighted rank regularizer: pushes each targeted weight toward rank ``target_rank``.

    Usage (coupled, the default; works with any optimizer)::

        reg = tlr.Q3R(model, target_rank=0.1, lam=0.1, targets=["q", "k", "v", "proj"])
        loss.backward(); reg.step(); optimizer.step()

    ``reg.step()`` reweights when due (every ``period`` calls, starting with the first), then adds
    ``2 lam R(W)`` to each weight's ``.grad``. ``decoupled=True`` instead applies
    ``W <- W - lr * 2 lam R(W)`` to the weight (like AdamW's weight decay, evaluated at the weight the
    gradient was computed at): call ``reg.step()`` at the same place (after ``backward()``, before
    ``optimizer.step()``), with ``lr`` taken from ``optimizer=`` (each weight's param group, so lr
    schedulers apply) or given as ``reg.step(lr=...)``. With plain SGD both modes give the same
    iterates. Users who prefer autograd add ``reg.value()`` to the loss and call ``reg.advance()``
    once per step instead of ``reg.step()``.

    Args:
        model_or_modules: a model (layers chosen by ``targets``), one layer, a list of layers or of
            ``(name, layer)`` pairs, or a dict name -> layer. Supported: nn.Linear, nn.Conv2d (groups=1,
            kernel reshaped to (out, in*kh*kw)), transformers ``Conv1D``. ``LowRankLinear`` /
            ``LowRankConv2d`` are refused (already low-rank). Tied weights are regularized once.
        target_rank: int >= 1, or a float in (0, 1]: that fraction of each matrix's full rank
            min(m, n) (of each slice, with ``split``), at least 1.
        lam: strength (>= 0) in ``lam * <W, R(W)>``.
        period: reweight every ``period`` steps.
        targets / exclude: PEFT ``target_modules`` semantics (:func:`torchlowrank.targets.find_targets`);
            ``None``: every supported layer.
        split: fused projections regularized as separate slices along the output dimension: an int
            (equal slices, for every target) or ``{name or suffix: int or [sizes]}``, e.g.
            ``{"c_attn": 3}`` for GPT-2's q|k|v.
        rank_overrides: ``{name or suffix: int or fraction}``, first match wins.
        method: SVD of the reweighting, ``"randomized"`` (default), ``"full"`` or ``"auto"``.
        update: regularize the update ``W - W0`` instead of ``W`` (W0: the weights when the regularizer is
            built), e.g. to make a full fine-tuning's update low-rank so that it can be exported as a
            rank-r LoRA adapter. W0 is kept (compute dtype) and saved in :meth:`state_dict`.
        seed: seeds the randomized SVD's sketches (a function of the seed, step and block, so a resumed
            run draws the same sketches).
        shard_reweighting: under ``torch.distributed`` (DDP), split the reweighting's SVDs over the
            processes (block i on process i % world_size) and broadcast the results: each process
            computes 1/world_size of them, for two all-reduces of a few numbers and one broadcast per
            block (U, V, s) on reweighting steps. The result is the same as unsharded (the same
            sketches). False (default): every process reweights every block from its identical
            weights, with no collective. No effect without a process group.
    """

    def __init__(self, model_or_modules: nn.Module | Any, target_rank: int | float, lam: float, period: int = 5,
                 targets: Targets = None, *, exclude: Targets = None, decoupled: bool = False,
                 optimizer: torch.optim.Optimizer | None = None, split: Split = None,
                 rank_overrides: Mapping[str, int | float] | None = None, method: str = "randomized",
                 oversample: int = 8, n_iter: int = 2, update: bool = False, seed: int = 0,
                 shard_reweighting: bool = False) -> None:
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        if method not in ("randomized", "full", "auto"):
            raise ValueError(f"method must be 'randomized', 'full' or 'auto', got {method!r}")
        if target_rank is None:
            raise ValueError("target_rank is required: an int >= 1 or a fraction in (0, 1] of min(m, n)")
        if not isinstance(shard_reweighting, bool):
            raise ValueError(f"shard_reweighting must be True or False, got {shard_reweighting!r}")
        self.shard_reweighting = shard_reweighting
        super().__init__(model_or_modules, lam, targets, exclude=exclude, split=split, target_rank=target_rank,
                         rank_overrides=rank_overrides, decoupled=decoupled, optimizer=optimizer)
        self.period = period
        self.method, self.oversample, self.n_iter, self.seed = method, int(oversample), int(n_iter), int(seed)
        self.steps = 0
        self._reweighted_at = -1
        self._groups = None
        self.update = bool(update)
        for b in self.blocks:
            m, n = b.shape
            z = dict(device=b.param.device)
            b.state.update(eps=math.inf, U=torch.zeros(m, 0, **z), V=torch.zeros(n, 0, **z), s=torch.zeros(0, **z),
                           c=torch.zeros(0, **z))
            if self.update:
                b.state["anchor"] = b.matrix(b.param.detach()).to(compute_dtype(b.param.dtype)).clone()

    # -- the algorithm ---------------------------------------------------------------------------------
    def _current(self, b, W: torch.Tensor) -> torch.Tensor:
        """The regularized matrix of block ``b`` given its weight matrix W: W, or W - W0 (``update=True``)."""
        W = W.to(compute_dtype(W.dtype))
        return W - b.state["anchor"] if self.update else W

    def _due(self) -> bool:
        return self.steps % self.period == 0 and self._reweighted_at != self.steps

    @torch.no_grad()
    def reweight(self) -> None:
        """Recompute U, V, s and eps of every block from the current weights (float32, no autograd).

        Raises ``ValueError`` naming the layer (and changes nothing) if a weight holds NaN/Inf.
        """
        mats = []
        for b in self.blocks:
            W = b.matrix(b.param.detach())
            if not torch.isfinite(W).all():
                raise ValueError(f"weight of {b.name!r} contains NaN/Inf at step {self.steps}: training diverged "
                                 "(lower the learning rate or lam); the regularizer was left unchanged")
            mats.append(self._current(b, W))
        world, me = tlr_dist.world_size(), tlr_dist.rank()
        shard = self.shard_reweighting and world > 1
        new: list[tuple | None] = []
        with torch.autocast(device_type=mats[0].device.type, enabled=False):
            for i, (b, W) in enumerate(zip(self.blocks, mats)):
                if shard and i % world != me:  # another process reweights this block
                    new.append(None)
                    continue
                Wf = W.to(compute_dtype(W.dtype))
                gen = torch.Generator(device=Wf.device).manual_seed(
                    (self.seed * 1_000_003 + self.steps * 7919 + i) % (2**63 - 1))
                U, s, V, eps = q3r_reweight(Wf, b.rank, b.state["eps"], method=self.method,
                                            k_start=b.state["s"].numel() + 1, oversample=self.oversample,
                                            n_iter=self.n_iter, generator=gen)
                new.append((U, s, V, eps))
        if shard:
            new = self._share_reweighting(new, mats, world)
        for b, (U, s, V, eps) in zip(self.blocks, new):
            b.state.update(U=U, V=V, s=s, eps=eps, c=(eps / s - 1.0) if s.numel() else s.clone())
        self._reweighted_at = self.steps
        self._build_groups()

    def _share_reweighting(self, new: list, mats: list[torch.Tensor], world: int) -> list[tuple]:
        """Give every process every block's (U, s, V, eps); block i was computed by process i % world.
        Two all-reduces (the k's, so that receivers can allocate, and the eps's), then one broadcast
        per block with k > 0 of its packed [U; V; s^T] (m + n + 1, k) from its owner."""
        dev = mats[0].device
        ks = torch.tensor([0 if t is None else t[1].numel() for t in new], dtype=torch.int64, device=dev)
        eps = torch.tensor([0.0 if t is None else t[3] for t in new], dtype=torch.float64, device=dev)
        dist.all_reduce(ks, op=dist.ReduceOp.SUM)  # each entry is non-zero on its owner only
        dist.all_reduce(eps, op=dist.ReduceOp.SUM)  # (eps > 0, or +inf: inf + 0 = inf)
        out = []
        for i, W in enumerate(mats):
            m, n = W.shape
            k = int(ks[i])
            if new[i] is not None:
                U, sv, V, _ = new[i]
                packed = torch.cat([U, V, sv[None]])
            else:
                packed = torch.empty(m + n + 1, k, dtype=compute_dtype(W.dtype), device=dev)
            if k:
                dist.broadcast(packed, src=i % world)
            out.append((packed[:m], packed[m + n], packed[m:m + n], float(eps[i])))
        return out

    def _build_groups(self) -> None:
        """Stack the operators of same-shape blocks (zero-padded to the group's largest k; c = 0 pads are
        the identity) so that each step costs a few batched matmuls instead of one set per matrix."""
        by_key: dict[tuple, list[int]] = {}
        for i, b in enumerate(self.blocks):
            key = (b.shape, compute_dtype(b.param.dtype), b.param.device)
            by_key.setdefault(key, []).append(i)
        self._groups = []
        for (shape, dtype, device), idx in by_key.items():
            K = max(self.blocks[i].state["s"].numel() for i in idx)
            m, n = shape
            U = torch.zeros(len(idx), m, K, dtype=dtype, device=device)
            V = torch.zeros(len(idx), n, K, dtype=dtype, device=device)
            c = torch.zeros(len(idx), K, dtype=dtype, device=device)
            for j, i in enumerate(idx):
                st = self.blocks[i].state
                k = st["s"].numel()
                U[j, :, :k], V[j, :, :k], c[j, :k] = st["U"], st["V"], st["c"]
            self._groups.append((idx, U, V, c))

    gradient_factor = 2.0  # d/dW lam <W, R(W)> = 2 lam R(W); _gradients returns R(W)

    def _gradients(self) -> list[torch.Tensor]:
        if self._groups is None:
            self._build_groups()
        out: list[torch.Tensor | None] = [None] * len(self.blocks)
        for idx, U, V, c in self._groups:
            W = torch.stack([self._current(self.blocks[i], self.blocks[i].matrix(self.blocks[i].param.detach()))
                             for i in idx]).to(U.dtype)
            if c.shape[-1]:
                A = W + U @ (c[:, :, None] * (U.mT @ W))
                W = A + ((A @ V) * c[:, None, :]) @ V.mT
            for j, i in enumerate(idx):
                out[i] = W[j]
        return out

    def step(self, lr: float | None = None) -> None:
        """Reweight if due, then add ``2 lam R(W)`` to ``.grad`` (or, decoupled, subtract ``lr`` times it
        from ``W``), then count the step. Call after ``loss.backward()``, before ``optimizer.step()``."""
        if self._due():
            self.reweight()
        self._apply(lr)
        self.steps += 1

    def advance(self) -> None:
        """Count one training step without touching gradients (for users of ``loss + reg.value()``)."""
        if self._due():
            self.reweight()
        self.steps += 1

    def value(self) -> torch.Tensor:
        """``lam * sum_blocks <W, R(W)>`` (float32 scalar), differentiable wrt the weights with U, V, eps
        held fixed: its gradient is the ``2 lam R(W)`` that :meth:`step` adds. Reweights first if due."""
        if self._due():
            self.reweight()
        dev = self.blocks[0].param.device
        total = torch.zeros((), device=dev, dtype=compute_dtype(self.blocks[0].param.dtype))
        with torch.autocast(device_type=dev.type, enabled=False):
            for b in self.blocks:
                W = self._current(b, b.matrix(b.param))
                st = b.state
                R = q3r_operator(W, st["U"].to(W.dtype), st["V"].to(W.dtype), st["c"].to(W.dtype))
                total = total + (W * R).sum().to(total.dtype)
        return self.lam * total

    @torch.no_grad()
    def surrogate(self) -> torch.Tensor:
        """``sum_blocks F_eps(W)`` at the current eps (full singular values, float64; for logging)."""
        total = torch.zeros((), dtype=torch.float64)
        for b in self.blocks:
            s = torch.linalg.svdvals(self._current(b, b.matrix(b.param.detach())).double().cpu())
            total += smoothed_logdet(s, b.state["eps"])
        return total

    # -- introspection -----------------------------------------------------------------------------------
    @property
    def eps(self) -> dict[str, float]:
        """Current eps of every block (+inf before the first reweighting)."""
        return {b.name: b.state["eps"] for b in self.blocks}

    @property
    def ranks(self) -> dict[str, int]:
        """Target rank of every block."""
        return {b.name: b.rank for b in self.blocks}

    def kept(self) -> dict[str, int]:
        """Number k of singular directions weighted by the operator (those with s > eps) per block."""
        return {b.name: int(b.state["s"].numel()) for b in self.blocks}

    # -- checkpointing -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only: step count, and per block name, rank, eps, U, V, s."""
        return {
            "steps": self.steps, "reweighted_at": self._reweighted_at, "period": self.period, "lam": self.lam,
            "blocks": [{"name": b.name, "rank": b.rank, "eps": b.state["eps"], "U": b.state["U"].clone(),
                        "V": b.state["V"].clone(), "s": b.state["s"].clone(),
                        **({"anchor": b.state["anchor"].clone()} if self.update else {})} for b in self.blocks],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; a resumed run continues exactly like an uninterrupted one.

        Raises ``ValueError`` (changing nothing) if the blocks (names, ranks, shapes) differ."""
        blocks = state.get("blocks") if isinstance(state, Mapping) else None
        if not isinstance(blocks, list) or len(blocks) != len(self.blocks):
            raise ValueError(f"state has {None if blocks is None else len(blocks)} blocks, this Q3R has "
                             f"{len(self.blocks)}: build the regularizer with the same model, targets and split")
        for b, sb in zip(self.blocks, blocks):
            m, n = b.shape
            k = sb["s"].numel()
            if sb["name"] != b.name or sb["rank"] != b.rank or tuple(sb["U"].shape) != (m, k) \
                    or tuple(sb["V"].shape) != (n, k) or ("anchor" in sb) != self.update:
                raise ValueError(f"state block {sb['name']!r} (rank {sb['rank']}, U {tuple(sb['U'].shape)}) does not "
                                 f"match {b.name!r} (rank {b.rank}, shape {(m, n)})")
        dev = self.blocks[0].param.device
        for b, sb in zip(self.blocks, blocks):
            s = sb["s"].to(dev)
            eps = float(sb["eps"])
            b.state.update(U=sb["U"].to(dev).clone(), V=sb["V"].to(dev).clone(), s=s.clone(), eps=eps,
                           c=(eps / s - 1.0) if s.numel() else s.clone())
            if self.update:
                b.state["anchor"] = sb["anchor"].to(dev).clone()
        self.steps = int(state["steps"])
        self._reweighted_at = int(state["reweighted_at"])
        self._build_groups()

    def __repr__(self) -> str:
        return (f"Q3R({len(self.blocks)} matrices, lam={self.lam}, period={self.period}, "
                f"decoupled={self.decoupled}, steps={self.steps})")
