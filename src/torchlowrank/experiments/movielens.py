"""movielens: MovieLens 100K rating prediction with ``tlr.matrix.complete`` (compressed deep
factorization with jointly fitted user / item biases), the raw compressed network and a shallow
(depth-2, width-r) factorization without biases, soft-impute, ridge ALS on the bias-centred
ratings, and scikit-surprise's BaselineOnly / SVD / SVD++ on the same split in the same script
(skipped with a note when scikit-surprise is not installed). Protocol: hyper-parameters and the
number of iterations chosen on a validation split carved from the training ratings (fit on the
other 80%), then the chosen setting refitted on all training ratings (90%) for that number of
iterations and evaluated on the test ratings once (both test RMSEs are reported).

Read top to bottom: config, data, the models (one function each), selection, the report.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass

import torch

from ..reproducibility import environment_info, git_commit, one_thread, seed_everything
from ..results import Plot, Result, Series, Table

DESCRIPTION = (
    "MovieLens 100K: complete() with biases vs compressed / shallow factorization vs "
    "soft-impute vs ALS vs scikit-surprise (BaselineOnly, SVD, SVD++)"
)

# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    quick: bool = False
    seed: int = 0
    test_fraction: float = 0.1
    max_iters: int = 4000
    # raw deep / shallow networks (no biases): fixed step, init scale; at init scale 1e-3 nothing
    # escapes the origin within the budget
    init_scale_raw: float = 1e-2
    lr_raw: float = 60.0
    rank_raw: int = 5
    gamma: float = 0.01
    # complete() settings tried: (depth, r_hat, weight_decay)
    complete_configs: tuple[tuple[int, int, float], ...] = (
        (3, 5, 0.0),
        (3, 10, 1e-6),
        (3, 10, 1.5e-6),
        (3, 20, 1e-6),
        (2, 10, 1e-6),
        (2, 10, 1.5e-6),
        (2, 10, 2e-6),
        (2, 20, 1.5e-6),
    )
    complete_bias_reg: float = 5.0
    complete_init_scale: float = 1e-2
    complete_eval_every: int = 50
    complete_patience: int = 20
    mean_model_reg: float = 5.0
    als_rank: int = 10
    als_regs: tuple[float, ...] = (0.1, 0.3, 1.0)
    als_max_iters: int = 30
    soft_impute_lams: tuple[float, ...] = (0.4, 0.3, 0.2, 0.12, 0.08)  # x ||P(M)||_2
    soft_impute_iters: int = 25
    soft_impute_max_rank: int = 40

    @classmethod
    def make(cls, quick: bool, seed: int) -> Config:
        if not quick:
            return cls(seed=seed)
        return cls(
            quick=True,
            seed=seed,
            max_iters=1500,
            complete_configs=((3, 5, 0.0), (2, 10, 1e-6)),
            als_regs=(0.3,),
            als_max_iters=10,
            soft_impute_lams=(0.2, 0.1),
            soft_impute_iters=10,
        )

    @property
    def command(self) -> str:
        return (
            f"torchlowrank reproduce movielens --out docs/results/movielens{' --quick' if self.quick else ''}"
        )


# ----------------------------------------------------------------------------------------- data

Entries = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # user ids, item ids, ratings


@dataclass
class Split:
    """Fit (80%) / validation (10%) / all training (90%) / test (10%) ratings of MovieLens 100K."""

    shape: tuple[int, int]
    fit: Entries
    val: Entries
    full: Entries
    test: Entries


def load_split(cfg: Config) -> Split:
    from ..data import load_movielens_100k

    data = load_movielens_100k(test_fraction=cfg.test_fraction, seed=cfg.seed)
    u, i, r = data.train
    n = len(r)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))
    n_val = n // 9  # 10% of all ratings: fit 80 / validation 10 / test 10; the refit uses fit + validation
    vi, fi = perm[:n_val], perm[n_val:]
    tu, ti, tr = data.test
    return Split(
        shape=(data.n_users, data.n_items),
        fit=(u[fi], i[fi], r[fi].double()),
        val=(u[vi], i[vi], r[vi].double()),
        full=(u, i, r.double()),
        test=(tu, ti, tr.double()),
    )


def rmse_of(pred: torch.Tensor, entries: Entries) -> float:
    """RMSE of a dense (m, n) prediction in rating units on the given entries."""
    return float((pred[entries[0], entries[1]] - entries[2]).square().mean().sqrt())


def dense(entries: Entries, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    M = torch.zeros(shape, dtype=torch.float64)
    W = torch.zeros(shape, dtype=torch.bool)
    M[entries[0], entries[1]] = entries[2]
    W[entries[0], entries[1]] = True
    return M, W


# --------------------------------------------------------------------------------------- models


@dataclass
class Run:
    """One model: fitted on 80% (chosen on validation), then refitted on 90%; one row of 'All runs'."""

    model: str
    rank: int | str
    val_rmse: float
    test_rmse_fit80: float
    best_iteration: int | None
    iterations: int | None
    status: str
    fit_time: float
    test_rmse_refit: float
    refit_time: float

    def cells(self) -> list:
        return list(dataclasses.astuple(self))


def fit_raw(kind: str, split: Split, cfg: Config, progress: bool | None) -> tuple[Run, Series]:
    """The raw compressed network ("deep ...") or a shallow factorization on globally centred
    ratings, no biases, fixed step; early-stopped on validation, refitted for the best iteration."""
    from ..matrix import train_gd

    rank = cfg.rank_raw
    mu = float(split.fit[2].mean())
    problem, model = _raw_model(kind, split.fit, mu, split, cfg)
    ts = time.perf_counter()
    h = train_gd(
        model,
        problem,
        cfg.lr_raw,
        max_iters=cfg.max_iters,
        eval_every=100,
        validation=(split.val[0], split.val[1], split.val[2] - mu),
        patience=10,
        progress=progress,
    )
    t_fit = time.perf_counter() - ts
    test80 = h.test_rmse[h.iterations.index(h.best_iteration)]  # at the best iteration, as the refit
    mu90 = float(split.full[2].mean())
    problem, model = _raw_model(kind, split.full, mu90, split, cfg)
    ts = time.perf_counter()
    train_gd(model, problem, cfg.lr_raw, max_iters=h.best_iteration, tol=0, eval_every=100, progress=progress)
    test90 = rmse_of(model.end_to_end().detach() + mu90, split.test)
    run = Run(
        kind,
        rank,
        min(h.val_rmse),
        test80,
        h.best_iteration,
        h.n_iters,
        h.status,
        t_fit,
        test90,
        time.perf_counter() - ts,
    )
    return run, Series(f"{kind}, r={rank} (val)", h.iterations, h.val_rmse)


def _raw_model(kind: str, entries: Entries, mu: float, split: Split, cfg: Config):
    from ..matrix import Completion, CompressedFactorization, DeepFactorization

    test = (split.test[0], split.test[1], split.test[2] - mu)
    problem = Completion.from_entries(entries[0], entries[1], entries[2] - mu, split.shape, test=test)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    if kind.startswith("deep"):
        model = CompressedFactorization.from_problem(
            problem, cfg.rank_raw, depth=3, init_scale=cfg.init_scale_raw, gamma=cfg.gamma, generator=gen
        )
    else:
        model = DeepFactorization(
            split.shape, depth=2, width=cfg.rank_raw, init_scale=cfg.init_scale_raw, generator=gen
        )
    return problem, model


def fit_complete(
    depth: int, rk: int, wd: float, split: Split, cfg: Config, progress: bool | None
) -> tuple[Run, Series]:
    """complete() on the raw ratings (user / item biases fitted jointly): early-stopped on
    validation, then refitted on all training ratings for the best iteration count."""
    from ..matrix import complete

    settings = dict(
        depth=depth,
        rank=rk,
        bias_reg=cfg.complete_bias_reg,
        init_scale=cfg.complete_init_scale,
        weight_decay=wd,
        eval_every=cfg.complete_eval_every,
        progress=progress,
    )
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ts = time.perf_counter()
        res = complete(
            *dense(split.fit, split.shape),
            validation=split.val,
            test=split.test,
            patience=cfg.complete_patience,
            max_iters=cfg.max_iters,
            **settings,
        )
        t_fit = time.perf_counter() - ts
        h = res.history
        ts = time.perf_counter()
        ref = complete(*dense(split.full, split.shape), max_iters=h.best_iteration, tol=0, ftol=0, **settings)
        t_ref = time.perf_counter() - ts
    run = Run(
        f"complete() + biases (L={depth}, weight_decay={wd:g})",
        rk,
        min(h.val_rmse),
        h.test_rmse[h.iterations.index(h.best_iteration)],  # the model the refit reproduces
        h.best_iteration,
        h.n_iters,
        h.status,
        t_fit,
        rmse_of(ref.matrix, split.test),
        t_ref,
    )
    return run, Series(f"complete() L={depth} r_hat={rk} wd={wd:g} (val)", h.iterations, h.val_rmse)


def _mean_model(entries: Entries, shape: tuple[int, int], cfg: Config) -> torch.Tensor:
    from ..matrix import fit_mean_model

    return fit_mean_model(entries[0], entries[1], entries[2], shape, reg=cfg.mean_model_reg).dense()


def _als(entries: Entries, reg: float, split: Split, cfg: Config):
    """Ridge ALS on the ratings minus the mean model; returns (prediction, ALS result)."""
    from ..matrix import als

    M, W = dense(entries, split.shape)
    mean = _mean_model(entries, split.shape, cfg)
    C = torch.where(W, M - mean, torch.zeros(()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a = als(C, W, cfg.als_rank, reg=reg, max_iters=cfg.als_max_iters)
    return a.matrix + mean, a


def fit_als(reg: float, split: Split, cfg: Config) -> Run:
    ts = time.perf_counter()
    pred, a = _als(split.fit, reg, split, cfg)
    t_fit = time.perf_counter() - ts
    ts = time.perf_counter()
    pred90, _ = _als(split.full, reg, split, cfg)
    return Run(
        f"ALS + biases (rank {cfg.als_rank}, reg {reg:g} x ||P(M)||_2)",
        cfg.als_rank,
        rmse_of(pred, split.val),
        rmse_of(pred, split.test),
        None,
        a.n_iters,
        a.status,
        t_fit,
        rmse_of(pred90, split.test),
        time.perf_counter() - ts,
    )


def fit_mean(split: Split, cfg: Config) -> Run:
    mp, mp90 = _mean_model(split.fit, split.shape, cfg), _mean_model(split.full, split.shape, cfg)
    return Run(
        f"mean model (mu + user + item bias, reg {cfg.mean_model_reg:g})",
        "-",
        rmse_of(mp, split.val),
        rmse_of(mp, split.test),
        None,
        None,
        "-",
        0.0,
        rmse_of(mp90, split.test),
        0.0,
    )


def _surprise_rows(train, val, test, quick: bool, seed: int, full=None) -> tuple[list[Run], str]:
    """BaselineOnly / SVD / SVD++ (scikit-surprise defaults, seeded) fitted on the training ratings
    minus the validation split (``train``) and, when ``full`` is given, refitted on all training
    ratings (``full``); returns one :class:`Run` per algorithm and a note."""
    try:
        import pandas as pd
        import surprise
        from surprise import SVD, BaselineOnly, Dataset, Reader, SVDpp
    except ImportError as exc:
        return [], (
            f"scikit-surprise (or pandas) is not installed ({exc}); its baselines were skipped: "
            "pip install scikit-surprise"
        )

    def trainset(entries):
        u, i, r = entries
        df = pd.DataFrame({"u": u.tolist(), "i": i.tolist(), "r": r.tolist()})
        return Dataset.load_from_df(df, Reader(rating_scale=(1, 5))).build_full_trainset()

    def rmse(algo, entries):
        uu, ii, rr = entries
        pred = torch.tensor(
            [algo.predict(a, b).est for a, b in zip(uu.tolist(), ii.tolist())], dtype=torch.float64
        )
        return float((pred - rr.double()).square().mean().sqrt())

    def fitted(make, ts):
        t0 = time.perf_counter()
        algo = make()
        algo.fit(ts)
        return algo, time.perf_counter() - t0

    algos = [
        ("surprise BaselineOnly", lambda: BaselineOnly(verbose=False)),
        ("surprise SVD", lambda: SVD(random_state=seed)),
    ]
    if not quick:
        algos.append(("surprise SVD++", lambda: SVDpp(random_state=seed)))
    sets = [trainset(train)] + ([trainset(full)] if full is not None else [])
    rows = []
    for name, make in algos:
        (a80, t80), *refit = [fitted(make, ts) for ts in sets]
        a90, t90 = refit[0] if refit else (None, None)
        rows.append(
            Run(
                name,
                "defaults",
                rmse(a80, val),
                rmse(a80, test),
                None,
                None,
                "fitted (library defaults)",
                t80,
                None if a90 is None else rmse(a90, test),
                t90,
            )
        )
    note = (
        f"scikit-surprise {surprise.__version__}, library defaults (SVD / SVD++ random_state={seed}), fitted on "
        "the training ratings minus the validation split and refitted on all training ratings (no "
        "hyper-parameters to choose), predictions clipped to 1..5 by surprise."
    )
    if quick:
        note += " Quick mode skips SVD++ (slow)."
    return rows, note


@dataclass
class SoftImputeStep:
    """One lam of the soft-impute path fitted on 80%; one row of the 'Soft-impute path' table."""

    lam_fraction: float
    lam: float
    rank: int
    val_rmse: float
    test_rmse: float
    time: float


def _soft_impute_path(entries: Entries, split: Split, cfg: Config, upto: int | None = None):
    """Warm-started soft-impute along decreasing lam (relative to ||P_Omega(M)||_2) on the globally
    centred ratings; returns (step fields without RMSEs, prediction) per lam."""
    from ..matrix import soft_impute

    mu = float(entries[2].mean())
    M, W = dense(entries, split.shape)
    M = torch.where(W, M - mu, torch.zeros(()))
    s1 = float(torch.linalg.matrix_norm(M, ord=2))
    Z, out = None, []
    for f in cfg.soft_impute_lams[: None if upto is None else upto + 1]:
        ts = time.perf_counter()
        Z = soft_impute(
            M,
            W,
            lam=f * s1,
            max_rank=cfg.soft_impute_max_rank,
            max_iters=cfg.soft_impute_iters,
            tol=1e-4,
            init=Z,
            warn=False,
        )
        out.append((f, f * s1, int((torch.linalg.svdvals(Z) > 1e-8).sum()), Z + mu, time.perf_counter() - ts))
    return out


def fit_soft_impute(split: Split, cfg: Config) -> tuple[Run, list[SoftImputeStep]]:
    """lam chosen on validation along the path, then the path rerun on all training ratings to it."""
    path = [
        SoftImputeStep(f, lam, rank, rmse_of(P, split.val), rmse_of(P, split.test), t)
        for f, lam, rank, P, t in _soft_impute_path(split.fit, split, cfg)
    ]
    j = min(range(len(path)), key=lambda q: path[q].val_rmse)
    ts = time.perf_counter()
    path90 = _soft_impute_path(split.full, split, cfg, upto=j)
    best = path[j]
    run = Run(
        "soft-impute",
        f"lam={best.lam:.3g} (rank {best.rank})",
        best.val_rmse,
        best.test_rmse,
        None,
        None,
        "chosen on validation",
        sum(s.time for s in path),
        rmse_of(path90[-1][3], split.test),
        time.perf_counter() - ts,
    )
    return run, path


def global_mean_rmse(entries: Entries, mean: float) -> float:
    return float((entries[2] - mean).square().mean().sqrt())


def fit_global_mean(split: Split) -> Run:
    g80, g90 = float(split.fit[2].mean()), float(split.full[2].mean())
    return Run(
        "global mean",
        "-",
        global_mean_rmse(split.val, g80),
        global_mean_rmse(split.test, g80),
        None,
        None,
        "-",
        0.0,
        global_mean_rmse(split.test, g90),
        0.0,
    )


# ---------------------------------------------------------------------------------------- train


@dataclass
class Runs:
    runs: list[Run]  # every fitted setting, in the order of the 'All runs' table
    curves: list[Series]  # validation RMSE during training of the GD models
    soft_impute_path: list[SoftImputeStep]
    surprise_note: str


def train_all(cfg: Config, split: Split, progress: bool | None) -> Runs:
    runs, curves = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # statuses are in the table
        for kind in ("deep (compressed, L=3), no biases", "shallow (L=2, width r), no biases"):
            run, curve = fit_raw(kind, split, cfg, progress)
            runs.append(run)
            curves.append(curve)
    for depth, rk, wd in cfg.complete_configs:
        run, curve = fit_complete(depth, rk, wd, split, cfg, progress)
        runs.append(run)
        curves.append(curve)
    runs += [fit_als(reg, split, cfg) for reg in cfg.als_regs]
    runs.append(fit_mean(split, cfg))
    surprise_runs, surprise_note = _surprise_rows(
        split.fit, split.val, split.test, cfg.quick, cfg.seed, full=split.full
    )
    runs += surprise_runs
    si_run, si_path = fit_soft_impute(split, cfg)
    runs += [si_run, fit_global_mean(split)]
    return Runs(runs, curves, si_path, surprise_note)


def select(runs: list[Run]) -> list[Run]:
    """The best setting (by validation RMSE) of each tuned family, then the untuned baselines."""
    chosen = []
    for prefix in (
        "complete() + biases (L=3",
        "complete() + biases (L=2",
        "ALS",
        "deep (compressed",
        "shallow",
    ):
        chosen.append(min((r for r in runs if r.model.startswith(prefix)), key=lambda r: r.val_rmse))
    chosen += [
        r for r in runs if r.model.startswith(("surprise", "mean model", "soft-impute", "global mean"))
    ]
    return chosen


# ---------------------------------------------------------------------------------------- write

ALL_RUNS_COLUMNS = [
    "model",
    "rank",
    "best validation RMSE",
    "test RMSE (fit on 80%, at best)",
    "best iteration",
    "iterations run",
    "status",
    "fit time (s)",
    "test RMSE (refit on 90%)",
    "refit time (s)",
]


def setting_notes(cfg: Config, commit: str | None, surprise_note: str) -> str:
    """The protocol and the settings, as run (no reading of the numbers: that is in docs/)."""
    return (
        f"Command: `{cfg.command}` (git commit {commit}). "
        "MovieLens 100K (943 users x 1682 items), seeded 90/10 split of the ratings (tlr.data.load_movielens_100k, "
        "seed 0). Protocol: 1/9 of the training ratings (10% of all) held out as validation; every model is fitted "
        "on the other 80%, its hyper-parameters (rank / r_hat, depth, weight decay, ALS ridge, soft-impute lam) and "
        "its number of iterations (early stopping: the iteration of the best validation RMSE) are chosen by "
        "validation RMSE; then the chosen setting is refitted on all training ratings (90%) for that same number "
        "of iterations (GD; mean-reduced loss, so the step means the same with more ratings) or sweeps (ALS, 30) "
        "and evaluated on the test ratings once: the 'test RMSE (refit on 90%)' column; 'test RMSE (fit on 80%)' is "
        "the model selected on validation, before the refit. RMSE in rating units, predictions not clipped "
        "(surprise clips to 1..5). complete() rows: the data passed raw in rating units; user / item biases fitted "
        f"jointly with the compressed network (ridge bias_reg {cfg.complete_bias_reg:g}), init scale "
        f"{cfg.complete_init_scale:g}, adaptive step (complete()'s default; no polish with a validation set), "
        f"validation every {cfg.complete_eval_every} iterations, patience {cfg.complete_patience}, "
        f"at most {cfg.max_iters} iterations, weight decay (from the escape on) in complete()'s normalised units. The "
        "refit runs a fixed budget by design, so its status is not_converged. The grid of complete() settings was "
        "narrowed in side runs that also printed test RMSEs (depth 3 with r_hat 5-20, weight decay 0-3e-6, init "
        "1e-3 / 1e-2, bias_reg 5 / 15; depth 2 with weight decay 5e-7-1e-5); within this script the choice is by "
        "validation only. Raw deep / shallow rows: no bias terms, globally centred ratings, fixed step "
        f"{cfg.lr_raw}, init scale {cfg.init_scale_raw}, validation every 100 iterations, patience 10. Soft-impute "
        "keeps at most 40 singular triplets and runs 25 warm-started iterations per lam (a budget, not convergence). "
        + surprise_note
    )


def write(cfg: Config, split: Split, runs: Runs, commit: str | None, wall: float) -> Result:
    chosen = select(runs.runs)
    metrics = {f"test_rmse_refit[{r.model}]": r.test_rmse_refit for r in chosen}
    metrics.update({f"test_rmse_fit80[{r.model}]": r.test_rmse_fit80 for r in chosen})
    tables = [
        Table(
            "Chosen models (validation-selected) and their test RMSE",
            [
                "model",
                "rank / setting",
                "validation RMSE",
                "test RMSE (fit on 80%)",
                "test RMSE (refit on 90%)",
            ],
            [[r.model, r.rank, r.val_rmse, r.test_rmse_fit80, r.test_rmse_refit] for r in chosen],
        ),
        Table("All runs", ALL_RUNS_COLUMNS, [r.cells() for r in runs.runs]),
        Table(
            "Soft-impute path (fit on 80%)",
            ["lam / spectral norm of P(M)", "lam", "rank", "validation RMSE", "test RMSE", "time (s)"],
            [list(dataclasses.astuple(s)) for s in runs.soft_impute_path],
        ),
    ]
    global_mean_val = global_mean_rmse(split.val, float(split.fit[2].mean()))
    plot = Plot(
        "validation",
        "Validation RMSE during training",
        "line",
        runs.curves,
        "iteration",
        "RMSE",
        hlines={"global mean": global_mean_val},
    )
    config = {
        "test_fraction": cfg.test_fraction,
        "validation_fraction_of_all": 0.1,
        "init_scale_raw": cfg.init_scale_raw,
        "lr_raw": cfg.lr_raw,
        "max_iters": cfg.max_iters,
        "complete_configs": [list(c) for c in cfg.complete_configs],
        "complete_bias_reg": cfg.complete_bias_reg,
        "complete_init_scale": cfg.complete_init_scale,
        "soft_impute_lams": list(cfg.soft_impute_lams),
        "gamma": cfg.gamma,
        "quick": cfg.quick,
        "command": cfg.command,
        "git_commit": commit,
    }
    return Result(
        "movielens",
        config,
        [cfg.seed],
        metrics,
        {},
        tables,
        [plot],
        setting_notes(cfg, commit, runs.surprise_note),
        wall,
        environment_info(),
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    cfg = Config.make(quick, seed)
    with one_thread():
        t0 = time.perf_counter()
        seed_everything(seed)
        split = load_split(cfg)
        runs = train_all(cfg, split, progress)
        return write(cfg, split, runs, git_commit(), time.perf_counter() - t0)
