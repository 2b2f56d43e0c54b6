"""One ALS sweep (both half-sweeps: rows, then columns, each with its bias) on a large exactly
low-rank matrix: the library's ``ridge_solve_rows`` (a block of rows at a time, each block's Gram
matrices one batched GEMM of gathered, zero-padded factor rows) against the sweep the library ran
before 53b60a2 (whole-problem Gram matrices as one CSR product with the upper triangle of the
outer products, kept here as the baseline), in the same process.

    PYTHONPATH=src python benchmarks/als_sweep_large.py 100000,50000,20,5000000

Per sweep: wall seconds, user and kernel CPU seconds and minor page faults (``getrusage``), the
median over SWEEPS sweeps after one warm-up sweep (which builds the block index). One thread.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import bench_matrix_sparse as problem
import torch

from torchlowrank.matrix.sparse import Entries, ridge_solve_rows
from torchlowrank.reproducibility import one_thread

SWEEPS = 4
LAM = 1e-6


def csr_half(E: Entries, F: torch.Tensor, t: torch.Tensor, diag: torch.Tensor, transpose: bool):
    """The old half-sweep: all rows' Gram matrices at once, ``P_Omega(1) @ (F (x) F)`` (upper
    triangle), then a batched Cholesky solve."""
    q = F.shape[1]
    iu, ju = torch.triu_indices(q, q)
    FF = F[:, iu] * F[:, ju]
    mul = E.rmatmul if transpose else E.matmul
    Gu = mul(torch.ones(len(E), dtype=F.dtype), FF)
    G = torch.empty(Gu.shape[0], q, q, dtype=F.dtype)
    G[:, iu, ju] = Gu
    G[:, ju, iu] = Gu
    h = mul(t, F)
    A = G.clone()
    A.diagonal(dim1=1, dim2=2).add_(diag)
    L, _ = torch.linalg.cholesky_ex(A)
    return torch.cholesky_solve(h.unsqueeze(-1), L).squeeze(-1)


def sweep(E, U, V, b, c, how: str):
    k = U.shape[1]
    diag = torch.full((k + 1,), LAM, dtype=torch.float64)
    diag[k] = 0.0
    one = torch.ones
    if how == "blocked":
        x, _ = ridge_solve_rows(
            E, torch.cat([V, one(V.shape[0], 1, dtype=V.dtype)], 1), E.values, diag, offset=c
        )
        U, b = x[:, :k].contiguous(), x[:, k].contiguous()
        x, _ = ridge_solve_rows(
            E, torch.cat([U, one(U.shape[0], 1, dtype=U.dtype)], 1), E.values, diag, offset=b, transpose=True
        )
    else:
        x = csr_half(
            E, torch.cat([V, one(V.shape[0], 1, dtype=V.dtype)], 1), E.values - c[E.cols], diag, False
        )
        U, b = x[:, :k].contiguous(), x[:, k].contiguous()
        x = csr_half(
            E, torch.cat([U, one(U.shape[0], 1, dtype=U.dtype)], 1), E.values - b[E.rows], diag, True
        )
    return U, x[:, :k].contiguous(), b, x[:, k].contiguous()


def measure(E, how: str, seed: int = 0) -> dict:
    m, n = E.shape
    g = torch.Generator().manual_seed(seed)
    r = 20
    U, V = (
        torch.randn(m, r, generator=g, dtype=torch.float64),
        torch.randn(n, r, generator=g, dtype=torch.float64),
    )
    b, c = torch.zeros(m, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    rows = []
    for i in range(SWEEPS + 1):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        U, V, b, c = sweep(E, U, V, b, c, how)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        if i:
            rows.append(
                (t1 - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt)
            )
    return {key: statistics.median(v) for key, v in zip(("wall", "user", "kernel", "minflt"), zip(*rows))}


if __name__ == "__main__":
    m, n, r, n_obs = (
        int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "100000,50000,20,5000000").split(",")
    )
    with one_thread():
        rows, cols, vals, _ = problem._problem(m, n, r, n_obs)
        E = Entries(torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(vals), (m, n))
        out = {how: measure(E, how) for how in ("csr (before)", "blocked")}
    for how, d in out.items():
        print(
            f"{how}: wall {d['wall']:.2f} s, user {d['user']:.2f} s, kernel {d['kernel']:.2f} s, "
            f"minor faults {d['minflt']:.0f} per sweep"
        )
    print(f"wall ratio blocked / before: {out['blocked']['wall'] / out['csr (before)']['wall']:.2f}")
