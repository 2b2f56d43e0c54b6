"""Soft-impute with factored iterates against the textbook soft-impute with dense SVDs (issue 21,
"sparse all the way"), on the real cases of ``real-completion``: the same lam path, warm starts,
stopping rule and validation split for both, so they choose on the same terms.

- dense SVDs (the baseline, written here as the library had it before): every step forms the
  (m, n) matrix ``P_Omega(M) + P_Omega^perp(Z)`` and soft-thresholds its top-``max_rank`` SVD;
- ``soft_impute_path`` (the library): ``Z = U diag(d) V^T`` kept factored, one warm-started block
  power step a step from CSR products over the observed entries.

Per case: CPU time of the path (one thread, ``timing.clock``; single runs: the dense path on
MovieLens is minutes long), the lam chosen, the held-out RMSE at it and the test RMSE (the case's
own test entries), and the ratio of the times.
"""

from __future__ import annotations

import math
import time

import torch
from timing import clock

LAM_FRACTIONS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)  # x ||P_Omega(M)||_2
MAX_RANK, MAX_ITERS, TOL = 100, 100, 1e-5  # soft_impute_path's defaults


def dense_svd_path(M, mask, validation, lams):
    """The baseline: warm-started path with dense SVDs, the stopping rule of ``soft_impute_path``.
    Returns (Z at the best lam (m, n), best lam)."""
    from torchlowrank.matrix import svt

    r, c, v = validation
    Z, best, rises = torch.zeros_like(M), (math.inf, None, None), 0
    for lam in lams:
        for _ in range(MAX_ITERS):
            Znew = svt(torch.where(mask, M, Z), lam, MAX_RANK)
            change = float(torch.linalg.matrix_norm(Znew - Z) / torch.linalg.matrix_norm(Z).clamp_min(1e-300))
            Z = Znew
            if change < TOL:
                break
        val = float((Z[r, c] - v).square().mean().sqrt())
        if val < best[0]:
            best, rises = (val, lam, Z), 0
        else:
            rises += 1
            if rises >= 2:
                break
    return best[2], best[1]


def _case(name: str):
    """(fit mask, M with zeros off it, validation entries, test entries) of real-completion's case
    ``name`` at seed 0, 10 % of its training entries held out for the path's choice."""
    from torchlowrank.experiments.real_completion import Config, make_case

    case = make_case(name, Config(), 0)
    r, c, v = case.train
    perm = torch.randperm(len(v), generator=torch.Generator().manual_seed(17))
    nv = len(v) // 10
    fit, val = perm[nv:], perm[:nv]
    M = torch.zeros(case.shape, dtype=torch.float64)
    W = torch.zeros(case.shape, dtype=torch.bool)
    M[r[fit], c[fit]] = v[fit].double()
    W[r[fit], c[fit]] = True
    return (
        M,
        W,
        (r[val], c[val], v[val].double()),
        tuple(t.double() if t.is_floating_point() else t for t in case.test),
    )


def _rmse(pred, v) -> float:
    return float((pred - v).square().mean().sqrt())


def run(quick: bool = False):
    from torchlowrank.reproducibility import one_thread

    with one_thread():
        return _run(quick)


def _run(quick: bool):
    import warnings

    from torchlowrank.matrix import soft_impute_path
    from torchlowrank.reproducibility import environment_info
    from torchlowrank.results import Result, Table

    t_start = time.perf_counter()
    names = (
        ("diabetes standardized",)
        if quick
        else ("diabetes standardized", "flower.jpg grey", "MovieLens random")
    )
    rows, metrics = [], {}
    now = clock()
    for name in names:
        M, W, val, (tr, tc, tv) = _case(name)
        s1 = float(torch.linalg.matrix_norm(M, ord=2))
        lams = [f * s1 for f in LAM_FRACTIONS]
        t0 = now()
        Zd, lam_d = dense_svd_path(M, W, val, lams)
        t_dense = now() - t0
        t0 = now()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # unconverged lams are counted in the path
            Zf, lam_f, _ = soft_impute_path(M, W, val, lams=lams)
        t_fact = now() - t0
        vr, vc, vv = val
        for label, Z, lam, t in (
            ("dense SVDs (baseline)", Zd, lam_d, t_dense),
            ("factored", Zf, lam_f, t_fact),
        ):
            rows.append([name, label, t, lam / s1, _rmse(Z[vr, vc], vv), _rmse(Z[tr, tc], tv), t / t_dense])
        metrics[f"{name}: dense / factored time"] = t_dense / t_fact
    table = Table(
        "soft_impute_path: CPU time (s), lam chosen (x ||P_Omega(M)||_2), held-out and test RMSE; ratio to dense SVDs",
        ["case", "method", "time (s)", "lam / s1", "held-out RMSE", "test RMSE", "time ratio"],
        rows,
    )
    return Result(
        "soft_impute",
        {"quick": quick, "max_rank": MAX_RANK, "max_iters": MAX_ITERS, "tol": TOL},
        [0],
        metrics,
        {},
        [table],
        [],
        "Command: `PYTHONPATH=src python benchmarks/run.py soft_impute`. Single runs on one thread of a "
        "shared 2-core machine (thread CPU time).",
        time.perf_counter() - t_start,
        environment_info(),
    )
