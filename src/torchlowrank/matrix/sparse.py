"""Observed-entry arithmetic for completion: everything here touches only the observed entries
(COO index lists), so memory is O(|Omega| + (m + n) q) and never O(m n).

- :class:`Entries`: the observed entries ``(rows, cols, values)`` of an (m, n) matrix, with CSR
  products ``P_Omega(R) @ F`` / ``P_Omega(R)^T @ F`` for a residual R given at the entries.
- :func:`row_grams`: the q x q Gram matrices ``sum_{j in Omega_i} f_j f_j^T`` of every row at once
  (a CSR product with the (n, q^2) matrix of outer products).
- :func:`ridge_rows`: the batched ridge solve of every row's q x q system (Cholesky, with a
  fallback to LU for a numerically singular row).
- :func:`sparse_top_svd`: a seeded randomized SVD of ``P_Omega(R)`` from CSR products.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["Entries", "row_grams", "ridge_rows", "sparse_top_svd", "entry_dots"]


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

    def matmul(self, r: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """``P_Omega(R) @ F`` (m, q) for R given at the entries as ``r`` (N,), F (n, q)."""
        return _blocked_product(self._csr(r.to(F.dtype), False), F)

    def rmatmul(self, r: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """``P_Omega(R)^T @ F`` (n, q) for F (m, q)."""
        return _blocked_product(self._csr(r.to(F.dtype), True), F)


PRODUCT_BLOCK = 128  # columns of F per sparse product


def _blocked_product(A: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """``A @ F`` for a sparse CSR ``A`` (m, n) and dense F (n, q), :data:`PRODUCT_BLOCK` columns of F
    at a time: on the CPU one product with a wide F (the q (q + 1) / 2 columns of :func:`row_grams`)
    runs several times slower per column than narrow ones (441 columns: 0.24 s at once, 0.06 s in
    blocks of 128, on 500k entries)."""
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


def row_grams(
    E: Entries, F: torch.Tensor, target: torch.Tensor | None = None, transpose: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For every row i of the pattern of ``E`` (of its transpose with ``transpose=True``):
    ``G_i = sum_{j in Omega_i} F_j F_j^T`` (q x q) and, with ``target`` (N,) given at the entries,
    ``h_i = sum_{j in Omega_i} target_ij F_j``. Both are sparse products, ``P_Omega(1) @ (F (x) F)``
    (the upper triangle of each outer product only) and ``P_Omega(target) @ F``: O(N q^2) work,
    O(m q^2 + n q^2) memory, no (N, q^2) temporary."""
    q = F.shape[1]
    iu, ju = torch.triu_indices(q, q, device=F.device)
    FF = F[:, iu] * F[:, ju]  # (n, q (q + 1) / 2): G is symmetric, so its upper triangle is enough
    ones = torch.ones(len(E), dtype=F.dtype, device=F.device)
    mul = E.rmatmul if transpose else E.matmul
    Gu = mul(ones, FF)
    G = torch.empty(Gu.shape[0], q, q, dtype=F.dtype, device=F.device)
    G[:, iu, ju] = Gu
    G[:, ju, iu] = Gu
    return G, None if target is None else mul(target, F)


def ridge_rows(G: torch.Tensor, h: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """Solve ``(G_i + diag(diag)) x_i = h_i`` for every row (G (m, q, q), h (m, q), diag (q,)).
    A row whose system is singular (no observations and a zero ridge) gets a tiny relative
    jitter, which keeps its solution at zero."""
    A = G.clone()
    A.diagonal(dim1=1, dim2=2).add_(diag)
    L, info = torch.linalg.cholesky_ex(A)
    x = torch.cholesky_solve(h.unsqueeze(-1), L).squeeze(-1)
    bad = info != 0
    if bool(bad.any()):  # one host sync per solve: rows that are not positive definite
        Ab = A[bad]
        Ab.diagonal(dim1=1, dim2=2).add_(
            1e-12 * Ab.diagonal(dim1=1, dim2=2).abs().amax(1, keepdim=True).clamp_min(1e-300)
        )
        x[bad] = torch.linalg.lstsq(Ab, h[bad].unsqueeze(-1)).solution.squeeze(-1)
    return x


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
