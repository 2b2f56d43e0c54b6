"""dmf-invariance: the invariant-subspace theorem of deep matrix factorization, measured.

Gradient descent (sum-reduced loss + weight decay) on a width-d depth-3 factorization of a rank-r
target from orthogonal init: every factor keeps d - 2r singular values equal to the scalar
recursion rho(t+1) = rho(t) (1 - lr wd - lr rho(t)^4) and its singular subspaces outside the 2r
block fixed. The same measurements on matrix completion (where the theorem is not claimed) show
how far it is from exact there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..reproducibility import environment_info, seed_everything
from ..results import Plot, Result, Series, Table

DESCRIPTION = "Deep factorization: d - 2r singular values follow rho(t), outer subspaces stay fixed"


# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    quick: bool = False
    seed: int = 0
    d: int = 40
    r: int = 3
    depth: int = 3
    eps: float = 0.3  # init scale: large enough for rho to move visibly
    lr: float = 0.02  # completion runs at 2 lr
    wd: float = 0.5
    steps: int = 800
    completion_fraction: float = 0.5

    @classmethod
    def make(cls, quick: bool, seed: int) -> Config:
        return cls(quick=True, seed=seed, d=20, r=2, steps=300) if quick else cls(seed=seed)


# -------------------------------------------------------------------------------------- measure


@dataclass
class Recorder:
    """Called after every GD step: the complement block's deviation from rho(t) U V^T and its angles."""

    problem: object
    Us: list
    Vs: list
    k: int  # dimension of the 2r block
    rho: torch.Tensor
    keep_svals: bool = True
    t: list = field(default_factory=list)
    dev: list = field(default_factory=list)  # max deviation / rho(t)
    abs: list = field(default_factory=list)  # max deviation / largest factor norm
    angle: list = field(default_factory=list)
    svals: list = field(default_factory=list)  # singular values of W_1
    err: list = field(default_factory=list)

    def __call__(self, t, m) -> None:
        from ..linalg import principal_angles

        dev, ang, nrm, k = 0.0, 0.0, 0.0, self.k
        for l, W in enumerate(m.factors):
            W = W.detach()
            U, V = self.Us[l][:, k:], self.Vs[l][:, k:]
            nrm = max(nrm, float(torch.linalg.matrix_norm(W, ord=2)))
            img = W @ V
            dev = max(
                dev,
                float((img - self.rho[t] * U).abs().max()),
                float((U.T @ W - self.rho[t] * V.T).abs().max()),
            )
            ang = max(
                ang, float(principal_angles(img, U).max()), float(principal_angles((U.T @ W).T, V).max())
            )
        self.t.append(t)
        self.dev.append(dev / float(self.rho[t]))
        self.abs.append(dev / nrm)
        self.angle.append(ang)
        if self.keep_svals:
            self.svals.append(torch.linalg.svdvals(m.factors[0].detach()).tolist())
        self.err.append(self.problem.recovery_error(m.end_to_end()))


def _measure(problem, cfg: Config, lr: float, U_M, V_M, keep_svals=True) -> Recorder:
    from ..matrix import DeepFactorization, invariant_bases, rho_trajectory, train_gd

    d = cfg.d
    model = DeepFactorization(
        (d, d), depth=cfg.depth, init_scale=cfg.eps, generator=torch.Generator().manual_seed(cfg.seed + 1)
    )
    Us, Vs, k = invariant_bases(model, U_M, V_M)
    rho = rho_trajectory(cfg.eps, lr, cfg.depth, cfg.steps, problem.scale, cfg.wd)
    rec = Recorder(problem, Us, Vs, k, rho, keep_svals)
    train_gd(
        model,
        problem,
        lr,
        max_iters=cfg.steps,
        weight_decay=cfg.wd,
        eval_every=1,
        check_every=1,
        callback=rec,
    )
    return rec


# ---------------------------------------------------------------------------------------- write


def metrics_of(rec_f: Recorder, rec_c: Recorder, cfg: Config) -> dict:
    svals = torch.tensor(rec_f.svals, dtype=torch.float64)  # (T+1, d)
    rho = rec_f.rho
    # the d - 2r singular values nearest rho(t), relative to rho(t): the theorem says all equal it
    gaps = ((svals - rho[: svals.shape[0], None]).abs() / rho[: svals.shape[0], None]).sort(dim=1).values
    return {
        "block_dim_2r": rec_f.k,
        "factorization_max_rel_deviation": max(rec_f.dev),
        "factorization_max_deviation_over_norm": max(rec_f.abs),
        "factorization_max_angle_rad": max(rec_f.angle),
        "factorization_max_rel_sigma_minus_rho": float(gaps[:, : cfg.d - rec_f.k].max()),
        "factorization_final_recovery_error": rec_f.err[-1],
        "completion_max_rel_deviation": max(rec_c.dev),
        "completion_max_deviation_over_norm": max(rec_c.abs),
        "completion_max_angle_rad": max(rec_c.angle),
        "rho_final": float(rho[-1]),
    }


