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

import dataclasses
import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from ..reproducibility import environment_info, git_commit, one_thread, seed_everything
from ..results import Result, Table

DESCRIPTION = (
    "Completion with the rank unknown: compressed deep net (default r_hat) vs ALS "
    "(true / over-estimated rank) vs validated soft-impute, across scale, shape, fraction, conditioning"
)

__all__ = ["run", "make_problem", "Config", "Case", "CaseResult"]

# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Case:
    """One synthetic problem: shape, rank, observed fraction, scale, offset, spectrum."""

    shape: tuple[int, int]
    rank: int
    frac: float
    scale: float
    offset: float
    spectrum: str  # "flat" (equal singular values) or "decay" (10..1)

    @property
    def name(self) -> str:
        m, n = self.shape
        return (
            f"{m}x{n} r={self.rank} p={self.frac} scale={self.scale:g} offset={self.offset:g} {self.spectrum}"
        )


@dataclass(frozen=True)
class Config:
    quick: bool = False
    seed: int = 0
    cases: tuple[Case, ...] = (
        Case((120, 120), 3, 0.3, 1.0, 0.0, "flat"),
        Case((200, 80), 3, 0.4, 1e-3, 2.0, "flat"),
        Case((80, 200), 3, 0.4, 1e3, 0.0, "flat"),
        Case((120, 120), 5, 0.5, 1.0, 3.0, "decay"),
        Case((150, 100), 3, 0.2, 1e2, 0.0, "flat"),
    )
    max_iters: int = 20_000  # of complete(); every other argument is its default
    repeats: int = 3  # identical runs of ours and of ALS at the true rank; the median time is reported
    als_over_max_iters: int = 200
    soft_impute_max_rank: int = 60
    soft_impute_path_iters: int = 200
    soft_impute_refit_iters: int = 500

    @classmethod
    def make(cls, quick: bool, seed: int) -> Config:
        if quick:
            return cls(
                quick=True, seed=seed, cases=(Case((50, 40), 2, 0.5, 1e3, 3.0, "flat"),), max_iters=6000
            )
        return cls(seed=seed)

    @property
    def command(self) -> str:
        return "torchlowrank reproduce unknown-rank --out docs/results/unknown-rank" + (
            " --quick" if self.quick else ""
        )


# ----------------------------------------------------------------------------------------- data


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


