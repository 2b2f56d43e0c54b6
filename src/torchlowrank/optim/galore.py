"""GaLoreAdamW: Adam in a low-rank projection of each matrix gradient (Zhao et al. 2024), DESIGN §4.5 baselines.

Conventions of the ``galore-torch`` package (``proj_type="std"``), which this reproduces:
for a gradient G (m, n) with m >= n the projection is on the right, R = G P^T with P (r, n) the
top-r right singular vectors; for m < n on the left, R = Q^T G with Q (m, r) the top-r left
singular vectors. The projector is recomputed when ``step % update_gap == 0`` (step counted from 0
before the update, so at the first step too) and the Adam moments are kept as they are across a
refresh. Adam (bias-corrected step size lr sqrt(1 - b2^t) / (1 - b1^t), denominator sqrt(v) + eps)
runs on R; the direction is projected back and multiplied by ``scale``; then decoupled weight decay
p <- p - lr wd p. Parameters that are 1-D (or whose smaller side is <= rank) get plain AdamW
with the same formulas. Conv kernels (out, in, kh, kw) are projected as (out, in*kh*kw) matrices
(an extension: the package handles 2-D parameters only).

``refresh``: ``"svd"`` computes the projector with a full ``torch.linalg.svd`` exactly as the
package does; ``"warm"`` (default) runs subspace iteration warm-started from the previous
projector (plus a few random columns) followed by a Rayleigh-Ritz step, O(m n r) instead of a full
SVD — the first refresh starts from a random sketch (a generator seeded from the step and the
parameter's index, so a resumed run refreshes identically).

Signs: each singular vector of the projector has its largest-|entry| component positive, in both
refresh paths. The package keeps LAPACK's signs, which differ between devices and libraries; as
the moments are kept across a refresh they change the update after the second refresh (with the
package's projector sign-fixed the updates are equal, ``tests/test_optim_galore.py``).

FSDP2 (``fully_shard``: parameters and gradients are DTensors split by rows over a 1-D mesh): the
step equals the single-process one on the global batch without forming any full gradient. For a
gradient G (m, n) whose rows are split, the subspace iteration of a right projection (m >= n) keeps
its (n, k) basis replicated and all-reduces G_loc^T (G_loc Q) and the (k, k) Gram; a left projection
(m < n: the basis lives on the m side, the smaller one) keeps an (m, k) basis, all-reduces
G_loc^T Q_loc (n, k) and all-gathers the (m, k) rows of G (G^T Q). The sketch comes from the same
seeded generator on every rank, so every rank computes the same projector. State is sharded like
the parameter: right, the moments (m, r) by rows and P (r, n) replicated; left, Q (m, r) by rows and
the moments (r, n) by rows of r (R = Q^T G is reduce-scattered, the direction all-gathered). Other
placements (``Shard(1)``, 2-D meshes) and ``refresh="svd"`` raise ``ValueError``. Build the
optimizer after ``fully_shard`` (it holds the sharded parameters). Its state goes through
``torch.distributed.checkpoint`` (``get_state_dict`` / ``set_state_dict``) and resumes on another
world size.

Host synchronisation (DESIGN §7): none in a step with ``refresh="warm"``, refresh steps included
(QR and matrix products only; the Rayleigh-Ritz eigenproblem is solved by :func:`_top_eigenvectors`,
not ``eigh`` / ``svd``, which check their status). ``refresh="svd"``: one per refresh and matrix,
``torch.linalg.svd``'s status check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer

from .. import sharded
from ..linalg import sign_fixed

__all__ = ["GaLoreAdamW"]


def _top_eigenvectors(
    C: torch.Tensor, rank: int, power_iters: int = 8, jacobi_iters: int = 12
) -> torch.Tensor:
    """Top-``rank`` eigenvectors of a symmetric PSD C (..., k, k) -> (..., k, rank), eigenvalues descending.

    ``torch.linalg.eigh`` / ``svd`` check their status (a host synchronisation on CUDA); this uses QR
    and matrix products only. Orthogonal iteration from the identity orders the columns roughly (the
    first columns of a warm basis are already near the answer), then simultaneous Jacobi rotations
    (every pair (i, j) rotated at once by the angle that diagonalises its 2 x 2 block, re-orthonormalised
    by QR) converge quadratically: 8 + 10 iterations reach float64 precision on k = 136 with slowly
    decaying (s_i ~ i^-1/2) spectra. A cluster of (nearly) equal eigenvalues at the top converges
    more slowly (residual ~1e-5 after 8 + 12 on k = 40): its vectors are ill-defined anyway, their span is not.
    """
    k = C.shape[-1]
    X = torch.eye(k, dtype=C.dtype, device=C.device).expand_as(C)
    for _ in range(power_iters):
        X = torch.linalg.qr(C @ X).Q
    for _ in range(jacobi_iters):
        S = X.mT @ C @ X
        d = S.diagonal(dim1=-2, dim2=-1)
        gap = d.unsqueeze(-2) - d.unsqueeze(-1)  # gap[i, j] = d_j - d_i
        gap = torch.where(gap == 0, torch.full_like(gap, torch.finfo(C.dtype).tiny), gap)
        K = torch.tan(0.5 * torch.atan(2 * S / gap)).triu(1)  # |angle| <= pi/4: bounded for close pairs
        X = torch.linalg.qr(X + X @ (K - K.mT)).Q
    d = (X * (C @ X)).sum(-2)
    order = d.argsort(dim=-1, descending=True)[..., :rank]
    return X.gather(-1, order.unsqueeze(-2).expand(*X.shape[:-1], rank))


def _subspace_basis(
    A: torch.Tensor,
    rank: int,
    start: torch.Tensor | None,
    iters: int,
    oversample: int,
    generator: torch.Generator,
    ops: _Ops | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Subspace iteration for the top right singular vectors of A (m, n): an orthonormal basis
    Q (n, k), k = rank + oversample, and the float64 Gram matrix C = (A Q)^T (A Q) (k, k) of its
    Rayleigh-Ritz step. No host synchronisation.

    ``ops``: A's products when A is sharded (:class:`_Ops`; then ``A`` only gives n, dtype and
    device); the basis and C come out the same on every rank, as one process computes them.

    The sketch is drawn on the CPU from ``generator`` (the same numbers on every device and dtype)
    and copied with ``non_blocking=True`` (a blocking host-to-device copy waits for the device's queue)."""
    ops = ops or _Ops.dense(A)
    n = ops.n
    # float32 draws whatever A's dtype (randn in float64 draws other numbers): float32 runs follow float64 ones
    extra = torch.randn(n, oversample if start is not None else rank + oversample, generator=generator)
    extra = extra.to(A.device, A.dtype, non_blocking=True) if extra.device != A.device else extra.to(A.dtype)
    Q = extra if start is None else torch.cat([start, extra], 1)
    Q = torch.linalg.qr(Q).Q
    for _ in range(iters):
        Q = torch.linalg.qr(ops.back(ops.fwd(Q))).Q
    # float64: forming B^T B squares the condition number
    return Q, ops.gram(ops.fwd(Q).double())


