"""dmf-invariance: the invariant-subspace theorem of deep matrix factorization, measured.

Gradient descent (sum-reduced loss + weight decay) on a width-d depth-3 factorization of a rank-r
target from orthogonal init: every factor keeps d - 2r singular values equal to the scalar
recursion rho(t+1) = rho(t) (1 - lr wd - lr rho(t)^4) and its singular subspaces outside the 2r
block fixed. The same measurements on matrix completion (where the theorem is not claimed) show
how far it is from exact there.
"""

from __future__ import annotations

import time

import torch

from ..reproducibility import environment_info, seed_everything
from ..results import Plot, Result, Series, Table

DESCRIPTION = "Deep factorization: d - 2r singular values follow rho(t), outer subspaces stay fixed"


def _measure(problem, d, r, L, eps, lr, wd, steps, seed, U_M, V_M, keep_svals=True):
    from ..linalg import principal_angles
    from ..matrix import DeepFactorization, invariant_bases, rho_trajectory, train_gd

    model = DeepFactorization(
        (d, d), depth=L, init_scale=eps, generator=torch.Generator().manual_seed(seed + 1)
    )
    Us, Vs, k = invariant_bases(model, U_M, V_M)
    rho = rho_trajectory(eps, lr, L, steps, problem.scale, wd)
    rec = {"t": [], "dev": [], "abs": [], "angle": [], "svals": [], "err": []}

    def cb(t, m):
        dev, ang, nrm = 0.0, 0.0, 0.0
        for l, W in enumerate(m.factors):
            W = W.detach()
            nrm = max(nrm, float(torch.linalg.matrix_norm(W, ord=2)))
            img = W @ Vs[l][:, k:]
            dev = max(
                dev,
                float((img - rho[t] * Us[l][:, k:]).abs().max()),
                float((Us[l][:, k:].T @ W - rho[t] * Vs[l][:, k:].T).abs().max()),
            )
            ang = max(
                ang,
                float(principal_angles(img, Us[l][:, k:]).max()),
                float(principal_angles((Us[l][:, k:].T @ W).T, Vs[l][:, k:]).max()),
            )
        rec["t"].append(t)
        rec["dev"].append(dev / float(rho[t]))
        rec["abs"].append(dev / nrm)
        rec["angle"].append(ang)
        if keep_svals:
            rec["svals"].append(torch.linalg.svdvals(m.factors[0].detach()).tolist())
        rec["err"].append(problem.recovery_error(m.end_to_end()))

    h = train_gd(
        model, problem, lr, max_iters=steps, weight_decay=wd, eval_every=1, check_every=1, callback=cb
    )
    return rec, rho, k, h


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    from ..matrix import Completion, Factorization, low_rank_target, random_mask

    t0 = time.perf_counter()
    seed_everything(seed)
    d, r, L = (20, 2, 3) if quick else (40, 3, 3)
    eps, lr, wd = 0.3, 0.02, 0.5
    steps = 300 if quick else 800
    g = torch.Generator().manual_seed(seed)
    M = low_rank_target((d, d), r, generator=g)
    U, _, Vh = torch.linalg.svd(M)
    U_M, V_M = U[:, :r], Vh[:r].T
    fact = Factorization(M, reduction="sum")
    rec_f, rho, k, h_f = _measure(fact, d, r, L, eps, lr, wd, steps, seed, U_M, V_M)
    comp = Completion(M, random_mask((d, d), 0.5, generator=g), reduction="sum", truth=M)
    rec_c, _, _, h_c = _measure(comp, d, r, L, eps, 2 * lr, wd, steps, seed, U_M, V_M, keep_svals=False)

    svals = torch.tensor(rec_f["svals"], dtype=torch.float64)  # (T+1, d)
    ts = rec_f["t"]
    sv_series = [Series(f"sigma_{i + 1}(W_1)" if i < k else "", ts, svals[:, i].tolist()) for i in range(d)]
    sv_series.append(Series("rho(t) (recursion)", list(range(steps + 1)), rho.tolist(), style="k--"))
    # sigma closest to rho, per step: the d - 2r complement values
    # the d - 2r singular values nearest rho(t), relative to rho(t): the theorem says all equal it
    gaps = ((svals - rho[: svals.shape[0], None]).abs() / rho[: svals.shape[0], None]).sort(dim=1).values
    max_sv_dev = float(gaps[:, : d - k].max())
    metrics = {
        "block_dim_2r": k,
        "factorization_max_rel_deviation": max(rec_f["dev"]),
        "factorization_max_deviation_over_norm": max(rec_f["abs"]),
        "factorization_max_angle_rad": max(rec_f["angle"]),
        "factorization_max_rel_sigma_minus_rho": max_sv_dev,
        "factorization_final_recovery_error": rec_f["err"][-1],
        "completion_max_rel_deviation": max(rec_c["dev"]),
        "completion_max_deviation_over_norm": max(rec_c["abs"]),
        "completion_max_angle_rad": max(rec_c["angle"]),
        "rho_final": float(rho[-1]),
    }
    table = Table(
        "Largest deviation from the theorem over all steps and factors",
        [
            "problem",
            "steps",
            "lr",
            "max deviation / rho (see notes)",
            "max deviation / largest factor norm",
            "max principal angle (rad)",
            "final recovery error",
        ],
        [
            [
                "factorization (theorem)",
                steps,
                lr,
                max(rec_f["dev"]),
                max(rec_f["abs"]),
                max(rec_f["angle"]),
                rec_f["err"][-1],
            ],
            [
                "completion, 50% observed",
                steps,
                2 * lr,
                max(rec_c["dev"]),
                max(rec_c["abs"]),
                max(rec_c["angle"]),
                rec_c["err"][-1],
            ],
        ],
    )
    plots = [
        Plot(
            "singular_values",
            f"Singular values of W_1 (d={d}, r={r}, L={L}) and rho(t)",
            "line",
            sv_series,
            "iteration",
            "singular value",
            logy=True,
        ),
        Plot(
            "deviation",
            "Deviation of the complement block from rho(t) U V^T (relative)",
            "line",
            [
                Series("factorization", rec_f["t"], [max(x, 1e-17) for x in rec_f["dev"]]),
                Series("completion", rec_c["t"], [max(x, 1e-17) for x in rec_c["dev"]]),
            ],
            "iteration",
            "max entry of W_l V_perp - rho U_perp, / rho",
            logy=True,
        ),
        Plot(
            "angles",
            "Largest principal angle: complement subspaces at t vs t = 0",
            "line",
            [
                Series("factorization", rec_f["t"], [max(x, 1e-17) for x in rec_f["angle"]]),
                Series("completion", rec_c["t"], [max(x, 1e-17) for x in rec_c["angle"]]),
            ],
            "iteration",
            "radians",
            logy=True,
        ),
    ]
    notes = (
        f"Loss c/2 ||Phi - M||_F^2 + wd/2 sum ||W_l||_F^2 with c = 1 (sum reduction), wd = {wd}, lr = {lr}, "
        f"eps = {eps} (large enough for rho to move visibly). The theorem predicts W_l(t) = U_l diag(W~_l(t), "
        "rho(t) I) V_l^T with U_l, V_l fixed at t = 0 (V_1 = [orth(V_M, O^T U_M), complement], U_l = O_l V_l, "
        "V_{l+1} = U_l) and rho(t+1) = rho(t)(1 - lr wd - lr rho(t)^(2(L-1))). Measured every step: the largest "
        "entry of W_l V_perp - rho U_perp and of U_perp^T W_l - rho V_perp^T (relative to rho), and the largest "
        "principal angle between span(W_l V_perp) and span(U_perp); the deviation is also given relative to the largest factor norm (round-off is absolute, so relative to a shrinking rho it grows). For factorization both stay at float64 "
        "round-off; for completion (not covered by the theorem: the gradient P_Omega(Phi - M) is full rank) "
        "the complement block moves, which is why the compressed network needs trainable outer factors "
        "(gamma > 0) there."
    )
    return Result(
        "dmf-invariance",
        {
            "d": d,
            "r": r,
            "depth": L,
            "init_scale": eps,
            "lr": lr,
            "weight_decay": wd,
            "steps": steps,
            "completion_fraction": 0.5,
            "quick": quick,
        },
        [seed],
        metrics,
        {"rho": rho.tolist(), "factorization_dev": rec_f["dev"], "completion_dev": rec_c["dev"]},
        [table],
        plots,
        notes,
        time.perf_counter() - t0,
        environment_info(),
    )
