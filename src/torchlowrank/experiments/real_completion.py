"""real-completion: every completion estimator with its default arguments on real, noisy matrices,
against the mean model, a tuned ALS and scikit-surprise (BaselineOnly, SVD, SVD++).

Cases: scikit-learn's bundled tables (diabetes 442 x 10, breast cancer 569 x 30; standardized and
raw; a seeded 20% of the entries hidden), its sample image flower.jpg in grey (downsampled by 2 to
213 x 320; 30% observed) and MovieLens-100K (random 10% test split; per-user temporal split: each
user's latest 10% of ratings). Error: RMSE on the hidden entries, and for the tables / image the
relative error ``||P - M||_F / ||M||_F`` on them. Wall time per fit.

Methods: mean (column means for tables / image, ``mu + b_i + c_j`` for MovieLens); complete()
defaults; ALS defaults (``als(..., rank)`` with ``rank = min(10, min(m, n) // 2)``, ridge chosen on
held-out entries); soft-impute path defaults (lam chosen on held-out entries, dense: skipped on
MovieLens in quick mode); tuned ALS (rank from {1, 2, 3, 5, 10, 20} and ridge chosen on a
validation split carved from the training entries); scikit-surprise with library defaults
(SVD++ only in the full run).
"""

from __future__ import annotations

import csv
import io
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..reproducibility import environment_info, git_commit, one_thread
from ..results import Result, Table

DESCRIPTION = (
    "Every completion estimator with defaults on real noisy matrices (sklearn "
    "tables, flower.jpg, MovieLens-100K random / temporal) vs mean, tuned ALS and scikit-surprise"
)


@dataclass
class Config:
    seeds: tuple[int, ...] = (0, 1, 2)
    table_hidden: float = 0.2
    image_observed: float = 0.3
    image_downsample: int = 2
    movielens_test: float = 0.1
    tuned_ranks: tuple[int, ...] = (1, 2, 3, 5, 10, 20)
    time_limit: float = 300.0  # per fit of ours (complete / soft-impute path)
    surprise_pp: bool = True
    soft_impute_on_movielens: bool = True  # the quick run leaves it out for time
    cases: tuple[str, ...] = (
        "diabetes standardized",
        "diabetes raw",
        "breast cancer standardized",
        "breast cancer raw",
        "flower.jpg grey",
        "MovieLens random",
        "MovieLens temporal",
    )


QUICK = Config(
    seeds=(0,),
    image_downsample=4,
    time_limit=20.0,
    surprise_pp=False,
    tuned_ranks=(2, 5, 10),
    soft_impute_on_movielens=False,
    cases=("diabetes standardized", "flower.jpg grey", "MovieLens random"),
)


@dataclass
class Case:
    name: str
    shape: tuple[int, int]
    train: tuple  # (rows, cols, values) in the data's units
    test: tuple
    kind: str  # "table" or "ratings"
    extra: dict = field(default_factory=dict)


def _table(name: str, X: np.ndarray, hidden: float, seed: int) -> Case:
    g = np.random.default_rng(seed)
    hide = g.random(X.shape) < hidden
    M = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
    r, c = torch.from_numpy(~hide).nonzero(as_tuple=True)
    tr, tc = torch.from_numpy(hide).nonzero(as_tuple=True)
    return Case(name, tuple(M.shape), (r, c, M[r, c]), (tr, tc, M[tr, tc]), "table")


def _movielens_entries():
    from ..data.sources import package_file

    text = package_file("recbole", "dataset_example/ml-100k/ml-100k.inter").read_text()
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    header = [h.split(":")[0] for h in rows[0]]
    cu, ci, cr, ct = (header.index(k) for k in ("user_id", "item_id", "rating", "timestamp"))
    a = np.array(
        [(int(x[cu]), int(x[ci]), float(x[cr]), float(x[ct])) for x in rows[1:] if x], dtype=np.float64
    )
    return (
        torch.from_numpy(a[:, 0]).long() - 1,
        torch.from_numpy(a[:, 1]).long() - 1,
        torch.from_numpy(a[:, 2]),
        torch.from_numpy(a[:, 3]),
    )