class _Ops:
    """The products subspace iteration needs of a matrix A (m, n): ``fwd(Q)`` = A Q (maybe only this
    rank's rows of it), ``back(B)`` = A^T (A Q) from ``fwd``'s output (full, replicated) and
    ``gram(B)`` = (A Q)^T (A Q) (full, replicated)."""

    def __init__(self, n: int, fwd: Callable, back: Callable, gram: Callable) -> None:
        self.n, self.fwd, self.back, self.gram = n, fwd, back, gram

    @staticmethod
    def dense(A: torch.Tensor) -> _Ops:
        return _Ops(A.shape[1], lambda Q: A @ Q, lambda B: A.T @ B, lambda B: B.mT @ B)

    @staticmethod
    def row_sharded(G_loc: torch.Tensor, m: int, right: bool, mesh) -> _Ops:
        """For G (m, n) with rows split over ``mesh`` (G_loc: this rank's rows), A = G (``right``,
        the basis lives on the n side, replicated) or A = G^T (the basis lives on the m side, the
        smaller one; replicated (m, k), each rank multiplying its rows of it). Collectives: all-reduces
        of (n, k) and (k, k), and for A = G^T an all-gather of (m, k); no (m, n) matrix is formed."""
        if right:
            return _Ops(
                G_loc.shape[1],
                lambda Q: G_loc @ Q,  # this rank's rows of G Q
                lambda B: sharded.all_reduce_sum(G_loc.T @ B, mesh),
                lambda B: sharded.gram(B, mesh),
            )
        return _Ops(
            m,
            lambda Q: sharded.all_reduce_sum(G_loc.T @ sharded.shard_rows(Q, mesh).to_local(), mesh),
            lambda B: sharded.gather_rows(G_loc @ B, mesh, m),
            lambda B: B.mT @ B,
        )


