"""movielens: MovieLens 100K rating prediction with ``tlr.matrix.complete`` (compressed deep
factorization with jointly fitted user / item biases), the raw compressed network and a shallow
(depth-2, width-r) factorization without biases, soft-impute, ridge ALS on the bias-centred
ratings, and scikit-surprise's BaselineOnly / SVD / SVD++ on the same split in the same script
(skipped with a note when scikit-surprise is not installed). Rank / regularisation and early
stopping chosen on a validation split carved from the training ratings, test RMSE reported once."""
from __future__ import annotations

import time
import warnings

import torch

from ..reproducibility import environment_info, one_thread, seed_everything
from ..results import Plot, Result, Series, Table
from .registry import register_experiment

EPS, LR = 1e-2, 60.0  # see the notes: at eps = 1e-3 nothing escapes the origin within the budget


def _surprise_rows(train, val, test, quick: bool, seed: int) -> tuple[list, str]:
    """BaselineOnly / SVD / SVD++ (scikit-surprise defaults, seeded) fitted on the same training
    ratings (train minus validation); returns table rows and a note."""
    try:
        import pandas as pd
        from surprise import SVD, BaselineOnly, Dataset, Reader, SVDpp
    except ImportError as exc:
        return [], (f"scikit-surprise (or pandas) is not installed ({exc}); its baselines were skipped: "
                    "pip install scikit-surprise")
    u, i, r = train
    df = pd.DataFrame({"u": u.tolist(), "i": i.tolist(), "r": r.tolist()})
    ts = Dataset.load_from_df(df, Reader(rating_scale=(1, 5))).build_full_trainset()
    algos = [("surprise BaselineOnly", lambda: BaselineOnly(verbose=False)),
             ("surprise SVD", lambda: SVD(random_state=seed))]
    if not quick:
        algos.append(("surprise SVD++", lambda: SVDpp(random_state=seed)))
    rows = []
    for name, make in algos:
        t0 = time.perf_counter()
        algo = make()
        algo.fit(ts)
        fit_t = time.perf_counter() - t0

        def rmse(entries):
            uu, ii, rr = entries
            pred = torch.tensor([algo.predict(a, b).est for a, b in zip(uu.tolist(), ii.tolist())], dtype=torch.float64)
            return float((pred - rr.double()).square().mean().sqrt())

        rows.append([name, "defaults", rmse(val), rmse(test), None, None, "fitted (library defaults)", fit_t])
    import surprise

    note = (f"scikit-surprise {surprise.__version__}, library defaults (SVD / SVD++ random_state={seed}), fitted on "
            "the same training ratings (validation held out), predictions clipped to 1..5 by surprise.")
    if quick:
        note += " Quick mode skips SVD++ (slow)."
    return rows, note


@register_experiment("movielens", "MovieLens 100K: complete() with biases vs compressed / shallow factorization vs "
                     "soft-impute vs ALS vs scikit-surprise (BaselineOnly, SVD, SVD++)")
def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    with one_thread():
        return _run(quick, seed, progress)