def make_case(name: str, cfg: Config, seed: int) -> Case:
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_sample_image

    if name.startswith(("diabetes", "breast cancer")):
        X = (load_diabetes if name.startswith("diabetes") else load_breast_cancer)().data.astype(np.float64)
        if name.endswith("standardized"):
            X = (X - X.mean(0)) / X.std(0)
        return _table(name, X, cfg.table_hidden, seed)
    if name.startswith("flower"):
        im = load_sample_image("flower.jpg").astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        d = cfg.image_downsample
        im = im[: im.shape[0] // d * d, : im.shape[1] // d * d]
        im = im.reshape(im.shape[0] // d, d, im.shape[1] // d, d).mean((1, 3))
        return _table(name, im, 1.0 - cfg.image_observed, seed)
    u, i, r, t = _movielens_entries()
    shape = (int(u.max()) + 1, int(i.max()) + 1)
    if name.endswith("random"):
        perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(seed))
        nt = int(round(cfg.movielens_test * len(r)))
        te, tr = perm[:nt], perm[nt:]
    else:  # each user's latest ratings (ties broken by a seeded jitter) as test
        jitter = torch.rand(len(r), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        order = torch.from_numpy(np.lexsort((jitter.numpy(), t.numpy(), u.numpy())))  # by user, then time
        uo = u[order]
        counts = torch.bincount(uo, minlength=shape[0])
        start = torch.cumsum(counts, 0) - counts
        pos = torch.arange(len(r)) - start[uo]
        n_test = (cfg.movielens_test * counts.double()).round().long()
        is_test = pos >= (counts - n_test)[uo]
        te, tr = order[is_test], order[~is_test]
    return Case(name, shape, (u[tr], i[tr], r[tr]), (u[te], i[te], r[te]), "ratings")


def _dense(case: Case):
    M = torch.zeros(case.shape, dtype=torch.float64)
    W = torch.zeros(case.shape, dtype=torch.bool)
    r, c, v = case.train
    M[r, c] = v.double()
    W[r, c] = True
    return M, W


def _errors(pred: torch.Tensor, case: Case) -> tuple[float, float]:
    v = case.test[2].double()
    rmse = float((pred - v).square().mean().sqrt())
    return rmse, float((pred - v).norm() / v.norm())


def _split_validation(case: Case, seed: int, fraction: float = 0.1):
    r, c, v = case.train
    perm = torch.randperm(len(v), generator=torch.Generator().manual_seed(seed + 17))
    nv = int(fraction * len(v))
    return (r[perm[nv:]], c[perm[nv:]], v[perm[nv:]]), (r[perm[:nv]], c[perm[:nv]], v[perm[:nv]])


def _fit_mean(case: Case):
    from ..matrix import fit_mean_model

    r, c, v = case.train
    if case.kind == "table":  # column means
        col = torch.zeros(case.shape[1], dtype=torch.float64).index_add_(0, c, v.double())
        col = col / torch.bincount(c, minlength=case.shape[1]).clamp_min(1)
        return lambda rr, cc: col[cc]
    mm = fit_mean_model(r, c, v.double(), case.shape, reg=10.0)
    return mm.predict


def _run_method(method: str, case: Case, cfg: Config, seed: int):
    """Returns (predictions at the test entries, status string)."""
    from ..matrix import als, complete, soft_impute_path

    tr, tc = case.test[0], case.test[1]
    if method == "mean":
        return _fit_mean(case)(tr, tc), "-"
    if method == "complete() defaults":
        M, W = _dense(case)
        res = complete(M, W, time_limit=cfg.time_limit, seed=seed)
        return res.matrix[tr, tc], res.status
    rank = min(10, min(case.shape) // 2)
    if method == "ALS defaults":
        M, W = _dense(case)
        res = als(M, W, rank, time_limit=cfg.time_limit, seed=seed)
        return res.predict(tr, tc), f"{res.status} (rank {rank}, reg {res.reg:g})"
    if method == "soft-impute path defaults":
        M, W = _dense(case)
        Z, lam, _ = soft_impute_path(M, W, time_limit=cfg.time_limit, seed=seed)
        return Z[tr, tc], f"lam {lam:.3g}"
    if method == "tuned ALS":
        fit, val = _split_validation(case, seed)
        sub = Case(case.name, case.shape, fit, val, case.kind)
        M, W = _dense(sub)
        best = (float("inf"), None, None)
        for k in cfg.tuned_ranks:
            if k > min(case.shape):
                continue
            res = als(
                M,
                W,
                k,
                validation=(val[0], val[1], val[2].double()),
                time_limit=cfg.time_limit,
                seed=seed,
                warn=False,
            )
            e = float((res.predict(val[0], val[1]) - val[2].double()).square().mean().sqrt())
            if e < best[0]:
                best = (e, k, res.reg)
        M, W = _dense(case)
        res = als(M, W, best[1], reg=best[2], time_limit=cfg.time_limit, seed=seed, warn=False)
        return res.predict(tr, tc), f"rank {best[1]}, reg {best[2]:g}"
    if method.startswith("surprise"):
        import pandas as pd
        from surprise import SVD, BaselineOnly, Dataset, Reader, SVDpp

        r, c, v = case.train
        lo, hi = float(v.min()), float(v.max())
        df = pd.DataFrame({"u": r.tolist(), "i": c.tolist(), "r": v.double().tolist()})
        ts = Dataset.load_from_df(df, Reader(rating_scale=(lo, hi))).build_full_trainset()
        algo = {
            "surprise BaselineOnly": lambda: BaselineOnly(verbose=False),
            "surprise SVD": lambda: SVD(random_state=seed),
            "surprise SVD++": lambda: SVDpp(random_state=seed),
        }[method]()
        algo.fit(ts)
        pred = torch.tensor(
            [algo.predict(a, b).est for a, b in zip(tr.tolist(), tc.tolist())], dtype=torch.float64
        )
        return pred, "library defaults"
    raise ValueError(method)


def methods(cfg: Config, case_name: str) -> list[str]:
    out = ["mean", "complete() defaults", "ALS defaults", "tuned ALS"]
    if cfg.soft_impute_on_movielens or not case_name.startswith("MovieLens"):
        out.append("soft-impute path defaults")
    try:
        import surprise  # noqa: F401
    except ImportError:
        return out
    out += ["surprise BaselineOnly", "surprise SVD"] + (["surprise SVD++"] if cfg.surprise_pp else [])
    return out


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    cfg = QUICK if quick else Config()
    if seed:
        cfg = Config(**{**asdict(cfg), "seeds": tuple(s + seed for s in cfg.seeds)})
    with one_thread():
        return _run(cfg, quick)


@dataclass
class Fit:
    """One estimator on one case and seed."""

    rmse: float
    rel: float
    wall: float
    status: str
    n_warnings: int  # RuntimeWarnings raised during the fit


def fit(meth: str, case: Case, cfg: Config, seed: int) -> Fit:
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pred, status = _run_method(meth, case, cfg, seed)
    wall = time.perf_counter() - t0
    rmse, rel = _errors(pred, case)
    n_warn = sum(1 for w in caught if issubclass(w.category, RuntimeWarning))
    return Fit(rmse, rel, wall, status, n_warn)


COLUMNS = ["case", "method", "RMSE", "RMSE std", "relative error", "time (s)", "status", "RuntimeWarnings"]


def summary_row(name: str, meth: str, fits: list[Fit]) -> list:
    """One table row: the fits of one estimator on one case over the seeds."""
    rm = [f.rmse for f in fits]
    return [
        name,
        meth,
        float(np.mean(rm)),
        float(np.std(rm)),
        float(np.mean([f.rel for f in fits])),
        float(np.median([f.wall for f in fits])),
        "; ".join(sorted({f.status for f in fits})),
        sum(f.n_warnings for f in fits),
    ]


def _run(cfg: Config, quick: bool) -> Result:
    t_start = time.perf_counter()
    rows, metrics = [], {}
    for name in cfg.cases:
        per: dict[str, list[Fit]] = {}
        for s in cfg.seeds:
            case = make_case(name, cfg, s)
            for meth in methods(cfg, name):
                per.setdefault(meth, []).append(fit(meth, case, cfg, s))
        for meth, fits in per.items():
            row = summary_row(name, meth, fits)
            rows.append(row)
            metrics[f"rmse[{name}][{meth}]"] = row[COLUMNS.index("RMSE")]
            metrics[f"time[{name}][{meth}]"] = row[COLUMNS.index("time (s)")]
    commit = git_commit()
    cmd = "torchlowrank reproduce real-completion --out docs/results/real-completion" + (
        " --quick" if quick else ""
    )
    table = Table(
        "Held-out error of each estimator with its defaults (mean over seeds), wall time (median, s)",
        COLUMNS,
        rows,
    )
    notes = (
        f"Command: `{cmd}` (git commit {commit}); seeds {list(cfg.seeds)}; one CPU thread on a shared machine "
        "(wall times are noisy; compare within a case). Interpretation: docs/matrix.md."
    )
    return Result(
        "real-completion",
        {**asdict(cfg), "quick": quick, "command": cmd, "git_commit": commit},
        list(cfg.seeds),
        metrics,
        {},
        [table],
        [],
        notes,
        time.perf_counter() - t_start,
        environment_info(),
    )
