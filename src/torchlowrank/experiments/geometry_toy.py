"""geometry-toy: heavy ball / Adam on the factors of W = A B^T against LowRankSGD / LowRankAdam.

Two problems with a rank-r target T (m x n) whose nonzero singular values are log-spaced from 1 to
1 / kappa, kappa in 1e1..1e5:
- ``approx``: f(W) = 1/2 ||W - T||_F^2;
- ``regression``: f(W) = 1/(2N) ||X W^T - X T^T||_F^2, X (N, n) Gaussian (a low-rank matrix regression).
Every method starts from the same random rank-r W0 (singular values 1e-2) and runs ``steps`` steps;
each method's learning rate is the best of a grid (lowest final relative error ||W - T|| / ||T||)
for each (problem, kappa). The claim under test (DESIGN §4.5): momentum methods on the factors slow
down as the conditioning worsens, the geometric steps do not.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..factorized import FactorizedLinear
from ..layers import LowRankLinear
from ..optim import LowRankAdam, LowRankSGD
from ..reproducibility import environment_info, git_commit, one_thread
from ..results import Plot, Result, Series, Table

DESCRIPTION = "Ill-conditioned low-rank targets: heavy ball / Adam on factors vs LowRankSGD / LowRankAdam"

METHODS = (
    "heavy ball on factors",
    "Adam on factors",
    "LowRankSGD",
    "LowRankAdam",
    "LowRankAdam (elementwise v)",
)
# (learning rate, momentum) grids; the momentum grid gives heavy ball plain gradient descent as an option
GRID = {
    "heavy ball on factors": [(lr, mom) for mom in (0.0, 0.9) for lr in (1e-2, 3e-2, 1e-1, 3e-1, 1.0)],
    "Adam on factors": [(lr, None) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)],
    "LowRankSGD": [(lr, mom) for mom in (0.0, 0.9) for lr in (1e-2, 3e-2, 1e-1, 3e-1, 1.0)],
    "LowRankAdam": [(lr, None) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)],
    "LowRankAdam (elementwise v)": [(lr, None) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)],
}
QUICK_GRID = {
    "heavy ball on factors": [(0.3, 0.0), (0.1, 0.9)],
    "Adam on factors": [(1e-2, None), (3e-2, None)],
    "LowRankSGD": [(1.0, 0.0), (0.3, 0.0), (0.1, 0.9)],
    "LowRankAdam": [(1e-2, None), (3e-2, None)],
    "LowRankAdam (elementwise v)": [(1e-2, None), (3e-2, None)],
}
THRESHOLD = 1e-6
PROBLEMS = ("approx", "regression")


@dataclass(frozen=True)
class Config:
    name: str = "geometry-toy"
    quick: bool = False
    seed: int = 0
    kappas: list[float] = field(default_factory=lambda: [1e1, 1e3, 1e5])  # condition numbers of the target
    steps: int = 200
    m: int = 50
    n: int = 40
    r: int = 5
    n_samples: int = 200  # rows of X in the regression problem

    @classmethod
    def make(cls, quick: bool, seed: int) -> Config:
        if quick:
            return cls(quick=True, seed=seed, kappas=[1e1, 1e5], steps=40, m=20, n=16, r=3, n_samples=60)
        return cls(seed=seed)

    @property
    def grid(self) -> dict:
        return QUICK_GRID if self.quick else GRID


def provenance(name: str, quick: bool) -> dict[str, str]:
    """The command that reproduces a report and the git commit of the source tree (if known)."""
    cmd = f"torchlowrank reproduce {name}" + (" --quick" if quick else f" --out docs/results/{name}")
    return {"command": cmd, "git_commit": git_commit() or "unknown"}


def make_target(m: int, n: int, r: int, kappa: float, g: torch.Generator) -> torch.Tensor:
    QA = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    QB = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return (QA * torch.logspace(0, -math.log10(kappa), r, dtype=torch.float64)) @ QB.T


def _initial_layers(m: int, n: int, r: int, g: torch.Generator):
    U0 = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    s0 = torch.full((r,), 1e-2, dtype=torch.float64)
    return U0, s0, V0


def run_one(
    method: str,
    lr: float,
    momentum: float | None,
    problem: str,
    T: torch.Tensor,
    X: torch.Tensor | None,
    init,
    steps: int,
) -> list[float]:
    """Relative error ||W_k - T|| / ||T|| for k = 0..steps (inf from the step where it diverged)."""
    m, n = T.shape
    U0, s0, V0 = init
    r = s0.numel()
    if method.endswith("on factors"):
        layer = FactorizedLinear(n, m, r, bias=False, dtype=torch.float64)
        with torch.no_grad():
            layer.A.copy_(U0 * s0.sqrt())
            layer.B.copy_(V0 * s0.sqrt())
        params = [layer.A, layer.B]
        opt = (
            torch.optim.SGD(params, lr=lr, momentum=momentum)
            if method.startswith("heavy")
            else torch.optim.Adam(params, lr=lr)
        )
    else:
        layer = LowRankLinear(n, m, r, bias=False, dtype=torch.float64)
        layer.set_factors(U0, s0, V0)
        if method == "LowRankSGD":
            opt = LowRankSGD(layer, lr=lr, momentum=momentum)
        else:
            opt = LowRankAdam(
                layer, lr=lr, second_moment="elementwise" if "elementwise" in method else "unit"
            )
    Y = None if X is None else X @ T.T
    tnorm = T.norm().item()
    errors = [(layer.dense_weight() - T).norm().item() / tnorm]
    for _ in range(steps):
        opt.zero_grad()
        if problem == "approx":
            loss = 0.5 * (layer.dense_weight() - T).pow(2).sum()
        else:
            loss = 0.5 * (layer(X) - Y).pow(2).sum() / X.shape[0]
        loss.backward()
        try:
            opt.step()
        except ValueError:  # non-finite gradient: diverged
            errors += [math.inf] * (steps + 1 - len(errors))
            break
        e = (layer.dense_weight() - T).norm().item() / tnorm
        if not math.isfinite(e) or e > 1e6:
            errors += [math.inf] * (steps + 1 - len(errors))
            break
        errors.append(e)
    return errors


@dataclass
class Cell:
    """One (problem, kappa, method) at the best (lr, momentum) of its grid: one row of the table."""

    problem: str
    kappa: float
    method: str
    lr: float
    momentum: float | None
    errors: list[float]  # relative error at steps 0..steps

    @property
    def final(self) -> float:
        return self.errors[-1]

    def cells(self, steps: int) -> list:
        hit = next((k for k, e in enumerate(self.errors) if e <= THRESHOLD), None)
        momentum = "-" if self.momentum is None else self.momentum
        return [self.problem, f"{self.kappa:.0e}", self.method, self.lr, momentum, self.final] + [
            hit if hit is not None else f"> {steps}"
        ]


def best_of_grid(method: str, problem: str, kappa: float, T, X, init, cfg: Config) -> Cell:
    best = None
    for lr, mom in cfg.grid[method]:
        errs = run_one(method, lr, mom, problem, T, X, init, cfg.steps)
        if best is None or errs[-1] < best.final:
            best = Cell(problem, kappa, method, lr, mom, errs)
    return best


def train_all(cfg: Config) -> dict[tuple, Cell]:
    """(problem, kappa, method) -> the best run; every method of a (problem, kappa) from the same start."""
    cells = {}
    for problem in PROBLEMS:
        for kappa in cfg.kappas:
            g = torch.Generator().manual_seed(cfg.seed)
            T = make_target(cfg.m, cfg.n, cfg.r, kappa, g)
            X = (
                torch.randn(cfg.n_samples, cfg.n, generator=g, dtype=torch.float64)
                if problem == "regression"
                else None
            )
            init = _initial_layers(cfg.m, cfg.n, cfg.r, g)
            for method in METHODS:
                cells[(problem, kappa, method)] = best_of_grid(method, problem, kappa, T, X, init, cfg)
    return cells


def plots_of(cfg: Config, cells: dict[tuple, Cell]) -> list[Plot]:
    plots, kappas, kmax = [], cfg.kappas, cfg.kappas[-1]
    for problem in PROBLEMS:
        final = [
            Series(meth, kappas, [max(cells[(problem, k, meth)].final, 1e-16) for k in kappas], style="o-")
            for meth in METHODS
        ]
        plots.append(
            Plot(
                f"{problem}_final_error",
                f"{problem}: relative error after {cfg.steps} steps (best lr) vs condition number",
                "line",
                final,
                xlabel="condition number of the target",
                ylabel="||W - T|| / ||T||",
                logx=True,
                logy=True,
            )
        )
        curves = [
            Series(
                meth,
                list(range(cfg.steps + 1)),
                [max(e, 1e-16) if math.isfinite(e) else None for e in cells[(problem, kmax, meth)].errors],
            )
            for meth in METHODS
        ]
        plots.append(
            Plot(
                f"{problem}_error_vs_step",
                f"{problem}, kappa = {kmax:.0e}: relative error vs step (best lr)",
                "line",
                curves,
                xlabel="step",
                ylabel="||W - T|| / ||T||",
                logy=True,
            )
        )
    return plots


def setting_notes(cfg: Config, command: str) -> str:
    """The setting, as run (no reading of the numbers: that is in docs/)."""
    return (
        f"Rank-{cfg.r} targets ({cfg.m} x {cfg.n}) with singular values log-spaced from 1 to 1/kappa; {cfg.steps} "
        "steps from the same random rank-r start (singular values 1e-2); for each method, problem and kappa the "
        "learning rate is the best of the grid (lowest final error); heavy ball and LowRankSGD choose momentum 0 or "
        f"0.9 as well. 'steps to {THRESHOLD:g}' is the first step with relative error <= {THRESHOLD:g} (for kappa = "
        "1e5 this needs the smallest singular value 1e-5 of the target to be found). "
        f"Reproduce: `{command}`."
    )


COLUMNS = ["problem", "kappa", "method", "best lr", "momentum", "final error", f"steps to {THRESHOLD:g}"]


def geometry_study(cfg: Config) -> Result:
    prov = provenance(cfg.name, cfg.quick)  # at the start: the commit of the code that runs
    t0 = time.perf_counter()
    with one_thread():
        cells = train_all(cfg)
    kappas = cfg.kappas
    metrics = {
        f"final_error_{p}_kappa{k:.0e}_{meth.replace(' ', '_')}": cells[(p, k, meth)].final
        for p in PROBLEMS
        for k in (kappas[0], kappas[-1])
        for meth in METHODS
    }
    return Result(
        name=cfg.name,
        config={
            "m": cfg.m,
            "n": cfg.n,
            "rank": cfg.r,
            "kappas": kappas,
            "steps": cfg.steps,
            "n_samples": cfg.n_samples,
            "grid": {k: [list(map(str, c)) for c in v] for k, v in cfg.grid.items()},
            "dtype": "float64",
            **prov,
        },
        seeds=[cfg.seed],
        metrics=metrics,
        tables=[
            Table(
                "Final relative error with the best learning rate of the grid",
                COLUMNS,
                [c.cells(cfg.steps) for c in cells.values()],
            )
        ],
        plots=plots_of(cfg, cells),
        notes=setting_notes(cfg, prov["command"]),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    return geometry_study(Config.make(quick, seed))


def demo_geometry(progress: bool | None = None) -> Result:
    """Rank-3 targets of condition number 10 and 1e5: factor optimizers vs the geometric ones (~10 s)."""
    return geometry_study(
        Config(
            name="demo-geometry",
            quick=True,
            seed=0,
            kappas=[1e1, 1e5],
            steps=40,
            m=20,
            n=16,
            r=3,
            n_samples=60,
        )
    )
