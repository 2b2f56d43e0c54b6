"""The reference for the 100,000 x 50,000 case of :mod:`bench_matrix_sparse` (issue 21): plain
sparse ALS at the *true* rank (20), from a spectral start, no rank or ridge search — the least work
any ALS-type completion of this matrix does. One line per sweep on stdout: sweep, thread CPU
seconds (the spectral start included), relative error on the fixed sample of 200,000 entries.

    PYTHONPATH=src python benchmarks/reference_als_large.py 100000,50000,20,5000000 2700

The second argument caps the CPU seconds. One thread.
"""

from __future__ import annotations

import sys

import bench_matrix_sparse as problem

from torchlowrank.reproducibility import one_thread

if __name__ == "__main__":
    m, n, r, n_obs = (int(x) for x in sys.argv[1].split(","))
    cap = float(sys.argv[2])
    with one_thread():
        rows, cols, vals, sample = problem._problem(m, n, r, n_obs)
        hit, sweeps, err = problem.plain_sparse_als(
            m,
            n,
            rows,
            cols,
            vals,
            r,
            sample,
            max_sweeps=10_000,
            spectral=True,
            max_seconds=cap,
            log=lambda k, t, e: print(k, round(t, 1), f"{e:.3e}", flush=True),
        )
    print("time to 1e-4:", hit, "sweeps:", sweeps, "error:", err)
