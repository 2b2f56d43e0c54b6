"""Sparse completion at scale (issue 21): ``complete()`` against a plain sparse ALS written here
(SciPy CSR products and NumPy batched Cholesky solves; the true rank given, ridge 1e-10 x s_1, no
biases, no selection), on exactly low-rank matrices ``U V^T`` (Gaussian factors, float64, entries
observed uniformly at random, seed 0).

Measured, per problem, in the same run:

- plain ALS: time until the relative error on a fixed sample of 200,000 entries of the whole
  matrix (observed or not) is <= 1e-4 (evaluated after every sweep, outside the clock);
- ``complete(S)`` with its defaults (the network below 2^26 cells, the sparse route above; both
  screen for exactly low-rank data first and stop at the relative train residual tol = 1e-9),
  ``complete(S, sparse=True)`` (mean model + ridge ALS with rank / ridge chosen on held-out
  entries) and ``complete(S, tol=1e-4)`` (the accuracy the plain ALS is timed to):
  the wall time of the whole call (setup, selection and refit included) and the error it reached on
  the same sample — "time to 1e-4" is that wall time when the error is <= 1e-4;
- the 100,000 x 50,000 matrix with 5 M observed entries at rank 20 (full run only; ``complete(S)``
  and ``complete(S, rank=20)``, no time limit): wall time, the error reached and
  the peak resident memory of a fresh process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) that
  builds the sparse input and runs ``complete()`` on it.

One CPU thread (``torchlowrank.reproducibility.one_thread``), a shared machine: single runs, not
medians (each is minutes long), timed by the thread's CPU time (``timing.clock``: what another
process on the machine takes is not counted); the ratio column is against the plain ALS of the
same run. The large case reports wall time (a fresh process of its own).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import torch
from timing import clock

SAMPLE = 200_000


def _problem(m: int, n: int, r: int, n_obs: int, seed: int = 0):
    g = np.random.default_rng(seed)
    U = g.standard_normal((m, r))
    V = g.standard_normal((n, r))
    idx = np.unique(g.integers(0, m * n, size=n_obs))
    rows, cols = idx // n, idx % n
    vals = np.einsum("ij,ij->i", U[rows], V[cols])
    sr, sc = g.integers(0, m, size=SAMPLE), g.integers(0, n, size=SAMPLE)
    sv = np.einsum("ij,ij->i", U[sr], V[sc])
    return rows, cols, vals, (sr, sc, sv)


def _rel(pred: np.ndarray, sv: np.ndarray) -> float:
    return float(np.linalg.norm(pred - sv) / np.linalg.norm(sv))


def plain_sparse_als(
    m,
    n,
    rows,
    cols,
    vals,
    r,
    sample,
    target=1e-4,
    max_sweeps=500,
    seed=1,
    spectral=False,
    max_seconds=None,
    log=None,
):
    """Plain ALS: min sum_Omega (U_i . V_j - M_ij)^2 + lam (||U||^2 + ||V||^2), lam = 1e-10 s_1,
    from a random start (``spectral``: from the top-r SVD of the observations, ``V_s sqrt(s / p)``,
    its time counted); per half-sweep the r x r Gram matrices of all rows at once as a CSR
    product with the (n, r^2) outer products, then batched Cholesky solves. Stops at ``target`` on
    the sample, ``max_sweeps`` or ``max_seconds``; ``log(sweep, seconds, error)`` after each sweep.
    Returns (seconds to ``target`` on the sample or None, sweeps, final sample error)."""
    import scipy.sparse as sp

    A = sp.csr_matrix((vals, (rows, cols)), shape=(m, n))
    At = A.T.tocsr()
    P = A.copy()
    P.data[:] = 1.0
    Pt = P.T.tocsr()
    g = np.random.default_rng(seed)
    now = clock()
    t0 = now()
    if spectral:
        _, s, Vt = sp.linalg.svds(A, k=r, random_state=seed)
        V = Vt.T * np.sqrt(s / (len(vals) / (m * n)))
    else:
        V = g.standard_normal((n, r)) * np.sqrt(np.abs(vals).mean() / r)
    lam = 1e-10 * float(sp.linalg.svds(A, k=1, return_singular_vectors=False, random_state=seed)[0])
    sr, sc, sv = sample
    spent, t_hit, err = 0.0, None, float("nan")

    def solve(Pm, Am, F):
        FF = (F[:, :, None] * F[:, None, :]).reshape(F.shape[0], r * r)
        G = np.asarray(Pm @ FF).reshape(-1, r, r) + lam * np.eye(r)
        h = np.asarray(Am @ F)
        L = np.linalg.cholesky(G)
        y = np.linalg.solve(L, h[:, :, None])
        return np.linalg.solve(np.transpose(L, (0, 2, 1)), y)[:, :, 0]

    spent = now() - t0 if spectral else 0.0
    sweep = 0
    while sweep < max_sweeps and (max_seconds is None or spent < max_seconds):
        sweep += 1
        t0 = now()
        U = solve(P, A, V)
        V = solve(Pt, At, U)
        spent += now() - t0
        err = _rel(np.einsum("ij,ij->i", U[sr], V[sc]), sv)
        if log is not None:
            log(sweep, spent, err)
        if err <= target:
            t_hit = spent
            break
    return t_hit, sweep, err


def _complete_case(m, n, r, n_obs, sparse, time_limit=None, **options):
    """complete() on the problem, in this process: (seconds, sample error, status, selected, rank)."""
    import warnings

    from torchlowrank.matrix import complete

    rows, cols, vals, (sr, sc, sv) = _problem(m, n, r, n_obs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        S = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(vals), (m, n)
        ).coalesce()
        now = clock() if time_limit is None else time.perf_counter
        t0 = now()
        res = complete(S, sparse=sparse, time_limit=time_limit, **options)
        wall = now() - t0
    pred = res.predict(torch.from_numpy(sr), torch.from_numpy(sc)).numpy()
    return wall, _rel(pred, sv), res.status, res.history.selected, res.rank


def _child(spec: str, options: str = "{}") -> None:
    """Entry point of the fresh process for the large case (``options``: complete()'s keyword
    arguments as JSON, e.g. ``{"rank": 20}``): prints one JSON line."""
    import resource

    from torchlowrank.reproducibility import one_thread

    m, n, r, n_obs = (int(x) for x in spec.split(","))
    kw = {"time_limit": None, **json.loads(options)}
    with one_thread():
        wall, err, status, selected, rank = _complete_case(m, n, r, n_obs, None, kw.pop("time_limit"), **kw)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    print(
        json.dumps(
            {"wall": wall, "err": err, "status": status, "selected": selected, "rank": rank, "peak_gib": peak}
        )
    )


def run(quick: bool = False, large: bool = True):
    from torchlowrank.reproducibility import one_thread

    with one_thread():
        return _run(quick, large)


def _run(quick: bool, large: bool = True):
    from torchlowrank.reproducibility import environment_info
    from torchlowrank.results import Result, Table

    t_start = time.perf_counter()
    exact = [(2000, 1500, 10, 150_000)] + ([] if quick else [(5000, 5000, 20, 500_000)])
    rows_out, metrics = [], {}
    for m, n, r, n_obs in exact:
        rows, cols, vals, sample = _problem(m, n, r, n_obs)
        t_plain, sweeps, e_plain = plain_sparse_als(m, n, rows, cols, vals, r, sample)
        name = f"{m} x {n}, rank {r}, {n_obs / (m * n):.0%} observed"
        rows_out.append([name, f"plain sparse ALS (true rank, {sweeps} sweeps)", t_plain, e_plain, "-", 1.0])
        for sparse, label, options in (
            (None, "complete() defaults", {}),
            (True, "complete(sparse=True)", {}),
            (None, "complete(tol=1e-4)", {"tol": 1e-4}),  # the accuracy the plain ALS is timed to
        ):
            wall, err, status, selected, rank = _complete_case(m, n, r, n_obs, sparse, **options)
            hit = wall if err <= 1e-4 else None
            ratio = None if hit is None or t_plain is None else hit / t_plain
            rows_out.append([name, label, hit, err, f"{status}, {selected}, rank {rank}", ratio])
            metrics[f"time_to_1e-4[{name}][{label}]"] = hit
            metrics[f"ratio[{name}][{label}]"] = ratio
    if large and not quick:
        spec = "100000,50000,20,5000000"
        for key, options, label in (
            ("large", "{}", "complete()"),
            ("large_rank20", '{"rank": 20}', "complete(rank=20)"),
        ):
            out = subprocess.run(
                [sys.executable, __file__, "--child", spec, options],
                capture_output=True,
                text=True,
                check=True,
            )
            d = json.loads(out.stdout.strip().splitlines()[-1])
            rows_out.append(
                [
                    "100,000 x 50,000, rank 20, 5 M observed",
                    f"{label} (sparse route, wall time; peak RSS {d['peak_gib']:.2f} GiB)",
                    d["wall"],
                    d["err"],
                    f"{d['status']}, {d['selected']}, rank {d['rank']}",
                    None,
                ]
            )
            metrics[f"{key}_wall_s"], metrics[f"{key}_peak_gib"], metrics[f"{key}_err"] = (
                d["wall"],
                d["peak_gib"],
                d["err"],
            )
    table = Table(
        "Exactly low-rank completion: time to relative error 1e-4 (s; None: not reached), error reached, ratio to plain sparse ALS",
        ["problem", "method", "time (s)", "relative error (sample)", "status", "ratio"],
        rows_out,
    )
    return Result(
        "matrix_sparse",
        {"quick": quick},
        [0],
        metrics,
        {},
        [table],
        [],
        "Command: `PYTHONPATH=src python benchmarks/run.py` (this module: bench_matrix_sparse). "
        "Single runs on one thread of a shared 2-core machine.",
        time.perf_counter() - t_start,
        environment_info(),
    )


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
    else:
        res = run(quick="--quick" in sys.argv, large="--no-large" not in sys.argv)
        for t in res.tables:
            print(t.title)
            for row in t.rows:
                print(row)
