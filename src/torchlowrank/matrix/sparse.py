"""Observed-entry arithmetic for completion: everything here touches only the observed entries
(COO index lists), so memory is O(|Omega| + (m + n) q) and never O(m n).

- :class:`Entries`: the observed entries ``(rows, cols, values)`` of an (m, n) matrix, with CSR
  products ``P_Omega(R) @ F`` / ``P_Omega(R)^T @ F`` for a residual R given at the entries.
- :func:`ridge_solve_rows`: ALS's half-sweep, a block of rows at a time, each block's Gram
  matrices one batched GEMM of its rows' gathered, zero-padded factor rows.
- :func:`sparse_top_svd`: a seeded randomized SVD of ``P_Omega(R)`` from CSR products.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

__all__ = ["Entries", "PaddedBlock", "ridge_solve_rows", "sparse_top_svd", "entry_dots"]


class PaddedBlock(NamedTuple):
    """A block of rows of an entry pattern, each row's entries padded to ``width``: ``rows`` (B,)
    the rows, ``ent`` (B * width,) each slot's entry (its index in the :class:`Entries`; N in a
    pad), ``idx`` (B * width,) each slot's column (n in a pad)."""

    rows: torch.Tensor
    width: int
    ent: torch.Tensor
    idx: torch.Tensor


