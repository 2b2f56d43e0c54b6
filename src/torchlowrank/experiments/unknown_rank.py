"""unknown-rank: matrix completion when the rank is NOT given (issue 11).

Synthetic rank-r problems across scale (1e-3 .. 1e3, with offsets), shape (square / tall / wide),
observed fraction and conditioning (equal singular values, or decaying 10..1). Methods, each with
the rank unknown unless said otherwise:

- ours: ``tlr.matrix.complete`` with default arguments (default r_hat = ``default_rank``; adaptive
  step, then the exact ALS polish at the rank the network's escaped directions give, extended by
  residual directions while they take >= 20% of the residual, accepted only at the tolerance);
- ALS at the true rank of M (an oracle: the rank is given; r + 1 when there is an offset);
- ALS at the same over-estimated rank r_hat as ours (ridge 1e-10 relative);
- soft-impute on a warm-started lam path, lam chosen on a validation split (10% of the observed
  entries held out, the final fit refitted on all observed entries at that lam).

Recovery error ||X - M||_F / ||M||_F over all entries and wall time (one thread, shared machine:
compare times within a row only). The claim tested (the seed paper's): depth gives an implicit
low-rank bias that makes an over-estimated width harmless, where shallow methods over-fit.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch

from ..reproducibility import environment_info, git_commit, one_thread, seed_everything
from ..results import Result, Table

DESCRIPTION = (
    "Completion with the rank unknown: compressed deep net (default r_hat) vs ALS "
    "(true / over-estimated rank) vs validated soft-impute, across scale, shape, fraction, conditioning"
)

__all__ = ["run", "make_problem"]

REPEATS = 3


def make_problem(shape, rank, frac, scale, offset, spectrum, seed):
    """(M (m, n), mask (m, n)): rank-``rank`` M with singular values equal ("flat") or decaying
    linearly 10..1 ("decay"), normalised to unit entry RMS, times ``scale`` plus ``offset * scale``."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    U = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    s = (
        torch.ones(rank, dtype=torch.float64)
        if spectrum == "flat"
        else torch.linspace(10, 1, rank, dtype=torch.float64)
    )
    M = (U * s) @ V.T
    M = scale * (M / M.square().mean().sqrt() + offset)
    mask = torch.rand(shape, generator=g, dtype=torch.float64) < frac
    return M, mask


