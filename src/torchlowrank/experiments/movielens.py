"""movielens: MovieLens 100K rating prediction with the compressed deep factorization, a shallow
(depth-2, width-r) factorization and soft-impute; rank / regularisation and early stopping chosen on
a validation split carved from the training ratings, test RMSE reported once."""
from __future__ import annotations

import time

import torch

from ..reproducibility import environment_info, seed_everything
from ..results import Plot, Result, Series, Table
from .registry import register_experiment

EPS, LR = 1e-2, 60.0  # see the notes: at eps = 1e-3 nothing escapes the origin within the budget


@register_experiment("movielens", "MovieLens 100K: compressed deep factorization vs shallow factorization vs soft-impute")
def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    from ..data import load_movielens_100k
    from ..matrix import Completion, CompressedFactorization, DeepFactorization, soft_impute, train_gd

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
    max_iters = 1500 if quick else 6000
    deep_ranks = [5] if quick else [2, 5, 10]
    shallow_ranks = [5] if quick else [2, 5, 10, 20]
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

    for rank in deep_ranks:
        fit("deep (compressed, L=3)", rank)
    for rank in shallow_ranks:
        fit("shallow (L=2, width r)", rank)

    # soft-impute on a path of decreasing lam (warm starts), lam relative to ||P_Omega(M)||_2
    M_obs = problem.observed_matrix()
    mask = problem.mask().bool()
    s1 = float(torch.linalg.matrix_norm(M_obs, ord=2))
    fracs = [0.2, 0.1] if quick else [0.4, 0.3, 0.2, 0.12, 0.08]
    Z = None
    si_rows = []
    vu, vit, vv = val
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the compressed-completion notes: a shared machine
    for f in fracs:
        ts = time.perf_counter()
        Z = soft_impute(M_obs, mask, lam=f * s1, max_rank=40, max_iters=10 if quick else 25, tol=1e-4, init=Z)
        v = float((Z[vu, vit] - vv).square().mean().sqrt())
        te = float((Z[tu, ti] - test[2]).square().mean().sqrt())
        si_rows.append([f, f * s1, int((torch.linalg.svdvals(Z) > 1e-8).sum()), v, te, time.perf_counter() - ts])
    torch.set_num_threads(threads)
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
        "once (no refit on train + validation). Soft-impute keeps at most 40 singular triplets and runs 25 "
        "warm-started iterations per lam (a budget, not convergence). Deviation from the synthetic runs: init scale 1e-2 instead "
        "of 1e-3 (at 1e-3 and any stable step we tried, the validation RMSE had not left the global-mean level "
        "after 6000 iterations), and no user/item bias terms in any model.")
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
