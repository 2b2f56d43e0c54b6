"""The tensor algebra of one geometric step (DESIGN §4.5), batched over same-shape layers.

Every function takes a stack of ``b`` layers of one shape and returns stacks; none reads a tensor
value into Python, so a step on a GPU queues its kernels without waiting for the device (DESIGN
§7). The only dense decompositions are a batched Cholesky of r x r Gram matrices
(``cholesky_ex``: no error check, no synchronisation) and, for the rank-r truncation, one batched
SVD: of the r x r Rayleigh-Ritz matrix after a warm-started subspace iteration on the 2r x 2r core
(GPU), or of the whole core where that is cheaper (CPU, small cores; :func:`top_triplets`).

Shapes: U (b, m, r), V (b, n, r) orthonormal; s (b, r); A = G V (b, m, r), B = G^T U (b, n, r).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..linalg import sign_fixed

#: Sums a product of row blocks over the processes holding the other rows (FSDP: an all-reduce);
#: None: the rows are all here.
RowSum = Callable[[torch.Tensor], torch.Tensor] | None

__all__ = [
    "complement_basis",
    "complement_basis_pair",
    "galerkin_core",
    "top_subspace",
    "top_triplets",
    "subspace_iterations",
    "tail_ranks",
]

# Shift of the shifted Cholesky QR, relative to eps * ||K||_F^2: it caps the condition number the
# first pass sees at ~1 / sqrt(SHIFT * eps), so the second pass gets a basis it can orthonormalise.
_SHIFT = 30.0


def _inverse_cholesky(G: torch.Tensor, shift: torch.Tensor | float = 0.0) -> torch.Tensor:
    """L^{-1} for the lower Cholesky factor L of G + shift I (G: (b, k, k) symmetric PSD): the
    inverse of a small factor, so that X L^{-T} is a GEMM (a tall triangular solve is several
    times slower)."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    shift = torch.as_tensor(shift, dtype=G.dtype, device=G.device).reshape(-1, 1, 1)
    L = torch.linalg.cholesky_ex(G + shift * eye).L
    return torch.linalg.solve_triangular(L, eye.expand_as(G), upper=False)