class Entries:
    """Observed entries of an (m, n) matrix: ``rows``, ``cols`` (int64) and ``values`` (float) of
    equal length N, on one device. ``transpose()`` swaps the roles (same entries, (n, m))."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
        if not (rows.shape == cols.shape == values.shape and rows.ndim == 1):
            raise ValueError("rows, cols and values must be 1-D tensors of the same length")
        self.rows, self.cols, self.values = rows.long(), cols.long(), values
        self.shape = (int(shape[0]), int(shape[1]))
        self.device = values.device
        m, n = self.shape
        self.row_counts = torch.bincount(self.rows, minlength=m)
        self.col_counts = torch.bincount(self.cols, minlength=n)
        order = torch.argsort(self.rows * n + self.cols)  # row-major: the CSR order
        self._order = order
        self._crow = torch.zeros(m + 1, dtype=torch.int64, device=self.device)
        self._crow[1:] = self.row_counts.cumsum(0)
        self._col_sorted = self.cols[order]
        order_t = torch.argsort(self.cols * m + self.rows)
        self._order_t = order_t
        self._crow_t = torch.zeros(n + 1, dtype=torch.int64, device=self.device)
        self._crow_t[1:] = self.col_counts.cumsum(0)
        self._row_sorted = self.rows[order_t]

    def __len__(self) -> int:
        return int(self.rows.numel())

    def subset(self, keep: torch.Tensor) -> Entries:
        return Entries(self.rows[keep], self.cols[keep], self.values[keep], self.shape)

    def transpose(self) -> Entries:
        return Entries(self.cols, self.rows, self.values, (self.shape[1], self.shape[0]))

    def _csr(self, r: torch.Tensor, transpose: bool) -> torch.Tensor:
        m, n = self.shape
        with warnings.catch_warnings():  # "sparse CSR support is in beta" (locally, no global filter)
            warnings.simplefilter("ignore", UserWarning)
            if transpose:
                return torch.sparse_csr_tensor(
                    self._crow_t,
                    self._row_sorted,
                    r[self._order_t],
                    (n, m),
                    check_invariants=False,
                    device=r.device,
                )
            return torch.sparse_csr_tensor(
                self._crow, self._col_sorted, r[self._order], (m, n), check_invariants=False, device=r.device
            )

    def padded_blocks(self, max_rows: int, max_slots: int, transpose: bool = False) -> list[PaddedBlock]:
        """The rows of this matrix (of its transpose), sorted by their number of entries and cut
        into blocks of at most ``max_rows`` rows and ``max_slots`` = rows x the block's largest
        count: each block lists its rows' entries padded to that count (:class:`PaddedBlock`),
        so that a block's Gram matrices are one batched GEMM. Sorting keeps the padding small
        (1 % on a uniform random pattern). The slot indices are int32 where they fit. Computed
        once per size (one host sync) and cached: ~8 bytes a slot, both sides together."""
        key = (int(max_rows), int(max_slots), bool(transpose))
        cache = self.__dict__.setdefault("_padded", {})
        if key in cache:
            return cache[key]
        if transpose:
            counts, crow, other, order, n = (
                self.col_counts,
                self._crow_t,
                self._row_sorted,
                self._order_t,
                self.shape[0],
            )
        else:
            counts, crow, other, order, n = (
                self.row_counts,
                self._crow,
                self._col_sorted,
                self._order,
                self.shape[1],
            )
        N, m = len(self), counts.numel()
        index_dtype = torch.int32 if max(N, n) < 2**31 - 1 else torch.int64
        by_count = torch.argsort(counts, stable=True)
        sorted_counts = counts[by_count]
        host = sorted_counts.tolist()
        blocks = []
        s = 0
        while s < m:
            lo, hi = s + 1, min(m, s + key[0])  # the last row e - 1 of the block: the largest count
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if (mid - s) * host[mid - 1] <= key[1] else (lo, mid - 1)
            e, width = lo, host[lo - 1]
            rows = by_count[s:e]
            slot = torch.arange(width, device=self.device).expand(e - s, width)
            valid = slot < sorted_counts[s:e, None]
            at = (crow[rows][:, None] + slot).clamp_max(max(N - 1, 0))  # CSR positions (valid slots)
            ent = torch.where(valid, order[at], N).reshape(-1).to(index_dtype)
            idx = torch.where(valid, other[at], n).reshape(-1).to(index_dtype)
            blocks.append(PaddedBlock(rows, width, ent, idx))
            s = e
        cache[key] = blocks
        return blocks

    def matmul(self, r: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """``P_Omega(R) @ F`` (m, q) for R given at the entries as ``r`` (N,), F (n, q)."""
        return _blocked_product(self._csr(r.to(F.dtype), False), F)

    def rmatmul(self, r: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """``P_Omega(R)^T @ F`` (n, q) for F (m, q)."""
        return _blocked_product(self._csr(r.to(F.dtype), True), F)


PRODUCT_BLOCK = 128  # columns of F per sparse product


def _blocked_product(A: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """``A @ F`` for a sparse CSR ``A`` (m, n) and dense F (n, q), :data:`PRODUCT_BLOCK` columns of F
    at a time: on the CPU one product with a wide F (hundreds of columns)
    runs several times slower per column than narrow ones (441 columns: 0.24 s at once, 0.06 s in
    blocks of 128, on 500k entries; measured when ALS's Gram matrices were such a product)."""
    q = F.shape[1]
    if q <= PRODUCT_BLOCK:
        return A @ F
    out = torch.empty(A.shape[0], q, dtype=F.dtype, device=F.device)
    for s in range(0, q, PRODUCT_BLOCK):
        out[:, s : s + PRODUCT_BLOCK] = A @ F[:, s : s + PRODUCT_BLOCK].contiguous()
    return out


DENSE_CELLS_PER_ENTRY = 64  # entry_dots forms A B^T when it has at most this many cells per entry asked
DENSE_CELLS_MAX = 1 << 24  # ... and at most this many cells (128 MiB in float64)


def entry_dots(
    A: torch.Tensor, B: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, chunk: int = 1 << 16
) -> torch.Tensor:
    """``(A B^T)[rows, cols]`` for A (m, q), B (n, q) -> (N,). Gathering the rows of A and B for
    each entry is memory-bound (~13 ns per entry and column on this project's CPU: 0.16 s for
    MovieLens-100K at q = 105), while the GEMM ``A B^T`` runs near peak; so the product is formed
    when it is small against the entries asked for (at most :data:`DENSE_CELLS_PER_ENTRY` cells per
    entry, i.e. a density above ~1.6 %, and :data:`DENSE_CELLS_MAX` cells: memory stays O(N)), and
    otherwise the entries are gathered in chunks (no (N, q) temporary beyond ``chunk`` rows)."""
    N = rows.numel()
    m, n = A.shape[0], B.shape[0]
    if m * n <= min(DENSE_CELLS_PER_ENTRY * N, DENSE_CELLS_MAX):
        return (A @ B.T).view(-1)[rows * n + cols]
    out = torch.empty(N, dtype=A.dtype, device=A.device)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        out[s:e] = (A.index_select(0, rows[s:e]) * B.index_select(0, cols[s:e])).sum(1)
    return out


BLOCK_ROWS = 1 << 12  # rows per cached padded block (at most)
BLOCK_SLOTS = 1 << 16  # rows x width per cached padded block (at most)
GRAM_BLOCK_CELLS = 1 << 20  # rows x q^2 per solve of ridge_solve_rows (8 MiB in float64)
SLOT_BLOCK_CELLS = 1 << 21  # rows x width x q per solve: the gathered factor rows (16 MiB in float64)


def _padded(v: torch.Tensor) -> torch.Tensor:
    """``v`` with a zero row appended: what a pad slot of a :class:`PaddedBlock` reads."""
    return torch.cat([v, v.new_zeros((1,) + tuple(v.shape[1:]))])


def ridge_solve_rows(
    E: Entries,
    F: torch.Tensor,
    y: torch.Tensor,
    diag: torch.Tensor,
    *,
    offset: torch.Tensor | None = None,
    transpose: bool = False,
    jitter: float = 0.0,
    workspace: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row i of the pattern of ``E`` (of its transpose with ``transpose=True``), with
    ``t_ij = y_ij - offset_j`` (``y`` (N,) at the entries, ``offset`` (n,) or None: 0):

        x_i = argmin_x  sum_{j in Omega_i} (t_ij - F_j . x)^2 + sum_q d_iq x_q^2,

    F (n, q), ``d_i = diag`` (q,) >= 0 plus ``jitter`` times the row's largest diagonal entry.
    Returns x (m, q) and the sum over the rows of the squared residuals at x (0-d tensor, from the
    normal equations, ``t.t - x.h - x^T D x`` per row: it loses digits once below ~1e-8 of
    ``t.t``).

    A block of rows at a time (:meth:`Entries.padded_blocks`): the block's factor rows are
    gathered into a zero-padded (B, width, q) array X, and ``G = X^T X``, ``h = X^T t`` are two
    batched GEMMs, then a batched Cholesky solve. Against the Gram matrices as one CSR product
    with the (n, q (q + 1) / 2) outer products of F, they cost a third on the CPU (5 M entries,
    q = 21: 0.48 s vs 1.6 s a half-sweep), and no temporary scales with N or m q^2, so the
    allocator reuses its blocks (fresh pages for whole-problem temporaries cost more kernel time
    than the arithmetic there; a whole sweep: 2.0 s vs 10.7 s, benchmarks/als_sweep_large.py). ``workspace`` (a dict the caller keeps between calls with the same
    ``y``) keeps ``y`` padded. A diagonal entry of a row's system that is exactly zero (no
    observations and no ridge on that coordinate) is set to 1, so that coordinate of x is 0; a
    row whose system is still not positive definite is solved by least squares (one host sync
    per call)."""
    q = F.shape[1]
    dt, dev = F.dtype, F.device
    if workspace is not None and workspace.get("y") is y:
        y_pad = workspace["y_pad"]
    else:
        y_pad = _padded(y.to(dt))
        if workspace is not None:
            workspace.update(y=y, y_pad=y_pad)
    F_pad = _padded(F)
    off_pad = None if offset is None else _padded(offset.to(dt))
    m = E.shape[1] if transpose else E.shape[0]
    x = torch.empty(m, q, dtype=dt, device=dev)
    diag = diag.to(dt)
    chunks = []  # the cached blocks (the same for every q), cut to this q's memory bounds
    for blk in E.padded_blocks(BLOCK_ROWS, BLOCK_SLOTS, transpose):
        w, B = blk.width, blk.rows.numel()
        step = max(1, min(GRAM_BLOCK_CELLS // (q * q), SLOT_BLOCK_CELLS // max(q * w, 1)))
        for a in range(0, B, step):
            b = min(a + step, B)
            chunks.append(PaddedBlock(blk.rows[a:b], w, blk.ent[a * w : b * w], blk.idx[a * w : b * w]))

    def system(blk: PaddedBlock):
        B = blk.rows.numel()
        X = F_pad.index_select(0, blk.idx).view(B, blk.width, q)
        t = y_pad.index_select(0, blk.ent)
        if off_pad is not None:
            t = t - off_pad.index_select(0, blk.idx)
        A = X.mT @ X
        h = (X.mT @ t.view(B, blk.width, 1)).squeeze(-1)
        d = A.diagonal(dim1=1, dim2=2)
        added = diag.expand_as(d).clone()
        if jitter:
            added += jitter * (d + diag).amax(1, keepdim=True).clamp_min(1e-300)
        added += (d + added == 0).to(dt)
        d += added
        return A, h, t, added

    def residual(t, xb, h, added):  # the block's sum of squared residuals, from its normal equations
        return t.dot(t) - (xb * h).sum() - (xb * xb * added).sum()

    infos, sses = [], []
    for blk in chunks:
        A, h, t, added = system(blk)
        L, info = torch.linalg.cholesky_ex(A)
        xb = torch.cholesky_solve(h.unsqueeze(-1), L).squeeze(-1)
        x[blk.rows] = xb
        sses.append(residual(t, xb, h, added))
        infos.append(info)
    if infos and bool(torch.cat(infos).any()):  # the one host sync: rows not positive definite
        for i, (blk, info) in enumerate(zip(chunks, infos)):
            bad = info != 0
            if not bool(bad.any()):
                continue
            A, h, t, added = system(blk)
            Ab = A[bad]
            Ab.diagonal(dim1=1, dim2=2).add_(
                1e-12 * Ab.diagonal(dim1=1, dim2=2).abs().amax(1, keepdim=True).clamp_min(1e-300)
            )
            xb = x[blk.rows]
            xb[bad] = torch.linalg.lstsq(Ab, h[bad].unsqueeze(-1)).solution.squeeze(-1)
            x[blk.rows] = xb
            sses[i] = residual(t, xb, h, added)
    sse = torch.stack(sses).sum() if sses else torch.zeros((), dtype=dt, device=dev)
    return x, sse


def sparse_top_svd(
    E: Entries,
    r: torch.Tensor,
    k: int,
    *,
    generator: torch.Generator | None = None,
    oversample: int = 8,
    power_iters: int = 4,
    dtype: torch.dtype = torch.float64,
):
    """Top-``k`` SVD ``U (m, k), S (k,), V (n, k)`` of the sparse matrix ``P_Omega(R)`` (R given at
    the entries as ``r``): randomized range finder with ``power_iters`` power iterations, its
    Gaussian test matrix drawn from ``generator`` (on the CPU, then moved: results do not depend
    on the device's RNG, and the global RNG is untouched)."""
    m, n = E.shape
    q = min(k + oversample, m, n)
    Om = torch.randn(n, q, generator=generator, dtype=dtype, device="cpu").to(E.device)
    Q = torch.linalg.qr(E.matmul(r, Om))[0]
    for _ in range(power_iters):
        Z = torch.linalg.qr(E.rmatmul(r, Q))[0]
        Q = torch.linalg.qr(E.matmul(r, Z))[0]
    B = E.rmatmul(r, Q).T  # (q, n) = Q^T P_Omega(R)
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return (Q @ Ub)[:, :k], S[:k], Vh[:k].T