def _run(quick: bool, seed: int, progress: bool | None) -> Result:
    from ..data import load_movielens_100k
    from ..matrix import Completion, CompressedFactorization, DeepFactorization, als, complete, soft_impute, train_gd

    t0 = time.perf_counter()
    seed_everything(seed)
    data = load_movielens_100k(test_fraction=0.1, seed=seed)
    u, i, r = data.train
    n = len(r)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_val = n // 9  # 10% of all ratings: train 80 / validation 10 / test 10
    vi, fi = perm[:n_val], perm[n_val:]
    mu = float(r[fi].double().mean())
    shape = (data.n_users, data.n_items)
    tu, ti, tr = data.test
    test = (tu, ti, tr.double() - mu)
    val = (u[vi], i[vi], r[vi].double() - mu)
    problem = Completion.from_entries(u[fi], i[fi], r[fi].double() - mu, shape, test=test)
    max_iters = 1500 if quick else 4000
    deep_ranks = [5] if quick else [5]
    shallow_ranks = [5] if quick else [5]
    rows, curves = [], []

    def fit(kind, rank):
        gen = torch.Generator().manual_seed(seed + 2)
        if kind == "deep (compressed, L=3)":
            model = CompressedFactorization.from_problem(problem, rank, depth=3, init_scale=EPS, gamma=0.01,
                                                         generator=gen)
        else:
            model = DeepFactorization(shape, depth=2, width=rank, init_scale=EPS, generator=gen)
        h = train_gd(model, problem, LR, max_iters=max_iters, eval_every=100, validation=val, patience=10,
                     progress=progress)
        k = h.iterations.index(h.best_iteration)
        rows.append([kind, rank, min(h.val_rmse), h.test_rmse[k], h.best_iteration, h.n_iters, h.status,
                     h.train_time])
        curves.append(Series(f"{kind}, r={rank} (val)", h.iterations, h.val_rmse))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # statuses are in the table
        for rank in deep_ranks:
            fit("deep (compressed, L=3)", rank)
        for rank in shallow_ranks:
            fit("shallow (L=2, width r)", rank)

    # complete(): jointly fitted user / item biases (ridge bias_reg, in ratings), units normalised
    raw_val = (u[vi], i[vi], r[vi].double())
    raw_test = (tu, ti, tr.double())
    M_raw = torch.zeros(shape, dtype=torch.float64)
    mask_fit = torch.zeros(shape, dtype=torch.bool)
    M_raw[u[fi], i[fi]] = r[fi].double()
    mask_fit[u[fi], i[fi]] = True
    configs = [(10, 5.0, 1e-2)] if quick else [(5, 5.0, 1e-2), (10, 5.0, 1e-2)]
    for rk, breg, eps in configs:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            ts = time.perf_counter()
            res = complete(M_raw, mask_fit, rank=rk, bias_reg=breg, init_scale=eps, validation=raw_val,
                           test=raw_test, patience=10, eval_every=100, max_iters=max_iters, progress=progress)
        h = res.history
        k = h.iterations.index(h.best_iteration) if h.best_iteration is not None else -1
        rows.append([f"complete() + biases (L=3, bias_reg={breg:g}, eps={eps:g})", rk, min(h.val_rmse), h.test_rmse[k],
                     h.best_iteration, h.n_iters, h.status, time.perf_counter() - ts])
        curves.append(Series(f"complete() r_hat={rk} bias_reg={breg:g} (val)", h.iterations, h.val_rmse))

    # ridge ALS on the bias-centred ratings (biases from complete()'s mean model fit, reg 5)
    from ..matrix import fit_mean_model

    mm = fit_mean_model(u[fi], i[fi], r[fi].double(), shape, reg=5.0)
    C = torch.where(mask_fit, M_raw - mm.dense(), torch.zeros(()))
    als_rows = []
    for reg in ([0.3] if quick else [0.1, 0.3, 1.0]):
        ts = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            a = als(C, mask_fit, 10, reg=reg, max_iters=10 if quick else 30)
        pred = a.matrix + mm.dense()
        v_ = float((pred[raw_val[0], raw_val[1]] - raw_val[2]).square().mean().sqrt())
        t_ = float((pred[tu, ti] - raw_test[2]).square().mean().sqrt())
        als_rows.append([f"ALS + biases (rank 10, reg {reg:g} x ||P(M)||_2)", 10, v_, t_, None, a.n_iters, a.status,
                         time.perf_counter() - ts])
    rows.extend(als_rows)
    mm_pred = mm.dense()
    rows.append(["mean model (mu + user + item bias, reg 5)", "-",
                 float((mm_pred[raw_val[0], raw_val[1]] - raw_val[2]).square().mean().sqrt()),
                 float((mm_pred[tu, ti] - raw_test[2]).square().mean().sqrt()), None, None, "-", 0.0])
    sur_rows, sur_note = _surprise_rows((u[fi], i[fi], r[fi]), raw_val, raw_test, quick, seed)
    rows.extend(sur_rows)

    # soft-impute on a path of decreasing lam (warm starts), lam relative to ||P_Omega(M)||_2
    M_obs = problem.observed_matrix()
    mask = problem.mask().bool()
    s1 = float(torch.linalg.matrix_norm(M_obs, ord=2))
    fracs = [0.2, 0.1] if quick else [0.4, 0.3, 0.2, 0.12, 0.08]
    Z = None
    si_rows = []
    vu, vit, vv = val
    for f in fracs:
        ts = time.perf_counter()
        Z = soft_impute(M_obs, mask, lam=f * s1, max_rank=40, max_iters=10 if quick else 25, tol=1e-4, init=Z,
                        warn=False)
        v = float((Z[vu, vit] - vv).square().mean().sqrt())
        te = float((Z[tu, ti] - test[2]).square().mean().sqrt())
        si_rows.append([f, f * s1, int((torch.linalg.svdvals(Z) > 1e-8).sum()), v, te, time.perf_counter() - ts])
    best_si = min(si_rows, key=lambda x: x[3])
    rows.append(["soft-impute", f"lam={best_si[1]:.3g} (rank {best_si[2]})", best_si[3], best_si[4], None, None,
                 "chosen on validation", sum(x[5] for x in si_rows)])
    mean_rmse_val = float(vv.square().mean().sqrt())
    mean_rmse_test = float(test[2].square().mean().sqrt())
    rows.append(["global mean", "-", mean_rmse_val, mean_rmse_test, None, None, "-", 0.0])

    def best_of(kind):
        cand = [x for x in rows if x[0] == kind]
        return min(cand, key=lambda x: x[2])

    sel = []
    for kind in ("deep (compressed, L=3)", "shallow (L=2, width r)"):
        b = best_of(kind)
        sel.append([kind, b[1], b[2], b[3]])
    ours = min((x for x in rows if str(x[0]).startswith("complete()")), key=lambda x: x[2])
    sel.append([ours[0], ours[1], ours[2], ours[3]])
    b = min((x for x in rows if str(x[0]).startswith("ALS")), key=lambda x: x[2])
    sel.append([b[0], b[1], b[2], b[3]])
    for x in rows:
        if str(x[0]).startswith("surprise") or str(x[0]).startswith("mean model"):
            sel.append([x[0], x[1], x[2], x[3]])
    sel.append(["soft-impute", f"lam={best_si[1]:.3g}", best_si[3], best_si[4]])
    sel.append(["global mean", "-", mean_rmse_val, mean_rmse_test])
    metrics = {f"test_rmse[{s[0]}]": s[3] for s in sel}
    notes = (
        "MovieLens 100K (943 users x 1682 items), seeded 90/10 split of the ratings (tlr.data.load_movielens_100k, "
        "seed 0); 1/9 of the training ratings (10% of all) held out as validation. Ratings centred by the "
        f"training mean ({mu:.3f}); RMSE in rating units, predictions not clipped. Deep and shallow models: "
        f"full-batch GD, mean-reduced loss, step {LR}, init scale {EPS}, validation RMSE every 100 iterations, "
        "early stopping after 10 evaluations without improvement (best parameters kept, at most "
        f"{max_iters} iterations); the rank (r_hat for the compressed network, width for the shallow one) and "
        "soft-impute's lam are chosen by validation RMSE, and the test RMSE of the chosen model is reported "
        "(complete() rows: the data passed raw in rating units; complete() fits user / item biases jointly with "
        "the compressed network, ridge bias_reg in units of ratings, and reports RMSEs in rating units) "
        "once (no refit on train + validation). Soft-impute keeps at most 40 singular triplets and runs 25 "
        "warm-started iterations per lam (a budget, not convergence). Deviation from the synthetic runs: init scale 1e-2 instead "
        "of 1e-3 (at 1e-3 and any stable step we tried, the validation RMSE had not left the global-mean level "
        "after 6000 iterations); the raw deep / shallow rows have no user/item bias terms. "
        f"Command: `torchlowrank reproduce movielens --out docs/results/movielens`{' --quick' if quick else ''}. "
        + sur_note)
    tables = [Table("Chosen models (validation-selected) and their test RMSE",
                    ["model", "rank / lam", "validation RMSE", "test RMSE"], sel),
              Table("All runs", ["model", "rank", "best validation RMSE", "test RMSE at best", "best iteration",
                                 "iterations run", "status", "train time (s)"], rows),
              Table("Soft-impute path", ["lam / spectral norm of P(M)", "lam", "rank", "validation RMSE", "test RMSE",
                                         "time (s)"], si_rows)]
    plots = [Plot("validation", "Validation RMSE during training", "line", curves, "iteration", "RMSE",
                  hlines={"global mean": mean_rmse_val})]
    return Result("movielens", {"test_fraction": 0.1, "validation_fraction_of_all": 0.1, "init_scale": EPS,
                                "lr": LR, "max_iters": max_iters, "deep_ranks": deep_ranks,
                                "shallow_ranks": shallow_ranks, "soft_impute_lams": fracs, "gamma": 0.01,
                                "quick": quick},
                  [seed], metrics, {}, tables, plots, notes, time.perf_counter() - t0, environment_info())