def table_of(rec_f: Recorder, rec_c: Recorder, cfg: Config) -> Table:
    rows = [
        [label, cfg.steps, lr, max(rec.dev), max(rec.abs), max(rec.angle), rec.err[-1]]
        for label, lr, rec in (
            ("factorization (theorem)", cfg.lr, rec_f),
            ("completion, 50% observed", 2 * cfg.lr, rec_c),
        )
    ]
    return Table(
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
        rows,
    )


def plots_of(rec_f: Recorder, rec_c: Recorder, cfg: Config) -> list[Plot]:
    svals = torch.tensor(rec_f.svals, dtype=torch.float64)  # (T+1, d)
    k, ts = rec_f.k, rec_f.t
    sv_series = [
        Series(f"sigma_{i + 1}(W_1)" if i < k else "", ts, svals[:, i].tolist()) for i in range(cfg.d)
    ]
    sv_series.append(
        Series("rho(t) (recursion)", list(range(cfg.steps + 1)), rec_f.rho.tolist(), style="k--")
    )

    def both(key: str) -> list[Series]:
        return [
            Series(label, rec.t, [max(x, 1e-17) for x in getattr(rec, key)])
            for label, rec in (("factorization", rec_f), ("completion", rec_c))
        ]

    return [
        Plot(
            "singular_values",
            f"Singular values of W_1 (d={cfg.d}, r={cfg.r}, L={cfg.depth}) and rho(t)",
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
            both("dev"),
            "iteration",
            "max entry of W_l V_perp - rho U_perp, / rho",
            logy=True,
        ),
        Plot(
            "angles",
            "Largest principal angle: complement subspaces at t vs t = 0",
            "line",
            both("angle"),
            "iteration",
            "radians",
            logy=True,
        ),
    ]


def setting_notes(cfg: Config) -> str:
    """The setting and what is measured (no reading of the numbers: that is in docs/)."""
    return (
        f"Loss c/2 ||Phi - M||_F^2 + wd/2 sum ||W_l||_F^2 with c = 1 (sum reduction), wd = {cfg.wd}, lr = {cfg.lr}, "
        f"eps = {cfg.eps} (large enough for rho to move visibly). The theorem predicts W_l(t) = U_l diag(W~_l(t), "
        "rho(t) I) V_l^T with U_l, V_l fixed at t = 0 (V_1 = [orth(V_M, O^T U_M), complement], U_l = O_l V_l, "
        "V_{l+1} = U_l) and rho(t+1) = rho(t)(1 - lr wd - lr rho(t)^(2(L-1))). Measured every step: the largest "
        "entry of W_l V_perp - rho U_perp and of U_perp^T W_l - rho V_perp^T (relative to rho), and the largest "
        "principal angle between span(W_l V_perp) and span(U_perp); the deviation is also given relative to the "
        "largest factor norm (round-off is absolute, so relative to a shrinking rho it grows). Completion is not "
        "covered by the theorem (the gradient P_Omega(Phi - M) is full rank)."
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    from ..matrix import Completion, Factorization, low_rank_target, random_mask

    cfg = Config.make(quick, seed)
    t0 = time.perf_counter()
    seed_everything(seed)
    d, r = cfg.d, cfg.r
    g = torch.Generator().manual_seed(seed)
    M = low_rank_target((d, d), r, generator=g)
    U, _, Vh = torch.linalg.svd(M)
    U_M, V_M = U[:, :r], Vh[:r].T
    rec_f = _measure(Factorization(M, reduction="sum"), cfg, cfg.lr, U_M, V_M)
    mask = random_mask((d, d), cfg.completion_fraction, generator=g)
    comp = Completion(M, mask, reduction="sum", truth=M)
    rec_c = _measure(comp, cfg, 2 * cfg.lr, U_M, V_M, keep_svals=False)
    config = {
        "d": d,
        "r": r,
        "depth": cfg.depth,
        "init_scale": cfg.eps,
        "lr": cfg.lr,
        "weight_decay": cfg.wd,
        "steps": cfg.steps,
        "completion_fraction": cfg.completion_fraction,
        "quick": quick,
    }
    return Result(
        "dmf-invariance",
        config,
        [seed],
        metrics_of(rec_f, rec_c, cfg),
        {"rho": rec_f.rho.tolist(), "factorization_dev": rec_f.dev, "completion_dev": rec_c.dev},
        [table_of(rec_f, rec_c, cfg)],
        plots_of(rec_f, rec_c, cfg),
        setting_notes(cfg),
        time.perf_counter() - t0,
        environment_info(),
    )
