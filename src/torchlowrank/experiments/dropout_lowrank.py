"""``dropout-lowrank``: dropout on the hidden units of a factorized linear model is singular-value
thresholding (DESIGN §4.7, Mianjy, Arora & Vidal 2018; Cavazza et al. 2018), checked on real data.

Setup (exact statement). Data: scikit-learn digits, all 1797 images; input x = the top 4 pixel rows
(32 pixels), centred and PCA-whitened so that X^T X / n = I (d = 31 directions with non-zero
variance); target y = the bottom 4 rows (32 pixels), centred and scaled to unit overall std.
Model: y_hat = U diag(m / theta) V^T x with U (32 x k), V (d x k), k = 16 hidden units and a fresh
Bernoulli(theta) mask m per sample and unit. Loss: mean over samples of ||y - y_hat||^2.

Over the masks, E[loss] = ||M - U V^T||_F^2 + lambda * sum_i ||u_i||^2 ||v_i||^2 + const with
M = Y^T X / n (the least-squares map) and lambda = (1 - theta) / theta (whitening turns
||X^T v_i||^2 / n into ||v_i||^2). The regularizer's minimum over width-k factorizations of W is
(lambda / k) ||W||_*^2, so the global minimum W* has the singular vectors of M and singular values
s_i(W*) = (s_i(M) - kappa)_+ for i <= r, 0 beyond, with kappa = (lambda / k) ||W*||_*, i.e.
kappa = lambda * (s_1 + ... + s_r)(M) / (k + lambda r), r = the largest j <= k with s_j(M) > kappa_j.

Three solutions per keep probability: the closed form; deterministic gradient descent (float64) on
the expected objective; SGD with real dropout masks (full batch, fresh masks every step, learning
rate decayed over the second half, W averaged over the last 20% of steps).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..data import load_digits
from ..progress import progress_bar
from ..reproducibility import environment_info, one_thread, seed_everything
from ..results import Plot, Result, Series, Table

DESCRIPTION = (
    "Dropout on a factorized linear model = singular-value thresholding: real masks vs closed form (digits)"
)

__all__ = ["svt_closed_form", "gd_on_regularizer", "train_with_dropout", "whitened_digits_regression", "run"]

# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    quick: bool = False
    seed: int = 0
    k: int = 16  # hidden units
    thetas: tuple[float, ...] = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # keep probabilities
    sgd_steps: int = 3000
    sgd_lr: float = 0.05
    rank_threshold: float = 0.01  # a singular value counts toward the rank above this fraction of s_1(M)

    @classmethod
    def make(cls, quick: bool, seed: int) -> Config:
        if quick:
            return cls(quick=True, seed=seed, thetas=(0.9, 0.5, 0.2), sgd_steps=1000)
        return cls(seed=seed)


# ------------------------------------------------------------------------------ model and solvers


def svt_closed_form(M: torch.Tensor, k: int, lam: float) -> tuple[torch.Tensor, int, float]:
    """Global minimiser's spectrum of ||M - U V^T||_F^2 + lam * sum_i ||u_i||^2 ||v_i||^2 (width k).

    M: (m, n). Returns (singular values (min(m, n),) descending, rank r, threshold kappa): s_i =
    (s_i(M) - kappa)_+ for i <= r, kappa = lam * sum_{i<=r} s_i(M) / (k + lam * r), r the largest j <= k
    with s_j(M) > lam * sum_{i<=j} s_i(M) / (k + lam * j) (kappa = 0, r = min(k, rank) for lam = 0).
    """
    if k < 1 or lam < 0:
        raise ValueError(f"need k >= 1 and lam >= 0, got k={k}, lam={lam}")
    s = torch.linalg.svdvals(M.double())
    r, kappa = 0, 0.0
    csum = torch.cumsum(s, 0)
    for j in range(1, min(k, len(s)) + 1):
        kj = lam * float(csum[j - 1]) / (k + lam * j)
        if float(s[j - 1]) > kj:
            r, kappa = j, kj
    out = torch.zeros_like(s)
    out[:r] = s[:r] - kappa
    return out, r, kappa


def gd_on_regularizer(
    M: torch.Tensor,
    k: int,
    lam: float,
    lr: float | None = None,
    max_steps: int = 200_000,
    tol: float = 1e-13,
    init_scale: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Deterministic gradient descent (float64) on f(U, V) = ||M - U V^T||_F^2 + lam sum_i ||u_i||^2 ||v_i||^2.

    M: (m, n) -> (U (m, k), V (n, k), steps taken); stops when the gradient's norm is below ``tol``.
    """
    M = M.double()
    m, n = M.shape
    g = torch.Generator().manual_seed(seed)
    U = init_scale * torch.randn(m, k, generator=g, dtype=torch.float64)
    V = init_scale * torch.randn(n, k, generator=g, dtype=torch.float64)
    if lr is None:
        lr = 0.1 / max(1.0, float(torch.linalg.matrix_norm(M, 2)))
    step = 0
    for step in range(1, max_steps + 1):
        R = M - U @ V.T
        gU = -2 * R @ V + 2 * lam * U * (V * V).sum(0)
        gV = -2 * R.T @ U + 2 * lam * V * (U * U).sum(0)
        U, V = U - lr * gU, V - lr * gV
        if step % 100 == 0 and math.sqrt(float((gU * gU).sum() + (gV * gV).sum())) < tol:
            break
    return U, V, step