def _top_subspace(
    G: torch.Tensor,
    rank: int,
    start: torch.Tensor | None,
    iters: int,
    oversample: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Approximate top-``rank`` right singular vectors of G (m, n) -> (n, rank), sign-fixed
    (:func:`~torchlowrank.linalg.sign_fixed`): subspace iteration, then Rayleigh-Ritz. No host synchronisation."""
    Q, C = _subspace_basis(G, rank, start, iters, oversample, generator)
    return sign_fixed(Q @ _top_eigenvectors(C, rank).to(Q.dtype))[0]


class GaLoreAdamW(Optimizer):
    """AdamW with GaLore gradient projection for the 2-D parameters.

    Args:
        params: parameters or param-group dicts (a group may set its own ``rank``; ``rank=None``
            turns projection off for the group).
        lr, betas, eps, weight_decay: as the package's AdamW (eps default 1e-6 there and here).
        rank: projection rank r.
        update_gap: steps between projector refreshes.
        scale: multiplies the back-projected direction.
        refresh: ``"warm"`` (subspace iteration, ``power_iters`` iterations) or ``"svd"`` (exact).

    State per projected parameter: ``step``, ``exp_avg`` and ``exp_avg_sq`` of the projected shape
    ((m, r) or (r, n)) and ``ortho`` (the projector: P (r, n) or Q (m, r)) — tensors only.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        rank: int = 128,
        update_gap: int = 200,
        scale: float = 0.25,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        refresh: str = "warm",
        power_iters: int = 2,
        oversample: int = 8,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be an int >= 1 or None, got {rank!r}")
        if isinstance(update_gap, bool) or not isinstance(update_gap, int) or update_gap < 1:
            raise ValueError(f"update_gap must be an int >= 1, got {update_gap!r}")
        if refresh not in ("warm", "svd"):
            raise ValueError(f"refresh must be 'warm' or 'svd', got {refresh!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if power_iters < 1:
            raise ValueError(f"power_iters must be >= 1, got {power_iters!r}")
        defaults = dict(
            lr=lr,
            rank=rank,
            update_gap=update_gap,
            scale=scale,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            refresh=refresh,
            power_iters=power_iters,
            oversample=oversample,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _projected(p: torch.Tensor, group: dict) -> bool:
        # conv kernels (out, in, kh, kw) are projected as (out, in*kh*kw) matrices (the package only takes 2-D)
        return (
            group["rank"] is not None
            and p.ndim >= 2
            and min(p.shape[0], math.prod(p.shape[1:])) > group["rank"]
        )

    @torch.no_grad()
    def _refresh_due(self) -> None:
        """Recompute every projector due at this step. ``"warm"``: subspace iteration per matrix, then
        the (k, k) Rayleigh-Ritz eigenproblems of all matrices with the same rank in one batch (a
        few dozen small QRs and products in all, not per matrix)."""
        pending: dict[tuple, list] = {}
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1  # counts every parameter, as the generator seed is part of the saved behaviour
                if p.grad is None or not self._projected(p, group):
                    continue
                state = self.state[p]
                step = state.get("step", 0)
                if "ortho" in state and step % group["update_gap"] != 0:
                    continue
                mesh = sharded.row_mesh(p.grad, "GaLoreAdamW")
                m, n = p.shape[0], math.prod(p.shape[1:])
                G = sharded.local(p.grad).reshape(-1, n)  # this rank's rows (all of them in one process)
                r = group["rank"]
                right = m >= n
                M = G.float() if G.dtype != torch.float64 else G
                if mesh is not None and group["refresh"] == "svd":
                    raise ValueError(
                        "GaLoreAdamW(refresh='svd') needs each full gradient on one rank; with parameters "
                        "sharded by fully_shard use refresh='warm' (its products are all-reduced, no full matrix)"
                    )
                if group["refresh"] == "svd":
                    U, _, Vh = torch.linalg.svd(M, full_matrices=False)  # checks its status: one host sync
                    ortho = sign_fixed(Vh[:r].T)[0].T if right else sign_fixed(U[:, :r])[0]
                    state["ortho"] = ortho.to(G.dtype).contiguous()
                    continue
                gen = torch.Generator().manual_seed(1000003 * index + step)
                A = M if right else M.T
                prev = state.get("ortho")
                if prev is not None and sharded.is_dtensor(prev):
                    prev = (
                        prev.to_local() if right else prev.full_tensor()
                    )  # (r, n) replicated; (m, r) gathered
                start = None if prev is None else (prev.T if right else prev).to(A.dtype)
                iters = group["power_iters"] if start is None else max(1, group["power_iters"] - 1)
                ops = None if mesh is None else _Ops.row_sharded(M, m, right, mesh)
                Q, C = _subspace_basis(A, r, start, iters, group["oversample"], gen, ops)
                pending.setdefault((r, C.shape[-1], C.device), []).append((state, right, G.dtype, Q, C, mesh))
        for (r, _, _), items in pending.items():
            W = _top_eigenvectors(torch.stack([item[4] for item in items]), r)
            for (state, right, dtype, Q, _, mesh), w in zip(items, W):
                P = sign_fixed(Q @ w.to(Q.dtype))[0]
                ortho = (P.T if right else P).to(dtype).contiguous()
                # sharded like the parameter: P (r, n) is small (replicated), Q (m, r) is split by rows
                state["ortho"] = sharded.replicated(ortho, mesh) if right else sharded.shard_rows(ortho, mesh)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refresh_due()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                project = self._projected(p, group)
                # under fully_shard the algebra runs on this rank's rows (local shards share storage
                # with the DTensors, so the in-place updates below update them)
                grad = sharded.local(p.grad)
                if project:
                    mesh = sharded.row_mesh(p.grad, "GaLoreAdamW")
                    n = math.prod(p.shape[1:])
                    grad = grad.reshape(-1, n)
                    right = p.shape[0] >= n
                    P = sharded.local(state["ortho"])  # (r, n) replicated, or this rank's rows of (m, r)
                    if right:
                        grad = grad @ P.T  # this rank's rows of R = G P^T (m, r)
                    else:
                        grad = P.T @ grad  # this rank's share of R = Q^T G (r, n): a sum over ranks
                        if mesh is not None:
                            grad = sharded.reduce_scatter_rows(grad, mesh).to_local()
                if "exp_avg" not in state:
                    if project and mesh is not None:
                        rows = p.shape[0] if right else group["rank"]
                        state["exp_avg"] = sharded.from_rows(torch.zeros_like(grad), mesh, rows)
                        state["exp_avg_sq"] = sharded.from_rows(torch.zeros_like(grad), mesh, rows)
                    else:
                        state["exp_avg"] = torch.zeros_like(p.grad if not project else grad)
                        state["exp_avg_sq"] = torch.zeros_like(p.grad if not project else grad)
                exp_avg, exp_avg_sq = sharded.local(state["exp_avg"]), sharded.local(state["exp_avg_sq"])
                state["step"] += 1
                t = state["step"]
                exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
                exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
                direction = exp_avg / denom
                p_local = sharded.local(p)
                if project:
                    if not right:
                        direction = sharded.gather_rows(direction, mesh, group["rank"])  # (r, n)
                    direction = ((direction @ P if right else P @ direction) * group["scale"]).view(
                        p_local.shape
                    )
                p_local.add_(direction, alpha=-step_size)
                if group["weight_decay"] > 0:
                    p_local.add_(p_local, alpha=-group["lr"] * group["weight_decay"])
        return loss

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors on this rank (exact count; a sharded state counts its local shard)."""
        return sum(
            sharded.local(v).numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if torch.is_tensor(v)
        )