def complement_basis(
    U: torch.Tensor, A: torch.Tensor, C: torch.Tensor, row_sum: RowSum = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """New orthonormal directions U1 (b, m, r), orthogonal to U, with span([U, U1]) containing
    span(A), as U1 = Q1 T - U E: returns Q1 (b, m, r), T (b, r, r), E (b, r, r), R = U1^T A
    (b, r, r) and keep (b, r): 1 for a direction of U1, 0 for a dropped one. ``C``: U^T A.

    K = A - U C is orthonormalised by shifted Cholesky QR, twice (CholeskyQR2), the second pass
    also re-orthogonalising against U ("twice is enough"): Q1 = K L1^{-T} is formed, the second
    pass is not: the new basis is U1 = (Q1 - U F) T with F = U^T Q1 (the rounding of K amplified
    by the solve) and T = L2^{-T} from the small Gram matrix Q1^T Q1 - F^T F. Callers combine
    U X + U1 Y = U (X - E Y) + Q1 (T Y) with E = F T: no extra pass over the tall matrices.
    Directions of K below ~sqrt(SHIFT * eps) ||K||_F (none on a generic gradient; all of them when
    span(A) lies inside span(U); the r - (m - r) beyond a full basis when m < 2r) cannot be
    orthonormalised stably: they get a zero column in U1 and a zero row in R, i.e. the augmented
    basis simply has fewer directions.

    ``row_sum``: for U, A holding only some rows (FSDP shards, see ``sharded_factors``), the
    all-reduce of a product of row blocks; the sums over rows (K^T K, whose diagonal gives the column
    norms, and Q1^T [Q1, K, U]) go through it, two collectives, and the r x r algebra after them is
    the same on every process.
    """
    eps = torch.finfo(A.dtype).eps
    K = A - U @ C
    KtK = K.mT @ K if row_sum is None else row_sum(K.mT @ K)  # sharded: one all-reduce
    # Columns in order of decreasing norm (a pivoting decided on the device): a weak column that is
    # only a rounding-level copy of a stronger one must come after it, or the Gram-Schmidt order
    # would drop both as dependent on each other. The permutation Pi is applied to the small
    # matrices only: K Pi L^{-T} = K (Pi L^{-T}), so the tall K is never copied.
    order = torch.argsort(torch.diagonal(KtK, dim1=-2, dim2=-1), dim=-1, descending=True)  # (b, r)
    KtK = KtK.gather(-1, order[:, None, :].expand_as(KtK)).gather(-2, order[:, :, None].expand_as(KtK))
    trace = torch.diagonal(KtK, dim1=-2, dim2=-1).sum(-1)
    Linv_t = _inverse_cholesky(KtK, _SHIFT * eps * trace + torch.finfo(A.dtype).tiny).mT
    Q1 = K @ torch.empty_like(Linv_t).scatter_(-2, order[:, :, None].expand_as(Linv_t), Linv_t)
    r = K.shape[-1]
    if row_sum is None:  # separate GEMMs: on a CPU a concatenated operand costs more than a launch
        QtQ, QtK = Q1.mT @ Q1, Q1.mT @ K
        F = U.mT @ Q1  # what of Q1 still lies in span(U): rounding of K, amplified by the solve
    else:  # the three products in one GEMM and one all-reduce
        G1KU = row_sum(Q1.mT @ torch.cat([Q1, K, U], -1))
        QtQ, QtK, F = G1KU[..., :r], G1KU[..., r : 2 * r], G1KU[..., 2 * r :].mT
    QtK = QtK.gather(-1, order[:, None, :].expand_as(QtK))  # K's columns in the pivoted order
    # second pass on Q1 - U F (Gram QtQ - F^T F, from small matrices): orthonormal and orthogonal to U
    G1 = QtQ - F.mT @ F
    # Rank detection: the pivots of the Gram's Cholesky are the norms^2 of what each direction adds
    # to the previous ones (~1 for a direction of K, ~0 for one below the shift or inside span(U)).
    # Those under 1/2 are dropped, and the kept ones orthonormalised without them: pivots of a
    # subset only grow, so the kept factor is well conditioned and the basis orthonormal to rounding.
    pivots = (
        torch.diagonal(
            torch.linalg.cholesky_ex(G1 + _SHIFT * eps * torch.eye(r, dtype=G1.dtype, device=G1.device)).L,
            dim1=-2,
            dim2=-1,
        )
        ** 2
    )
    keep = (pivots > 0.5).to(A.dtype)  # (b, r)
    G1 = G1 * keep[:, :, None] * keep[:, None, :] + torch.diag_embed(1.0 - keep)
    T = keep[:, :, None] * _inverse_cholesky(G1).mT * keep[:, None, :]  # L2^{-T}, dropped directions zeroed
    # U1^T K = U1^T A: a GEMM product, accurate to rounding (U^T K is rounding). It is upper
    # triangular in the pivoted order (direction j of U1 is orthogonal to the first j columns): the
    # entries below the diagonal are exact zeros holding rounding noise, which an element-wise Adam
    # would normalise into O(lr) steps (float32 and float64 then part ways), so they are set to zero.
    R = torch.triu(T.mT @ QtK)  # the columns of K in the pivoted order
    R = torch.empty_like(R).scatter_(-1, order[:, None, :].expand_as(R), R)  # back to A's columns
    return Q1, T, F @ T, R, keep


def complement_basis_pair(
    U: torch.Tensor, A: torch.Tensor, V: torch.Tensor, B: torch.Tensor, C: torch.Tensor, row_sum: RowSum
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """:func:`complement_basis` of both sides, (U, A, C) and (V, B, C^T), as one stack of 2b: the
    row blocks zero-padded to one height (zero rows add exact zeros to every sum over rows), so the
    two sides share their collectives under ``row_sum``. Returns the two 5-tuples, U1's Q1
    (b, m, r) and V1's (b, n, r) cut back to their own rows."""
    b, m, n = U.shape[0], U.shape[1], V.shape[1]
    h = max(m, n)

    def pad(X: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(X, (0, 0, 0, h - X.shape[1]))

    Q1, T, E, R, keep = complement_basis(
        torch.cat([pad(U), pad(V)]), torch.cat([pad(A), pad(B)]), torch.cat([C, C.mT]), row_sum
    )
    return (Q1[:b, :m], T[:b], E[:b], R[:b], keep[:b]), (Q1[b:, :n], T[b:], E[b:], R[b:], keep[b:])


def galerkin_core(C: torch.Tensor, RU: torch.Tensor | None, RV: torch.Tensor | None) -> torch.Tensor:
    """The tangent-space gradient in the augmented basis [U, U1] x [V, V1]:
    G^ = [[U^T G V, U^T G V1], [U1^T G V, 0]] = [[C, RV^T], [RU, 0]] (b, 2r, 2r); without the
    new directions (a Galerkin step in the current basis) just C (b, r, r)."""
    if RU is None:
        return C
    top = torch.cat([C, RV.mT], -1)
    bottom = torch.cat([RU, torch.zeros_like(C)], -1)
    return torch.cat([top, bottom], -2)


def _orth(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(X).Q


def _cholesky_orth(X: torch.Tensor) -> torch.Tensor:
    """X (b, p, k) with nearly orthonormal columns spanning span(X): shifted Cholesky QR, one pass
    (enough inside an iteration; the last basis is orthonormalised by Householder QR)."""
    G = X.mT @ X
    shift = (
        30 * torch.finfo(X.dtype).eps * torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)
        + torch.finfo(X.dtype).tiny
    )
    return X @ _inverse_cholesky(G, shift).mT


def subspace_iterations(dtype: torch.dtype) -> int:
    """Iterations of :func:`top_subspace`: the error of the kept subspace shrinks by
    (d_{r+1} / d_r)^2 per iteration, and a step as large as the smallest kept singular value has a
    ratio near 1/2: 24 iterations reach float64 rounding there; in float32 4 iterations leave
    <1 % of the discarded singular value as extra truncation error in that worst case (none at
    ordinary step sizes)."""
    return 24 if dtype == torch.float64 else 4


def top_subspace(
    S: torch.Tensor, r: int, iters: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of the stepped cores S (b, p, q), p, q >= r: P (b, p, r), d (b, r)
    descending, Q (b, q, r), sign-fixed.

    A subspace iteration warm-started from the first r coordinates (the basis kept at the previous
    step, which the step moves by O(lr)), then Rayleigh-Ritz: the SVD of the r x r projection
    X^T S Y gives the singular values and rotates the bases. Small batched GEMMs and QRs plus one
    batched r x r SVD, instead of the SVD of the whole (p, q) core. ``iters``: default
    :func:`subspace_iterations` of the dtype.
    """
    b, p, q = S.shape
    if p == r and q == r:  # a Galerkin step in the current basis: nothing to iterate
        Pm, d, Qh = torch.linalg.svd(S)
        P, Q = sign_fixed(Pm, Qh.mT)
        return P, d, Q
    X = torch.eye(p, r, dtype=S.dtype, device=S.device).expand(b, p, r)
    for _ in range(subspace_iterations(S.dtype) if iters is None else iters):
        X = _cholesky_orth(S @ _cholesky_orth(S.mT @ X))
    X = _orth(X)
    Y = _orth(S.mT @ X)
    Pm, d, Qh = torch.linalg.svd(X.mT @ S @ Y)
    P, Q = sign_fixed(X @ Pm, Y @ Qh.mT)
    return P, d, Q


def top_triplets(S: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of the stepped cores S (b, p, q): P (b, p, r), d (b, r) descending,
    Q (b, q, r), sign-fixed.

    The batched SVD of the whole core where it is cheap: on a CPU (LAPACK; measured faster there
    than the iteration, ``benchmarks/bench_optim.py``) and for cores of at most 32 x 32 on any
    device (cuSOLVER's batched Jacobi SVD); otherwise :func:`top_subspace` (GEMMs and QRs instead
    of a per-matrix SVD solver). Either way one small decomposition per batch. The SVD is exact
    also where the warm start of the iteration is poor: a core without a gap at r, such as the
    first steps of an adapter started at S = 0."""
    if S.device.type != "cpu" and max(S.shape[-2:]) > 32:
        return top_subspace(S, r)
    Pm, d, Qh = torch.linalg.svd(S)
    P, Q = sign_fixed(Pm[..., :r], Qh.mT[..., :r])
    return P, d[..., :r], Q


def tail_ranks(d: torch.Tensor, tau: float, lo: int, hi: torch.Tensor | int) -> torch.Tensor:
    """Per layer the smallest k with ||d[k:]|| <= tau ||d||, clamped to [lo, hi]: (b,) int64.
    d: (b, k) descending singular values of the stepped cores."""
    sq = d.double() ** 2
    tail = torch.flip(torch.cumsum(torch.flip(sq, [-1]), -1), [-1]).sqrt()  # tail[:, k] = ||d[k:]||
    ok = tail <= tau * tail[:, :1]
    k = torch.where(
        ok.any(-1), ok.to(torch.int64).argmax(-1), torch.full_like(ok[:, 0], d.shape[-1], dtype=torch.int64)
    )
    return k.clamp(min=lo).clamp(max=hi)