def train_with_dropout(
    X: torch.Tensor,
    Y: torch.Tensor,
    k: int,
    theta: float,
    steps: int = 3000,
    lr: float = 0.05,
    seed: int = 0,
    average_last: float = 0.2,
) -> tuple[torch.Tensor, list[float]]:
    """SGD with real dropout masks on y_hat = U diag(m / theta) V^T x (full batch, fresh masks each step).

    X: (n, d) whitened inputs, Y: (n, p) targets. Learning rate ``lr`` for the first half, then
    lr * T/2 / t. Returns (W = U V^T (p, d) float64 averaged over the last ``average_last`` of the
    steps, loss per step).
    """
    with one_thread():
        return _train_with_dropout(X, Y, k, theta, steps, lr, seed, average_last)


def _train_with_dropout(X, Y, k, theta, steps, lr, seed, average_last):
    g = torch.Generator().manual_seed(seed)
    Xf, Yf = X.float(), Y.float()
    U = (0.1 * torch.randn(Y.shape[1], k, generator=g)).requires_grad_()
    V = (0.1 * torch.randn(X.shape[1], k, generator=g)).requires_grad_()
    opt = torch.optim.SGD([U, V], lr=lr)
    start_avg = int((1 - average_last) * steps)
    W_sum, losses = None, []
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr if t < steps // 2 else lr * (steps // 2) / (t + 1)
        h = Xf @ V
        mask = (torch.rand(h.shape, generator=g) < theta).float() / theta
        loss = ((Yf - (h * mask) @ U.T) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if t >= start_avg:
            W = (U @ V.T).detach().double()
            W_sum = W if W_sum is None else W_sum + W
    return W_sum / (steps - start_avg), losses


def whitened_digits_regression() -> tuple[torch.Tensor, torch.Tensor]:
    """(X (1797, 31) PCA-whitened top-half pixels with X^T X / n = I, Y (1797, 32) bottom-half pixels), float64."""
    d = load_digits(test_fraction=0.2)
    x = torch.cat([d.x_train, d.x_test]).reshape(-1, 64).double()
    X, Y = x[:, :32], x[:, 32:]
    X, Y = X - X.mean(0), Y - Y.mean(0)
    n = len(X)
    evals, evecs = torch.linalg.eigh(X.T @ X / n)
    keep = evals > 1e-6 * evals.max()
    X = X @ evecs[:, keep] / evals[keep].sqrt()
    return X, Y / Y.std()


# -------------------------------------------------------------------------------------- evaluate


@dataclass
class KeepResult:
    """The three solutions at one keep probability: one row of the first table."""

    theta: float
    lam: float
    kappa: float
    rank_exact: int  # closed form, every positive (s_i(M) - kappa)_+
    rank_closed: int  # closed form, s_i above the rank threshold
    rank_gd: int
    rank_dropout: int
    max_error_gd: float  # max |s_GD - s_cf|
    max_error_dropout: float  # max |s_drop - s_cf|
    rel_error_dropout: float
    gd_steps: int
    s_closed: torch.Tensor
    s_gd: torch.Tensor
    s_dropout: torch.Tensor

    def cells(self) -> list:
        return [
            self.theta,
            self.lam,
            self.kappa,
            self.rank_exact,
            self.rank_closed,
            self.rank_gd,
            self.rank_dropout,
            self.max_error_gd,
            self.max_error_dropout,
            self.rel_error_dropout,
            self.gd_steps,
        ]


def solve(theta: float, M, X, Y, cfg: Config, rank_tol: float) -> KeepResult:
    """Closed form, GD on the expected objective and SGD with real masks at keep probability theta."""
    lam = (1 - theta) / theta
    s_cf, r_cf, kappa = svt_closed_form(M, cfg.k, lam)
    U, V, gd_steps = gd_on_regularizer(M, cfg.k, lam, seed=cfg.seed)
    s_gd = torch.linalg.svdvals(U @ V.T)
    W_drop, _ = train_with_dropout(X, Y, cfg.k, theta, steps=cfg.sgd_steps, lr=cfg.sgd_lr, seed=cfg.seed)
    s_drop = torch.linalg.svdvals(W_drop)
    return KeepResult(
        theta=theta,
        lam=round(lam, 4),
        kappa=kappa,
        rank_exact=r_cf,
        rank_closed=int((s_cf > rank_tol).sum()),
        rank_gd=int((s_gd > rank_tol).sum()),
        rank_dropout=int((s_drop > rank_tol).sum()),
        max_error_gd=float((s_gd - s_cf).abs().max()),
        max_error_dropout=float((s_drop - s_cf).abs().max()),
        rel_error_dropout=float((s_drop - s_cf).norm() / s_cf.norm().clamp_min(1e-30)),
        gd_steps=gd_steps,
        s_closed=s_cf,
        s_gd=s_gd,
        s_dropout=s_drop,
    )


# ----------------------------------------------------------------------------------------- write


def plots_of(results: list[KeepResult], s_M: torch.Tensor) -> list[Plot]:
    thetas = [r.theta for r in results]
    shown = [r for r in results if r.theta in (0.9, 0.5, 0.2)] or results[:3]
    idx = list(range(1, len(s_M) + 1))
    sv_series = [Series("s_i(M) (no dropout)", idx, s_M.tolist(), style="k-")]
    for r in shown:
        sv_series += [
            Series(f"closed form, theta={r.theta}", idx, r.s_closed.tolist(), style="-"),
            Series(f"real masks, theta={r.theta}", idx, r.s_dropout.tolist(), style="o"),
        ]
    ranks = [
        ("closed form (exact)", [r.rank_exact for r in results], "-"),
        ("closed form (s_i > 1% s_1(M))", [r.rank_closed for r in results], "^:"),
        ("GD on the regularizer (s_i > 1% s_1(M))", [r.rank_gd for r in results], "s--"),
        ("dropout, real masks (s_i > 1% s_1(M))", [r.rank_dropout for r in results], "o"),
    ]
    return [
        Plot(
            "singular_values",
            "Singular values of U V^T: closed-form thresholding (lines) vs dropout training (dots)",
            "line",
            sv_series,
            xlabel="index i",
            ylabel="singular value",
        ),
        Plot(
            "rank_vs_keep",
            "Rank of U V^T vs keep probability (k = 16 hidden units)",
            "line",
            [Series(label, thetas, ys, style=style) for label, ys, style in ranks],
            xlabel="keep probability theta",
            ylabel="rank",
        ),
    ]


COLUMNS = [
    "keep prob theta",
    "lambda",
    "kappa",
    "rank (closed form, exact)",
    "rank (closed form)",
    "rank (GD)",
    "rank (real masks)",
    "max |s_GD - s_cf|",
    "max |s_drop - s_cf|",
    "rel. error (drop)",
    "GD steps",
]

NOTES = (
    "Dropout with keep probability theta on the k = 16 hidden units of y = U V^T x, inputs PCA-whitened "
    "(X^T X / n = I, digits top half -> bottom half). The expected loss is ||M - UV^T||_F^2 + "
    "lambda sum_i ||u_i||^2 ||v_i||^2 (lambda = (1 - theta)/theta, M = Y^T X / n), whose global minimum "
    "thresholds the singular values of M: s_i = (s_i(M) - kappa)_+, kappa = (lambda/k)||W||_* "
    "(self-consistent; solved exactly). Ranks other than the exact closed-form one count the singular values "
    "above 1% of s_1(M); the exact closed-form rank counts every positive (s_i(M) - kappa)_+."
)


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    cfg = Config.make(quick, seed)
    with one_thread():
        t0 = time.perf_counter()
        seed_everything(seed)
        X, Y = whitened_digits_regression()
        M = Y.T @ X / len(X)
        s_M = torch.linalg.svdvals(M)
        rank_tol = cfg.rank_threshold * float(s_M[0])
        thetas = list(cfg.thetas)
        results = [
            solve(theta, M, X, Y, cfg, rank_tol)
            for theta in progress_bar(thetas, desc="keep probabilities", enabled=progress)
        ]
        sv_rows = [
            [r.theta, i + 1, float(s_M[i]), float(r.s_closed[i]), float(r.s_gd[i]), float(r.s_dropout[i])]
            for r in results
            for i in range(8)
        ]
        match = sum(r.rank_dropout == r.rank_closed for r in results)
        return Result(
            name="dropout-lowrank",
            config={
                "data": "digits (1797), top 4 rows -> bottom 4 rows, whitened",
                "k": cfg.k,
                "d_in": X.shape[1],
                "d_out": Y.shape[1],
                "keep_probabilities": thetas,
                "sgd_steps": cfg.sgd_steps,
                "sgd_lr": cfg.sgd_lr,
                "rank_threshold": "s_i > 0.01 * s_1(M)",
            },
            seeds=[seed],
            metrics={
                "max_abs_error_gd_vs_closed_form": max(r.max_error_gd for r in results),
                "max_abs_error_dropout_vs_closed_form": max(r.max_error_dropout for r in results),
                "rank_match_dropout_vs_closed_form": f"{match}/{len(thetas)}",
                "s1_M": float(s_M[0]),
            },
            history={
                "theta": thetas,
                "rank_closed_form": [r.rank_exact for r in results],
                "rank_closed_form_thresholded": [r.rank_closed for r in results],
                "rank_gd": [r.rank_gd for r in results],
                "rank_dropout": [r.rank_dropout for r in results],
            },
            tables=[
                Table(
                    "Closed form vs GD on the regularizer vs dropout with real masks",
                    COLUMNS,
                    [r.cells() for r in results],
                ),
                Table(
                    "Top-8 singular values side by side",
                    ["theta", "i", "s_i(M)", "closed form", "GD", "real masks"],
                    sv_rows,
                ),
            ],
            plots=plots_of(results, s_M),
            notes=NOTES,
            wall_time_s=time.perf_counter() - t0,
            environment=environment_info(),
        )