def _median_time(fn, repeats: int):
    """Run ``fn`` ``repeats`` times (the same deterministic run); (last output, median seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


# --------------------------------------------------------------------------------------- fit


@dataclass
class CaseResult:
    """One row of the table: every method on one problem."""

    problem: str
    r_hat: int
    ours_error: float
    ours_status: str
    ours_iterations: int
    ours_rank_polished_at: str
    ours_time: float
    als_true_error: float
    als_true_time: float
    time_ratio_ours_to_als_true: float
    als_over_error: float
    als_over_time: float
    soft_impute_error: float
    soft_impute_lam: str
    soft_impute_time: float
    warning: str | None = None  # the first RuntimeWarning of ours, if any (not a table column)

    def cells(self) -> list:
        return list(dataclasses.astuple(self))[:-1]


def fit_ours(M, mask, cfg: Config, progress: bool | None):
    """complete(M, mask) with default arguments; (result, median time, first RuntimeWarning or None)."""
    from ..matrix import complete

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res, t = _median_time(
            lambda: complete(M, mask, max_iters=cfg.max_iters, progress=progress), cfg.repeats
        )
    failures = [str(w.message)[:80] for w in caught if issubclass(w.category, RuntimeWarning)]
    return res, t, (failures[0] if failures else None)


def fit_soft_impute(M, mask, cfg: Config, ci: int):
    """lam chosen on 10% of the observed entries, then refitted on all of them; (Z, lam, seconds)."""
    from ..matrix import soft_impute, soft_impute_path

    t0 = time.perf_counter()
    obs = mask.nonzero()
    perm = torch.randperm(obs.shape[0], generator=torch.Generator().manual_seed(cfg.seed + 100 + ci))
    nv = obs.shape[0] // 10
    vr, vc = obs[perm[:nv], 0], obs[perm[:nv], 1]
    fit_mask = mask.clone()
    fit_mask[vr, vc] = False
    _, lam, _ = soft_impute_path(
        M,
        fit_mask,
        (vr, vc, M[vr, vc]),
        max_iters=cfg.soft_impute_path_iters,
        max_rank=cfg.soft_impute_max_rank,
    )
    Z = soft_impute(
        M, mask, lam, max_rank=cfg.soft_impute_max_rank, max_iters=cfg.soft_impute_refit_iters, warn=False
    )
    return Z, lam, time.perf_counter() - t0


def run_case(ci: int, case: Case, cfg: Config, progress: bool | None) -> CaseResult:
    from ..matrix import als

    M, mask = make_problem(
        case.shape, case.rank, case.frac, case.scale, case.offset, case.spectrum, cfg.seed + ci
    )
    res, t_ours, warning = fit_ours(M, mask, cfg, progress)
    X, Bt = res.model.factor_pair()
    polished = res.history.polished_at is not None
    rank_found = int(torch.linalg.matrix_rank(X @ Bt.T, rtol=1e-8)) if polished else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r_true = case.rank + (case.offset != 0)  # the offset adds a rank-one term: M has rank r + 1
        a_true, t_als = _median_time(lambda: als(M, mask, r_true), cfg.repeats)
        t0 = time.perf_counter()
        a_over = als(M, mask, res.rank, max_iters=cfg.als_over_max_iters)
        t_over = time.perf_counter() - t0
        Z, lam, t_si = fit_soft_impute(M, mask, cfg, ci)
    return CaseResult(
        problem=case.name,
        r_hat=res.rank,
        ours_error=_err(res.matrix, M),
        ours_status=res.status,
        ours_iterations=res.history.n_iters,
        ours_rank_polished_at="-"
        if rank_found is None
        else f"{rank_found} (iteration {res.history.polished_at})",
        ours_time=t_ours,
        als_true_error=_err(a_true.matrix, M),
        als_true_time=t_als,
        time_ratio_ours_to_als_true=t_ours / t_als,
        als_over_error=_err(a_over.matrix, M),
        als_over_time=t_over,
        soft_impute_error=_err(Z, M),
        soft_impute_lam=f"{lam:.3g}",
        soft_impute_time=t_si,
        warning=warning,
    )


# ---------------------------------------------------------------------------------------- write

COLUMNS = [
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
]


def metrics_of(results: list[CaseResult]) -> dict:
    metrics: dict = {}
    for c in results:
        metrics[f"time_ratio_ours_to_als_true[{c.problem}]"] = c.time_ratio_ours_to_als_true
        metrics[f"error_ours[{c.problem}]"] = c.ours_error
        metrics[f"error_als_over[{c.problem}]"] = c.als_over_error
        if c.warning:
            metrics[f"warning[{c.problem}]"] = c.warning
    n = len(results)
    metrics["cases_ours_within_1e-6"] = f"{sum(1 for c in results if c.ours_error <= 1e-6)}/{n}"
    metrics["cases_ours_better_than_als_over"] = (
        f"{sum(1 for c in results if c.ours_error < c.als_over_error)}/{n}"
    )
    metrics["max_time_ratio_ours_to_als_true"] = max(c.time_ratio_ours_to_als_true for c in results)
    return metrics


def setting_notes(cfg: Config, commit: str | None) -> str:
    return (
        f"Command: `{cfg.command}` (git commit {commit}). One seed ({cfg.seed}); one CPU thread; the machine is "
        "shared by several jobs, so wall times are noisy: compare them within a row (ours and ALS at the true "
        f"rank: median of {cfg.repeats} identical runs). `ours` = `tlr.matrix.complete(M, mask)` "
        f"with default arguments except max_iters={cfg.max_iters} (default r_hat = tlr.matrix.default_rank; centring "
        "by jointly fitted row/column biases and a unit from the top singular value of the centred, rescaled "
        "observations; adaptive step and exact ALS polish at the rank the network picked, both default: "
        "'rank polished at' is the rank of the polished solution and the iteration of the polish). ALS (ridge 1e-10 x ||P(M)||_2) at the true rank of M (r, or r + 1 with an offset) is an oracle; ALS at r_hat uses the same "
        "over-estimated rank as ours. Soft-impute: lam from a warm-started path (0.5 .. 0.001 x ||P(M)||_2) chosen "
        "on 10% of the observed entries, then refitted on all of them (at most 60 singular triplets, 200 iterations per "
        "lam on the path, 500 for the refit). Error: relative Frobenius error over all entries."
    )


def write(cfg: Config, results: list[CaseResult], commit: str | None, wall: float) -> Result:
    table = Table(
        "Recovery error (relative Frobenius, all entries) and wall time (s) with the rank unknown",
        COLUMNS,
        [c.cells() for c in results],
    )
    config = {
        "quick": cfg.quick,
        "cases": [
            list(map(str, (c.shape, c.rank, c.frac, c.scale, c.offset, c.spectrum))) for c in cfg.cases
        ],
        "max_iters": cfg.max_iters,
        "command": cfg.command,
        "git_commit": commit,
    }
    return Result(
        "unknown-rank",
        config,
        [cfg.seed],
        metrics_of(results),
        {},
        [table],
        [],
        setting_notes(cfg, commit),
        wall,
        environment_info(),
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    cfg = Config.make(quick, seed)
    t0 = time.perf_counter()
    seed_everything(seed)
    with one_thread():
        results = [run_case(ci, case, cfg, progress) for ci, case in enumerate(cfg.cases)]
    return write(cfg, results, git_commit(), time.perf_counter() - t0)