def _err(X, M):
    return float(torch.linalg.matrix_norm(X - M) / torch.linalg.matrix_norm(M))


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    from ..matrix import als, complete, soft_impute, soft_impute_path

    t_start = time.perf_counter()
    seed_everything(seed)
    if quick:
        cases = [((50, 40), 2, 0.5, 1e3, 3.0, "flat")]
        max_iters = 6000
    else:
        cases = [
            ((120, 120), 3, 0.3, 1.0, 0.0, "flat"),
            ((200, 80), 3, 0.4, 1e-3, 2.0, "flat"),
            ((80, 200), 3, 0.4, 1e3, 0.0, "flat"),
            ((120, 120), 5, 0.5, 1.0, 3.0, "decay"),
            ((150, 100), 3, 0.2, 1e2, 0.0, "flat"),
        ]
        max_iters = 20_000
    rows, metrics = [], {}
    with one_thread():
        for ci, (shape, r, frac, scale, offset, spec) in enumerate(cases):
            M, mask = make_problem(shape, r, frac, scale, offset, spec, seed + ci)
            name = f"{shape[0]}x{shape[1]} r={r} p={frac} scale={scale:g} offset={offset:g} {spec}"
            times = []
            for _ in range(REPEATS):  # the same deterministic run; the median time of REPEATS
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    t0 = time.perf_counter()
                    res = complete(M, mask, max_iters=max_iters, progress=progress)
                    times.append(time.perf_counter() - t0)
            t_ours = statistics.median(times)
            e_ours = _err(res.matrix, M)
            r_hat = res.rank
            X, Bt = res.model.factor_pair()
            rank_found = (
                int(torch.linalg.matrix_rank(X @ Bt.T, rtol=1e-8))
                if res.history.polished_at is not None
                else None
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                r_true = r + (offset != 0)  # the offset adds a rank-one term: M has rank r + 1
                times = []
                for _ in range(REPEATS):
                    t0 = time.perf_counter()
                    a_true = als(M, mask, r_true)
                    times.append(time.perf_counter() - t0)
                t_als = statistics.median(times)
                t0 = time.perf_counter()
                a_over = als(M, mask, r_hat, max_iters=200)
                t_over = time.perf_counter() - t0
                # soft-impute: lam chosen on 10% of the observed entries, then refitted on all of them
                t0 = time.perf_counter()
                obs = mask.nonzero()
                perm = torch.randperm(obs.shape[0], generator=torch.Generator().manual_seed(seed + 100 + ci))
                nv = obs.shape[0] // 10
                vr, vc = obs[perm[:nv], 0], obs[perm[:nv], 1]
                fit_mask = mask.clone()
                fit_mask[vr, vc] = False
                _, lam, _ = soft_impute_path(M, fit_mask, (vr, vc, M[vr, vc]), max_iters=200, max_rank=60)
                Z = soft_impute(M, mask, lam, max_rank=60, max_iters=500, warn=False)
                t_si = time.perf_counter() - t0
            failures = [str(w.message)[:80] for w in caught if issubclass(w.category, RuntimeWarning)]
            rows.append(
                [
                    name,
                    r_hat,
                    e_ours,
                    res.status,
                    res.history.n_iters,
                    "-" if rank_found is None else f"{rank_found} (iteration {res.history.polished_at})",
                    t_ours,
                    _err(a_true.matrix, M),
                    t_als,
                    t_ours / t_als,
                    _err(a_over.matrix, M),
                    t_over,
                    _err(Z, M),
                    f"{lam:.3g}",
                    t_si,
                ]
            )
            metrics[f"time_ratio_ours_to_als_true[{name}]"] = t_ours / t_als
            metrics[f"error_ours[{name}]"] = e_ours
            metrics[f"error_als_over[{name}]"] = _err(a_over.matrix, M)
            if failures:
                metrics[f"warning[{name}]"] = failures[0]
    ok = sum(1 for x in rows if x[2] <= 1e-6)
    metrics["cases_ours_within_1e-6"] = f"{ok}/{len(rows)}"
    metrics["cases_ours_better_than_als_over"] = f"{sum(1 for x in rows if x[2] < x[10])}/{len(rows)}"
    metrics["max_time_ratio_ours_to_als_true"] = max(x[9] for x in rows)
    commit = git_commit()
    cmd = "torchlowrank reproduce unknown-rank --out docs/results/unknown-rank" + (
        " --quick" if quick else ""
    )
    notes = (
        f"Command: `{cmd}` (git commit {commit}). One seed ({seed}); one CPU thread; the machine is shared by "
        f"several jobs, so wall times are noisy: compare them within a row (ours and ALS at the true rank: median of "
        f"{REPEATS} identical runs). `ours` = `tlr.matrix.complete(M, mask)` "
        f"with default arguments except max_iters={max_iters} (default r_hat = tlr.matrix.default_rank; centring "
        "by jointly fitted row/column biases and a unit from the top singular value of the centred, rescaled "
        "observations; adaptive step and exact ALS polish at the rank the network picked, both default: "
        "'rank polished at' is the rank of the polished solution and the iteration of the polish). ALS (ridge 1e-10 x ||P(M)||_2) at the true rank of M (r, or r + 1 with an offset) is an oracle; ALS at r_hat uses the same "
        "over-estimated rank as ours. Soft-impute: lam from a warm-started path (0.5 .. 0.001 x ||P(M)||_2) chosen "
        "on 10% of the observed entries, then refitted on all of them (at most 60 singular triplets, 200 iterations per "
        "lam on the path, 500 for the refit). Error: relative Frobenius error over all entries."
    )
    table = Table(
        "Recovery error (relative Frobenius, all entries) and wall time (s) with the rank unknown",
        [
            "problem",
            "r_hat (ours)",
            "ours: error",
            "ours: status",
            "ours: iterations",
            "ours: rank polished at",
            "ours: time (s)",
            "ALS true rank: error",
            "ALS true rank: time",
            "time ratio ours / ALS true rank",
            "ALS at r_hat: error",
            "ALS at r_hat: time",
            "soft-impute (validated): error",
            "soft-impute lam",
            "soft-impute: time",
        ],
        rows,
    )
    return Result(
        "unknown-rank",
        {
            "quick": quick,
            "cases": [list(map(str, c)) for c in cases],
            "max_iters": max_iters,
            "command": cmd,
            "git_commit": commit,
        },
        [seed],
        metrics,
        {},
        [table],
        [],
        notes,
        time.perf_counter() - t_start,
        environment_info(),
    )
