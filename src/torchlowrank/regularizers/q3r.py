"""Q3R: the quadratic reweighted rank regularizer (DESIGN §4.6).

For a weight matrix W (m, n) with singular values s_i, the smoothed log-det rank surrogate is

    F_eps(W) = sum_i f_eps(s_i),  f_eps(s) = eps^2 log(s / eps) + eps^2 / 2   (s >= eps)
                                              s^2 / 2                         (s <  eps).

Every ``period`` steps Q3R takes the top singular triplets of the current weight W0 (no autograd,
float32), lowers eps <- min(eps, s_{r+1}(W0)) (eps starts at +inf; r = target rank) and weights the
directions with s > eps. This defines the weight operator

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

GPU layout (DESIGN §7): the state of every matrix has a fixed size -- K *slots* (U (m, K), V (n, K),
s (K,), eps a 0-d tensor) with weights ``c = where(s > eps, eps / s - 1, 0)`` -- so that no decision in
a step depends on a value read back from the device; the one synchronisation left is the error check
of the batched small SVD on a reweighting step (see :class:`Q3R`). Same-shape matrices are
reweighted and regularized together as one batch. Per step the cost is ~4 K m n multiply-adds per matrix; the
reweighting is amortised over ``period`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as tlr_dist
from .. import sharded
from ..linalg import compute_dtype, hashed_sketch, sign_fixed
from ..targets import Targets
from ._base import MatrixRegularizer, Split

__all__ = ["Q3R", "q3r_operator", "smoothed_logdet", "q3r_reweight"]


def smoothed_logdet(s: torch.Tensor, eps: float) -> torch.Tensor:
    """F_eps = sum_i f_eps(s_i) for singular values s (k,); eps = +inf gives sum s_i^2 / 2."""
    eps = float(eps)
    if math.isinf(eps):
        return (s * s).sum() / 2
    big = s >= eps
    safe = torch.where(big, s, torch.ones_like(s) * max(eps, 1e-300))
    return torch.where(big, eps**2 * torch.log(safe / eps) + eps**2 / 2, s * s / 2).sum()


def q3r_operator(
    X: torch.Tensor, U: torch.Tensor, V: torch.Tensor, c: torch.Tensor, *, mesh=None
) -> torch.Tensor:
    """R(X) = (I + U diag(c) U^T) X (I + V diag(c) V^T).

    X: (..., m, n), U: (..., m, k), V: (..., n, k), c: (..., k) = eps / s - 1 on the kept directions and
    0 on the others (a zero weight is the identity there). Cost 4 k m n (two passes of 2 k m n).
    ``mesh``: X's and U's rows are split over it (FSDP2; X, U are this rank's rows, V replicated):
    the result is this rank's rows of R(X), at the cost of one all-reduce of U^T X (..., k, n).
    """
    if c.shape[-1] == 0:
        return X.clone()
    if X.ndim == 3:  # a batch of same-shape blocks: two fused multiply-adds
        A = torch.baddbmm(X, U, c[:, :, None] * sharded.all_reduce_sum(U.mT @ X, mesh))
        return torch.baddbmm(A, (A @ V) * c[:, None, :], V.mT)
    A = X + U @ (c[..., :, None] * sharded.all_reduce_sum(U.mT @ X, mesh))
    return A + ((A @ V) * c[..., None, :]) @ V.mT


def _weights(s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """c = eps / s - 1 where s > eps, else 0. s: (..., K), eps: (...). No NaN for s = 0 or eps = +inf."""
    e = eps[..., None]
    return torch.where(s > e, e / torch.where(s > e, s, torch.ones_like(s)) - 1.0, torch.zeros_like(s))


def _small_svd(mats: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """SVD of every (B_i, L_i, L_i) batch in ``mats`` as ONE batched ``torch.linalg.svd`` call (per dtype
    and device): each batch is zero-padded to the largest L (a zero border adds zero singular values
    after the real ones and leaves the real triplets' vectors zero in the border), then cut back.

    This is the one host synchronisation of a reweighting: ``torch.linalg.svd`` checks LAPACK /
    cuSOLVER's status on the host. Returns (Ub (B, L, L), s (B, L), Vb (B, L, L)) with M = Ub diag(s) Vb^T.
    """
    out: list = [None] * len(mats)
    by_key: dict[tuple, list[int]] = {}
    for i, M in enumerate(mats):
        by_key.setdefault((M.dtype, M.device), []).append(i)
    for idx in by_key.values():
        Lmax = max(mats[i].shape[-1] for i in idx)
        stacked = torch.cat(
            [
                nn.functional.pad(mats[i], (0, Lmax - mats[i].shape[-1], 0, Lmax - mats[i].shape[-1]))
                for i in idx
            ]
        )
        try:
            Ub, s, Vh = torch.linalg.svd(stacked)
        except RuntimeError:  # LAPACK did not converge (rare): once more in float64
            Ub, s, Vh = (t.to(stacked.dtype) for t in torch.linalg.svd(stacked.double()))
        start = 0
        for i in idx:
            B, L = mats[i].shape[0], mats[i].shape[-1]
            out[i] = (
                Ub[start : start + B, :L, :L],
                s[start : start + B, :L],
                Vh[start : start + B, :L, :L].mT,
            )
            start += B
    return out


def _range_finder(
    W: torch.Tensor, omega: torch.Tensor, n_iter: int, mesh=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized range finder (Halko, Martinsson & Tropp 2011) on a batch, rescaled after every product.

    W: (B, m, n), omega: (B, n, L) with L <= min(m, n). Returns Q (B, m, L), Qz (B, n, L) orthonormal
    and T (B, L, L) with Q^T W = T Qz^T, so the SVD T = Ub diag(s) Vb^T gives W's approximate top
    triplets U = Q Ub, V = Qz Vb. The power iterations rescale with a shifted Cholesky QR, the two
    final bases are Householder QRs; neither checks errors (no host sync).

    ``mesh``: W's rows are split over it (FSDP2; W is this rank's rows (B, m_loc, n)); then Q is this
    rank's rows too, Qz and T are replicated, and every product over the rows is all-reduced
    ((B, L, L) Grams, (B, n, L) products) -- no full W is formed. Q is then a TSQR basis: another
    basis of the same span, so the triplets are the same.
    """
    Y = W @ omega
    for _ in range(n_iter):
        Y = W @ _rescaled_basis(sharded.all_reduce_sum(W.mT @ _rescaled_basis(Y, mesh), mesh))
    Q = sharded.qr_rows(Y, mesh)
    Qz, Rz = torch.linalg.qr(sharded.all_reduce_sum(W.mT @ Q, mesh))  # W^T Q = Qz Rz  ->  Q^T W = Rz^T Qz^T
    return Q, Qz, Rz.mT


def _rescaled_basis(Y: torch.Tensor, mesh=None) -> torch.Tensor:
    """A basis of Y's column span (B, p, L) with columns of comparable scale, from a shifted Cholesky
    QR: Y R^{-1} with R^T R = Y^T Y + shift I, shift = L u trace(Y^T Y) (u: the dtype's epsilon). R is
    invertible, so the span is Y's exactly; only orthonormality is approximate, which the power
    iterations do not need (on decaying spectra the top singular values come out as accurate as with
    a Householder QR). One batched Gram product, ``cholesky_ex`` and ``solve_triangular``: no error
    check, no host sync, and no per-matrix solver calls. Where the Cholesky factorisation fails
    anyway, the columns are just normalised. ``mesh``: Y's rows are split over it (the Gram all-reduced)."""
    G = sharded.gram(Y, mesh)
    L = G.shape[-1]
    finfo = torch.finfo(Y.dtype)
    shift = L * finfo.eps * G.diagonal(dim1=-2, dim2=-1).sum(-1) + finfo.tiny**0.5
    R, info = torch.linalg.cholesky_ex(
        G + shift[:, None, None] * torch.eye(L, dtype=G.dtype, device=G.device), upper=True
    )
    Q = torch.linalg.solve_triangular(R, Y, upper=True, left=False)
    norm = Y.norm(dim=-2, keepdim=True) if mesh is None else G.diagonal(dim1=-2, dim2=-1).sqrt()[..., None, :]
    scaled = Y / (norm + finfo.tiny)
    return torch.where((info == 0)[:, None, None], Q, scaled)


def _uses_full(method: str, m: int, n: int, L: int) -> bool:
    # "auto": the randomized range finder pays off when the sketch is a small part of the matrix
    return method == "full" or (method == "auto" and not (min(m, n) >= 256 and 4 * L <= min(m, n)))


def _top_triplets(
    W: torch.Tensor, L: int, full: bool, n_iter: int, omega: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-L triplets of a batch W (B, m, n): U (B, m, L), s (B, L) descending, V (B, n, L), sign-fixed.
    ``full``: one batched thin SVD (a host sync); else the range finder with sketch omega (B, n, L)."""
    if full:
        try:
            U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        except RuntimeError:
            U, s, Vh = (t.to(W.dtype) for t in torch.linalg.svd(W.double(), full_matrices=False))
        U, s, V = U[..., :L], s[..., :L], Vh.mT[..., :L]
    else:
        Q, Qz, T = _range_finder(W, omega, n_iter)
        ((Ub, s, Vb),) = _small_svd([T])
        U, V = Q @ Ub, Qz @ Vb
    U, V = sign_fixed(U, V)
    return U, s, V


def q3r_reweight(
    W: torch.Tensor,
    rank: int,
    eps: float,
    *,
    method: str = "randomized",
    k_start: int = 0,
    oversample: int = 8,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One reweighting of one matrix, with the kept set exactly {s > eps'}: (U (m, k), s (k,), V (n, k),
    eps') with eps' = min(eps, s_{rank+1}(W)).

    W: (m, n) float32/float64, no autograd. The top ``k`` triplets are computed from a sketch of
    ``k + oversample`` columns (``method="randomized"``; ``"full"``: a thin SVD; ``"auto"``: randomized
    when the sketch is at most a quarter of a matrix with min(m, n) >= 256), starting at
    ``max(rank + 1, k_start)`` and doubling while the smallest computed s is still above eps' (so no
    direction with s > eps' is missed). This stand-alone form reads values back to decide (it
    synchronises a GPU); :class:`Q3R` does the same reweighting batched with a fixed number of slots.
    ``rank >= min(m, n)``: nothing is kept and eps stays as it is (+inf: R = identity, weight decay).
    ``s_{rank+1} = 0`` leaves eps unchanged too.
    """
    m, n = W.shape
    full = min(m, n)
    eps = float(eps)
    if rank >= full:
        return W.new_zeros(m, 0), W.new_zeros(0), W.new_zeros(n, 0), eps
    k = min(full, max(rank + 1, k_start))
    with torch.no_grad():
        while True:
            L = min(full, k + oversample)
            use_full = _uses_full(method, m, n, L)
            omega = (
                None
                if use_full
                else torch.randn(n, L, generator=generator, device=W.device, dtype=W.dtype)[None]
            )
            U, S, V = (t[0, ..., :k] for t in _top_triplets(W.detach()[None], L, use_full, n_iter, omega))
            sr = float(S[rank])
            # a zero s_{r+1} (rank <= r, e.g. an update W - W0 at its start) carries no scale: keep eps
            new_eps = min(eps, sr) if sr > 0 else eps
            if float(S[-1]) <= new_eps or k == full:
                break
            k = min(full, 2 * k)
    keep = S > new_eps
    return U[:, keep], S[keep], V[:, keep], new_eps


@dataclass
class _Group:
    """Same-shape, same-dtype, same-device blocks, reweighted and regularized as one batch.

    K slots per block (fixed between growths, see :meth:`Q3R.reweight`); U (B, m, K), V (B, n, K),
    s (B, K), eps (B,), c (B, K) = where(s > eps, eps / s - 1, 0); ranks (B,) the index r of s_{r+1};
    active (B,) False for blocks with rank >= min(m, n) (eps stays +inf, R = identity); skipped (B,)
    True where the last reweighting met a non-finite weight and kept the previous operator."""

    idx: list[int]
    shape: tuple[int, int]
    full: bool  # thin SVD of the whole matrix instead of the range finder
    K: int
    ranks: torch.Tensor
    active: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    s: torch.Tensor
    eps: torch.Tensor
    c: torch.Tensor
    skipped: torch.Tensor

    def padded(self, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, V, s) zero-padded to K >= self.K slots (zero slots have weight 0: the identity)."""
        extra = K - self.K
        pad = nn.functional.pad
        return pad(self.U, (0, extra)), pad(self.V, (0, extra)), pad(self.s, (0, extra))


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
    schedulers apply; a tensor lr is used as a tensor) or given as ``reg.step(lr=...)``. With plain SGD
    both modes give the same iterates. Users who prefer autograd add ``reg.value()`` to the loss and
    call ``reg.advance()`` once per step instead of ``reg.step()``.

    Host synchronisation (DESIGN §7): with the default ``method="randomized"`` and no
    ``shard_reweighting``, a step reads nothing back from the device, except that a reweighting step
    makes **one** batched ``torch.linalg.svd`` call for all the regularized matrices together (the
    SVDs of their small (K, K) projections, K below; one call per compute dtype and device), whose
    LAPACK / cuSOLVER status check synchronises; the other steps make none. ``method="full"`` makes one more batched SVD (of the
    whole matrices) per group of same-shape matrices.

    Kept directions: every matrix has K = min(min(m, n), target_rank + 1 + oversample) *slots*
    (``method="full"``, or ``"auto"`` choosing it: K = min(m, n)) for its top singular triplets, and a
    slot is weighted (c = eps / s - 1) when its s > eps, else it is the identity. If training lifts
    more than K singular values above eps, the ones beyond the K-th are weighted like s <= eps (the
    penalty is then that of plain weight decay on them, stronger than the surrogate's) until
    ``reweight(sync=True)`` -- the one place where K grows, doubling while the smallest slot's s is
    still above eps. ``saturated()`` lists the matrices for which this happened; calling
    ``reg.reweight(sync=True)`` now and then (e.g. once per epoch, or at checkpoints) keeps the kept
    set exact, for a few host syncs outside the training step.

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
        method: ``"randomized"`` (default: a batched randomized range finder with ``oversample`` extra
            slots and ``n_iter`` power iterations, QR after every product), ``"full"`` (a batched thin
            SVD of the whole matrices; every direction has a slot) or ``"auto"`` (randomized when the
            sketch is at most a quarter of a matrix with min(m, n) >= 256).
        update: regularize the update ``W - W0`` instead of ``W`` (W0: the weights when the regularizer is
            built), e.g. to make a full fine-tuning's update low-rank so that it can be exported as a
            rank-r LoRA adapter. W0 is kept (compute dtype) and saved in :meth:`state_dict`.
        seed: seeds the randomized sketches (a function of the seed, step and block, so a resumed
            run draws the same sketches).
        shard_reweighting: under ``torch.distributed`` (DDP), split the reweighting over the processes
            (block i on process i % world_size) and broadcast the results: two all-reduces (the eps's
            and the non-finite flags) and one broadcast per block (U, V, s) on reweighting steps; this
            synchronises. The result is the same as unsharded (the same sketches). False (default):
            every process reweights every block from its identical weights, with no collective.
            No effect without a process group.

    FSDP2 (weights sharded by rows by ``fully_shard``; build the regularizer after sharding): every
    rank keeps its rows of U, V and s replicated, and the result equals one process's. The reweighting's
    range finder multiplies the local rows and all-reduces the (B, n, L) products and (B, L, L) Grams,
    its final basis is a TSQR (all-gathered (L, L) factors), the small SVD runs on every rank, the
    sign fix takes each column's largest entry over the ranks; the per-step term R(W) is computed on
    the local rows with one all-reduce of U^T W (B, K, n) per group, and added to the local gradient.
    Not supported there (``ValueError``): ``method="full"`` (or ``"auto"`` choosing it),
    ``shard_reweighting``, ``split`` slices, ``value()`` and ``surrogate()``.

    A weight holding NaN/Inf at a reweighting inside ``step()`` keeps that matrix's previous operator
    (and eps) -- nothing is read back to raise -- and is listed by ``skipped()``;
    ``reweight(sync=True)`` raises ``ValueError`` naming the layer instead, changing nothing.
    """

    def __init__(
        self,
        model_or_modules: nn.Module | Any,
        target_rank: int | float,
        lam: float,
        period: int = 5,
        targets: Targets = None,
        *,
        exclude: Targets = None,
        decoupled: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        split: Split = None,
        rank_overrides: Mapping[str, int | float] | None = None,
        method: str = "randomized",
        oversample: int = 8,
        n_iter: int = 2,
        update: bool = False,
        seed: int = 0,
        shard_reweighting: bool = False,
    ) -> None:
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        if method not in ("randomized", "full", "auto"):
            raise ValueError(f"method must be 'randomized', 'full' or 'auto', got {method!r}")
        if target_rank is None:
            raise ValueError("target_rank is required: an int >= 1 or a fraction in (0, 1] of min(m, n)")
        if not isinstance(shard_reweighting, bool):
            raise ValueError(f"shard_reweighting must be True or False, got {shard_reweighting!r}")
        for what, v, low in (("oversample", oversample, 0), ("n_iter", n_iter, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{what} must be an int >= {low}, got {v!r}")
        self.shard_reweighting = shard_reweighting
        super().__init__(
            model_or_modules,
            lam,
            targets,
            exclude=exclude,
            split=split,
            target_rank=target_rank,
            rank_overrides=rank_overrides,
            decoupled=decoupled,
            optimizer=optimizer,
        )
        self._mesh = self._row_mesh(shard_reweighting)
        self.period = period
        self.method, self.oversample, self.n_iter, self.seed = method, oversample, n_iter, int(seed)
        self.steps = 0
        self._reweighted_at = -1
        self.update = bool(update)
        if self.update:
            for b in self.blocks:
                b.state["anchor"] = self._matrix(b).to(compute_dtype(b.param.dtype)).clone()
        by_key: dict[tuple, list[int]] = {}
        for i, b in enumerate(self.blocks):
            by_key.setdefault((b.shape, compute_dtype(b.param.dtype), b.param.device), []).append(i)
        self._groups: list[_Group] = []
        for (shape, dtype, device), idx in by_key.items():
            full_rank = min(shape)
            ranks = [self.blocks[i].rank for i in idx]
            active = [r < full_rank for r in ranks]
            K = min(full_rank, max((r for r, a in zip(ranks, active) if a), default=-1) + 1 + oversample)
            use_full = _uses_full(method, *shape, K)
            K = 0 if not any(active) else full_rank if use_full else K
            z = dict(dtype=dtype, device=device)
            B, (m, n) = len(idx), shape
            if self._mesh is not None:
                if use_full and K:
                    raise ValueError(
                        f"Q3R(method={method!r}) takes a thin SVD of whole {m}x{n} matrices; with weights "
                        "sharded by fully_shard use method='randomized' (its products are all-reduced)"
                    )
                m = sharded.local(self.blocks[idx[0]].param).shape[0]  # U holds this rank's rows
            self._groups.append(
                _Group(
                    idx,
                    shape,
                    use_full,
                    K,
                    torch.tensor([min(r, max(K - 1, 0)) for r in ranks], device=device),
                    torch.tensor(active, device=device),
                    torch.zeros(B, m, K, **z),
                    torch.zeros(B, n, K, **z),
                    torch.zeros(B, K, **z),
                    torch.full((B,), math.inf, **z),
                    torch.zeros(B, K, **z),
                    torch.zeros(B, dtype=torch.bool, device=device),
                )
            )
            self._expose(self._groups[-1])

    def _expose(self, g: _Group) -> None:
        """Per-block views of the group's state (``block.state["U"]`` etc.)."""
        for j, i in enumerate(g.idx):
            self.blocks[i].state.update(U=g.U[j], V=g.V[j], s=g.s[j], eps=g.eps[j], c=g.c[j])

    def _row_mesh(self, shard_reweighting: bool):
        """The mesh the weights' rows are split over (FSDP2), or None; ValueError for what the
        sharded algebra does not cover."""
        meshes = [sharded.row_mesh(b.param, f"Q3R on {b.name!r}") for b in self.blocks]
        if all(mesh is None for mesh in meshes):
            return None
        if any(mesh is None or mesh != meshes[0] for mesh in meshes):
            raise ValueError(
                "Q3R: some regularized weights are sharded by fully_shard and others are not (or on "
                "another mesh); shard every regularized layer over one mesh, or none"
            )
        if shard_reweighting:
            raise ValueError(
                "Q3R(shard_reweighting=True) splits the reweighting of whole matrices over DDP processes; "
                "under fully_shard each rank already works on its rows: leave it False"
            )
        for b in self.blocks:
            if b.start != 0 or b.stop != (b.param.shape[-1] if b.split_dim else b.param.shape[0]):
                raise ValueError(
                    f"Q3R: split slices ({b.name!r}) of a weight sharded by fully_shard are not supported "
                    "(a slice's rows do not follow the shards); regularize the whole matrix or do not shard it"
                )
        return meshes[0]

    def _matrix(self, b) -> torch.Tensor:
        """Block ``b``'s matrix (detached): this rank's rows of it under fully_shard."""
        return b.matrix(sharded.local(b.param.detach()))

    def _check_unsharded(self, what: str) -> None:
        if self._mesh is not None:
            raise ValueError(
                f"Q3R.{what}() needs whole weights; with weights sharded by fully_shard use reg.step() "
                "(the regularizer's gradient is added to the sharded .grad)"
            )

    # -- the algorithm ---------------------------------------------------------------------------------
    def _current(self, b, W: torch.Tensor) -> torch.Tensor:
        """The regularized matrix of block ``b`` given its weight matrix W: W, or W - W0 (``update=True``)."""
        W = W.to(compute_dtype(W.dtype))
        return W - b.state["anchor"] if self.update else W

    def _due(self) -> bool:
        return self.steps % self.period == 0 and self._reweighted_at != self.steps

    def _sketch(self, i: int, n: int, K: int, like: torch.Tensor) -> torch.Tensor:
        # the same numbers on every device and in every dtype: a float32 GPU run follows float64 on the CPU
        return hashed_sketch(
            n, K, (self.seed * 1_000_003 + self.steps * 7919 + i) % (2**61), like.device, like.dtype
        )

    @torch.no_grad()
    def reweight(self, sync: bool = False) -> None:
        """Recompute U, V, s and eps of every block from the current weights (float32, no autograd).

        ``sync=False`` (what :meth:`step` does): fixed slots, one host sync in all (the batched small
        SVD, see the class docstring); a block whose weight holds NaN/Inf keeps its previous operator.
        ``sync=True`` (call it outside the training step): first raises ``ValueError`` naming the layer
        (and changes nothing) if a weight holds NaN/Inf; then, per group of same-shape matrices,
        doubles the number of slots K (up to min(m, n)) and redoes that group while some block's
        smallest slot still has s > eps, so that every direction with s > eps is weighted. K stays
        grown for the later reweightings.
        """
        mats = [self._current(b, self._matrix(b)) for b in self.blocks]
        if sync:
            bad = torch.stack([~torch.isfinite(W).all() for W in mats]).int()
            bad = (sharded.all_reduce_sum(bad, self._mesh) > 0).tolist()
            if any(bad):
                name = self.blocks[bad.index(True)].name
                raise ValueError(
                    f"weight of {name!r} contains NaN/Inf at step {self.steps}: training diverged "
                    "(lower the learning rate or lam); the regularizer was left unchanged"
                )
        world, me = tlr_dist.world_size(), tlr_dist.rank()
        shard = self.shard_reweighting and world > 1
        groups = self._slotted()
        Ks = {id(g): g.K for g in groups}
        with torch.autocast(device_type=mats[0].device.type, enabled=False):
            new = self._compute(groups, Ks, mats, shard, world, me)
            while sync:
                grow = [
                    g
                    for g in groups
                    if Ks[id(g)] < min(g.shape)
                    and bool((g.active & (new[id(g)][2][:, -1] > new[id(g)][3])).any())
                ]
                if not grow:
                    break
                for g in grow:
                    Ks[id(g)] = min(min(g.shape), 2 * Ks[id(g)])
                new.update(self._compute(grow, Ks, mats, shard, world, me))
        for g in groups:  # commit only once everything is computed
            g.U, g.V, g.s, g.eps, g.skipped = new[id(g)]
            g.c, g.K = _weights(g.s, g.eps), Ks[id(g)]
            self._expose(g)
        self._reweighted_at = self.steps

    def _slotted(self) -> list[_Group]:
        return [g for g in self._groups if g.K > 0]

    def _compute(
        self,
        groups: list[_Group],
        Ks: dict[int, int],
        mats: list[torch.Tensor],
        shard: bool,
        world: int,
        me: int,
    ) -> dict[int, tuple]:
        """New (U, V, s, eps, skipped) of every group in ``groups`` (K = Ks[id(group)]), nothing committed."""
        pending, done = [], {}
        for g in groups:
            K = Ks[id(g)]
            own = [j for j, i in enumerate(g.idx) if not shard or i % world == me]
            if not own:
                done[id(g)] = (g, own, None)
                continue
            W = torch.stack([mats[g.idx[j]] for j in own])
            finite = torch.isfinite(W).flatten(1).all(1)
            if self._mesh is not None:  # a non-finite row on any rank
                finite = sharded.all_reduce_sum((~finite).int(), self._mesh) == 0
            W = torch.where(finite[:, None, None], W, 0.0)
            if g.full:
                done[id(g)] = (g, own, (*_top_triplets(W, K, True, 0, None), finite))
            else:
                omega = torch.stack([self._sketch(g.idx[j], g.shape[1], K, W) for j in own])
                pending.append((g, own, finite, *_range_finder(W, omega, self.n_iter, self._mesh)))
        for (g, own, finite, Q, Qz, _), (Ub, s, Vb) in zip(pending, _small_svd([p[-1] for p in pending])):
            U, V = sharded.sign_fixed_rows(Q @ Ub, self._mesh, Qz @ Vb)
            done[id(g)] = (g, own, (U, s, V, finite))
        out = {}
        for key, (g, own, res) in done.items():
            K = Ks[key]
            U0, V0, s0 = g.padded(K)
            if res is None:  # another process reweights every block of this group
                out[key] = (U0, V0, s0, g.eps, g.skipped)
                continue
            U, s, V, finite = res
            whole = len(own) == len(g.idx)
            if whole:  # no indexing: a device index built from a Python list would be a host-to-device copy
                ranks, eps0, active = g.ranks, g.eps, g.active
            else:
                sel = torch.tensor(own, device=U.device)
                ranks, eps0, active, U0, V0, s0 = (t[sel] for t in (g.ranks, g.eps, g.active, U0, V0, s0))
            sr = torch.gather(s, 1, ranks.clamp_max(K - 1)[:, None])[:, 0]
            # a zero s_{r+1} (rank <= r, e.g. an update W - W0 at its start) carries no scale: keep eps
            eps = torch.where(active & (sr > 0), torch.minimum(eps0, sr), eps0)
            keep = finite[:, None, None]  # a non-finite weight keeps its previous operator
            new = (
                torch.where(keep, U, U0),
                torch.where(keep, V, V0),
                torch.where(keep[:, 0], s, s0),
                torch.where(finite, eps, eps0),
                ~finite,
            )
            if whole:
                out[key] = new
                continue
            full = [t.clone() for t in (*g.padded(K), g.eps, g.skipped)]
            for t, part in zip(full, new):
                t[sel] = part
            out[key] = tuple(full)
        if shard and groups:
            out = self._share_reweighting(groups, out, world)
        return out

    def _share_reweighting(
        self, groups: list[_Group], part: dict[int, tuple], world: int
    ) -> dict[int, tuple]:
        """Give every process every block's (U, V, s, eps); block i was computed by process i % world.
        Two all-reduces (the eps's and the non-finite flags, every block's entry non-zero on its owner
        only), then one broadcast per block of its packed [U; V; s^T] (m + n + 1, K) from its owner."""
        me = tlr_dist.rank()
        dev = part[id(groups[0])][0].device
        order = [(g, j, i) for g in groups for j, i in enumerate(g.idx)]
        eps = torch.stack(
            [
                part[id(g)][3][j]
                if i % world == me
                else torch.zeros((), device=dev, dtype=part[id(g)][3].dtype)
                for g, j, i in order
            ]
        ).double()
        skipped = torch.stack(
            [
                part[id(g)][4][j] if i % world == me else torch.zeros((), dtype=torch.bool, device=dev)
                for g, j, i in order
            ]
        ).to(torch.int64)
        dist.all_reduce(eps, op=dist.ReduceOp.SUM)  # (eps > 0, or +inf: inf + 0 = inf)
        dist.all_reduce(skipped, op=dist.ReduceOp.SUM)
        out = {}
        pos = 0
        for g in groups:
            U, V, s = part[id(g)][:3]
            m, n = g.shape
            Us, Vs, ss = [], [], []
            for j, i in enumerate(g.idx):
                packed = torch.cat([U[j], V[j], s[j][None]]).contiguous()
                if packed.shape[-1]:
                    dist.broadcast(packed, src=i % world)
                Us.append(packed[:m])
                Vs.append(packed[m : m + n])
                ss.append(packed[m + n])
            e = eps[pos : pos + len(g.idx)].to(s.dtype)
            sk = skipped[pos : pos + len(g.idx)] > 0
            pos += len(g.idx)
            s_all = torch.stack(ss)
            out[id(g)] = (torch.stack(Us), torch.stack(Vs), s_all, e, sk)
        return out

    gradient_factor = 2.0  # d/dW lam <W, R(W)> = 2 lam R(W); _gradients returns R(W)

    def _gradients(self) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(self.blocks)
        for g in self._groups:
            W = torch.stack([self._current(self.blocks[i], self._matrix(self.blocks[i])) for i in g.idx])
            R = q3r_operator(W, g.U, g.V, g.c, mesh=self._mesh) if g.K else W
            for j, i in enumerate(g.idx):
                out[i] = R[j]
        return out

    def step(self, lr: float | torch.Tensor | None = None) -> None:
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
        self._check_unsharded("value")
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
        self._check_unsharded("surrogate")
        total = torch.zeros((), dtype=torch.float64)
        for b in self.blocks:
            s = torch.linalg.svdvals(self._current(b, b.matrix(b.param.detach())).double().cpu())
            total += smoothed_logdet(s, float(b.state["eps"]))
        return total

    # -- introspection (these read values back from the device) ------------------------------------------
    @property
    def eps(self) -> dict[str, float]:
        """Current eps of every block (+inf before the first reweighting)."""
        return {b.name: float(b.state["eps"]) for b in self.blocks}

    @property
    def ranks(self) -> dict[str, int]:
        """Target rank of every block."""
        return {b.name: b.rank for b in self.blocks}

    def kept(self) -> dict[str, int]:
        """Number of singular directions weighted by the operator (slots with s > eps) per block."""
        return {b.name: int((b.state["s"] > b.state["eps"]).sum()) for b in self.blocks}

    def slots(self) -> dict[str, int]:
        """Number K of slots (computed singular triplets) per block."""
        return {self.blocks[i].name: g.K for g in self._groups for i in g.idx}

    def saturated(self) -> list[str]:
        """Blocks whose smallest slot has s > eps at the last reweighting: more directions than slots may
        be above eps; ``reweight(sync=True)`` grows their slots."""
        return [
            self.blocks[i].name
            for g in self._slotted()
            if g.K < min(g.shape)
            for i, sat in zip(g.idx, (g.active & (g.s[:, -1] > g.eps)).tolist())
            if sat
        ]

    def skipped(self) -> list[str]:
        """Blocks whose weight held NaN/Inf at the last reweighting (their previous operator was kept)."""
        return [self.blocks[i].name for g in self._groups for i, bad in zip(g.idx, g.skipped.tolist()) if bad]

    # -- checkpointing -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only: step count, and per block name, rank, eps, U, V, s (every slot).
        Under fully_shard, U (and the anchor) are DTensors sharded by rows like the weight."""
        rows = lambda b, t: sharded.from_rows(t.clone(), self._mesh, b.shape[0])  # noqa: E731
        return {
            "steps": self.steps,
            "reweighted_at": self._reweighted_at,
            "period": self.period,
            "lam": self.lam,
            "blocks": [
                {
                    "name": b.name,
                    "rank": b.rank,
                    "eps": float(b.state["eps"]),
                    "U": rows(b, b.state["U"]),
                    "V": b.state["V"].clone(),
                    "s": b.state["s"].clone(),
                    **({"anchor": rows(b, b.state["anchor"])} if self.update else {}),
                }
                for b in self.blocks
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; a resumed run continues exactly like an uninterrupted one.

        Also reads checkpoints that kept only the directions with s > eps (padded with identity slots).
        Raises ``ValueError`` (changing nothing) if the blocks (names, ranks, shapes) differ. Under
        fully_shard, U and the anchor may be whole tensors or DTensors (e.g. loaded by DCP)."""
        blocks = state.get("blocks") if isinstance(state, Mapping) else None
        if not isinstance(blocks, list) or len(blocks) != len(self.blocks):
            raise ValueError(
                f"state has {None if blocks is None else len(blocks)} blocks, this Q3R has "
                f"{len(self.blocks)}: build the regularizer with the same model, targets and split"
            )
        for b, sb in zip(self.blocks, blocks):
            m, n = b.shape
            k = sb["s"].numel()
            if (
                sb["name"] != b.name
                or sb["rank"] != b.rank
                or tuple(sb["U"].shape) != (m, k)  # (a DTensor's shape is the whole one)
                or tuple(sb["V"].shape) != (n, k)
                or k > min(m, n)
                or ("anchor" in sb) != self.update
            ):
                raise ValueError(
                    f"state block {sb['name']!r} (rank {sb['rank']}, U {tuple(sb['U'].shape)}) does not "
                    f"match {b.name!r} (rank {b.rank}, shape {(m, n)})"
                )
        blocks = [
            {k: self._local_rows(v) if k in ("U", "anchor") else v for k, v in sb.items()} for sb in blocks
        ]
        for g in self._groups:
            dtype, dev = g.U.dtype, g.U.device
            K = max([g.K] + [blocks[i]["s"].numel() for i in g.idx])
            pad = nn.functional.pad
            g.U = torch.stack(
                [pad(blocks[i]["U"].to(dev, dtype), (0, K - blocks[i]["s"].numel())) for i in g.idx]
            )
            g.V = torch.stack(
                [pad(blocks[i]["V"].to(dev, dtype), (0, K - blocks[i]["s"].numel())) for i in g.idx]
            )
            g.s = torch.stack(
                [pad(blocks[i]["s"].to(dev, dtype), (0, K - blocks[i]["s"].numel())) for i in g.idx]
            )
            g.eps = torch.tensor([float(blocks[i]["eps"]) for i in g.idx], dtype=dtype, device=dev)
            g.c, g.K = _weights(g.s, g.eps), K
            g.skipped = torch.zeros_like(g.skipped)
            self._expose(g)
        if self.update:
            for b, sb in zip(self.blocks, blocks):
                b.state["anchor"] = sb["anchor"].to(b.state["anchor"].device).clone()
        self.steps = int(state["steps"])
        self._reweighted_at = int(state["reweighted_at"])

    def _local_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole tensor or a DTensor sharded by rows; ``t`` itself unsharded."""
        if sharded.is_dtensor(t):
            return (
                sharded.shard_rows(t.full_tensor(), self._mesh).to_local() if self._mesh else t.full_tensor()
            )
        return sharded.shard_rows(t, self._mesh).to_local() if self._mesh is not None else t

    def __repr__(self) -> str:
        return (
            f"Q3R({len(self.blocks)} matrices, lam={self.lam}, period={self.period}, "
            f"decoupled={self.decoupled}, steps={self.steps})"
        )
