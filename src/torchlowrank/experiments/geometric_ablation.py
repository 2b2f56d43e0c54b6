"""geometric-ablation: why LowRankAdam trains worse than Adam on the factors (issue 19, item 1).

One factor of LowRankAdam is varied at a time, against factorized Adam (W = A B^T, torch Adam) on
the same model, data, initial weights and batches:

- second moment: ``unit`` (the default when this was written), ``elementwise`` (carried through the
  basis change), ``elementwise_mean``, ``elementwise_reset`` (re-started at each augmentation);
- ``basis_lr_ratio`` (step of the basis-update blocks vs the S block): 0.3, 3, 10;
- initialisation of S: the layer's default (Marchenko-Pastur spectrum, Haar U, V), the best rank-r
  approximation of a freshly initialised dense ``nn.Linear`` (``LowRankLinear.from_linear``), and
  the default spectrum scaled so that ||W||_F equals the dense layer's (for isotropic inputs the
  layer then has the dense layer's output variance);
- decoupled weight decay on S (biases and the dense head not decayed);
- ``augment_every``: 4, 8;
- a linear learning-rate warm-up over the first 10 % of the steps (also given to factorized Adam);
plus two combinations (elementwise + warm-up, elementwise + basis_lr_ratio 3), factorized Adam from
the Frobenius-scaled init, and dense Adam as a reference.

Every arm's learning rate is the best of the same grid on a validation split carved out of the
training set (never the test set); the grid is extended by one value when the best lies at its
edge. The chosen learning rate is then run with more seeds (each seed: its own initial weights
and batch order, shared by all arms). Reported: validation accuracy / loss per grid point, test
accuracy mean and std over seeds, final full-training-set loss, and loss curves.
The interpretation lives in ``docs/geometric-ablation.md`` (written by hand from these numbers).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..compress import rank_for_fraction
from ..data import load_digits, load_fashion_mnist
from ..factorized import FactorizedLinear
from ..layers import LowRankLinear
from ..optim import LowRankAdam
from ..progress import progress_bar
from ..reproducibility import environment_info, one_thread
from ..results import Plot, Result, Series, Table
from .geometry_toy import provenance
from .training import Split

DESCRIPTION = (
    "LowRankAdam vs factorized Adam, one factor at a time (second moment, basis step, S init, "
    "weight decay, augment_every, warm-up), lr tuned on a validation split"
)

NAME = "geometric-ablation"


# ----- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    """One training method. ``kind``: "lowrank" (LowRankAdam), "factorized" (A B^T, torch Adam) or
    "dense" (nn.Linear, torch Adam). ``factor``: the factor this arm varies from the default."""

    key: str
    label: str
    kind: str
    factor: str
    second_moment: str = "unit"
    basis_lr_ratio: float = 1.0
    init: str = "default"  # "default" (MP spectrum, Haar U, V) | "dense_svd" | "frobenius"
    weight_decay: float = 0.0  # decoupled, on S only
    augment_every: int = 1
    warmup: bool = False
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's, for every kind


ARMS: tuple[Arm, ...] = (
    Arm("dense_adam", "dense Adam", "dense", "reference"),
    Arm("factorized_adam", "factorized Adam", "factorized", "baseline"),
    Arm("lowrank_default", "LowRankAdam (default: unit v)", "lowrank", "baseline"),
    Arm(
        "lowrank_elementwise",
        "v elementwise (carried)",
        "lowrank",
        "second moment",
        second_moment="elementwise",
    ),
    Arm(
        "lowrank_elementwise_mean",
        "v elementwise, new entries at the mean",
        "lowrank",
        "second moment",
        second_moment="elementwise_mean",
    ),
    Arm(
        "lowrank_elementwise_reset",
        "v elementwise, reset at augmentation",
        "lowrank",
        "second moment",
        second_moment="elementwise_reset",
    ),
    Arm("lowrank_basis_0.3", "basis_lr_ratio 0.3", "lowrank", "basis step", basis_lr_ratio=0.3),
    Arm("lowrank_basis_3", "basis_lr_ratio 3", "lowrank", "basis step", basis_lr_ratio=3.0),
    Arm("lowrank_basis_10", "basis_lr_ratio 10", "lowrank", "basis step", basis_lr_ratio=10.0),
    Arm(
        "lowrank_init_dense_svd", "S init: best rank-r of a dense init", "lowrank", "S init", init="dense_svd"
    ),
    Arm(
        "lowrank_init_frobenius",
        "S init: scaled to the dense Frobenius norm",
        "lowrank",
        "S init",
        init="frobenius",
    ),
    Arm(
        "factorized_init_frobenius",
        "factorized Adam, init scaled to the dense Frobenius norm",
        "factorized",
        "S init",
        init="frobenius",
    ),
    Arm("lowrank_wd", "weight decay 0.1 on S", "lowrank", "weight decay", weight_decay=0.1),
    Arm("lowrank_augment_4", "augment_every 4", "lowrank", "augment_every", augment_every=4),
    Arm("lowrank_augment_8", "augment_every 8", "lowrank", "augment_every", augment_every=8),
    Arm("lowrank_warmup", "LowRankAdam + warm-up", "lowrank", "warm-up", warmup=True),
    Arm("factorized_warmup", "factorized Adam + warm-up", "factorized", "warm-up", warmup=True),
    Arm(
        "lowrank_elementwise_warmup",
        "v elementwise + warm-up",
        "lowrank",
        "combination",
        second_moment="elementwise",
        warmup=True,
    ),
    Arm(
        "lowrank_elementwise_basis_3",
        "v elementwise + basis_lr_ratio 3",
        "lowrank",
        "combination",
        second_moment="elementwise",
        basis_lr_ratio=3.0,
    ),
)


@dataclass(frozen=True)
class Setting:
    """A model and a data set. ``ranks``: per low-rank hidden layer; None: from ``fraction``."""

    key: str
    dataset: str  # "digits" | "fashion"
    hidden: tuple[int, ...]
    batch: int
    steps: int
    n_val: int
    ranks: tuple[int, ...] | None = None
    fraction: float | None = None
    n_train: int | None = None  # fashion: the training subset (train + validation) and test size
    n_test: int | None = None


@dataclass(frozen=True)
class AblationConfig:
    settings: tuple[Setting, ...]
    arms: tuple[Arm, ...] = ARMS
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    # tried in turn while the best lr so far is the smallest / largest tried
    lr_below: tuple[float, ...] = (3e-4, 1e-4)
    lr_above: tuple[float, ...] = (1e-1, 3e-1)
    n_seeds: int = 5
    warmup_fraction: float = 0.1
    curve_every: int = 5  # loss curves: the mean minibatch loss over windows of this many steps
    # selection rule: highest validation accuracy, ties broken by lower validation loss
    selection: str = "validation accuracy, then validation loss"


FULL = AblationConfig(
    settings=(
        Setting("digits", "digits", (128, 128), batch=128, steps=200, n_val=288, ranks=(8, 8)),
        Setting(
            "fashion",
            "fashion",
            (256, 256),
            batch=128,
            steps=250,
            n_val=2000,
            fraction=0.05,
            n_train=10000,
            n_test=2000,
        ),
    )
)
QUICK = AblationConfig(
    settings=(Setting("digits", "digits", (32, 32), batch=64, steps=12, n_val=200, ranks=(4, 4)),),
    lr_grid=(3e-3, 3e-2),
    n_seeds=2,
    curve_every=2,
)


# ----- data -------------------------------------------------------------------------------------------
def load_split(setting: Setting, seed: int) -> Split:
    """Train / validation / test, flattened. The validation split is carved from the training set."""
    if setting.dataset == "digits":
        d = load_digits(test_fraction=0.2, seed=seed)
    else:
        d = load_fashion_mnist(n_train=setting.n_train, n_test=setting.n_test, seed=seed)
    x, x_test = d.flat()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 10_000))
    val, tr = perm[: setting.n_val], perm[setting.n_val :]
    return Split(x[tr], d.y_train[tr], x[val], d.y_train[val], x_test, d.y_test)


# ----- models -----------------------------------------------------------------------------------------
def layer_ranks(setting: Setting, sizes: list[int]) -> list[int]:
    shapes = [(sizes[i + 1], sizes[i]) for i in range(len(setting.hidden))]
    if setting.ranks is not None:
        return list(setting.ranks)
    return [max(1, rank_for_fraction(s, setting.fraction)) for s in shapes]


def build(setting: Setting, arm: Arm, n_in: int, seed: int) -> nn.Sequential:
    """The MLP n_in -> hidden -> 10 for ``arm``; every arm of a seed starts from the same weights.

    The dense model is drawn from ``seed``; the low-rank hidden layers' default factors from
    ``seed`` too (a separate generator stream), with the dense model's biases and head. Factorized
    arms use the balanced split A = U sqrt(S), B = V sqrt(S) of the same U, S, V."""
    sizes = [n_in, *setting.hidden, 10]
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    if arm.kind == "dense":
        return model
    ranks = layer_ranks(setting, sizes)
    torch.manual_seed(seed + 1_000)
    lows = []
    for j, r in enumerate(ranks):  # every low-rank layer drawn before any conversion draws from the RNG
        dense = model[2 * j]
        if arm.init == "dense_svd":
            low = LowRankLinear.from_linear(dense, r)
        else:
            low = LowRankLinear(dense.in_features, dense.out_features, r)
            with torch.no_grad():
                low.bias.copy_(dense.bias)
                if arm.init == "frobenius":
                    low.S.mul_(dense.weight.norm() / low.S.norm())
        lows.append(low)
    for j, (r, low) in enumerate(zip(ranks, lows)):
        dense = model[2 * j]
        if arm.kind == "factorized":
            fac = FactorizedLinear(dense.in_features, dense.out_features, r)
            with torch.no_grad():
                root = low.S.sqrt()
                fac.A.copy_(low.U * root)
                fac.B.copy_(low.V * root)
                fac.bias.copy_(low.bias)
            low = fac
        model[2 * j] = low
    return model


def make_optimizer(model: nn.Module, arm: Arm, lr: float) -> torch.optim.Optimizer:
    if arm.kind != "lowrank":
        return torch.optim.Adam(model.parameters(), lr=lr, betas=arm.betas)
    opt = LowRankAdam(
        model,
        lr=lr,
        betas=arm.betas,
        second_moment=arm.second_moment,
        basis_lr_ratio=arm.basis_lr_ratio,
        weight_decay=arm.weight_decay,
        augment_every=arm.augment_every,
    )
    for group in opt.param_groups:  # weight decay on S only: the biases and the dense head are not decayed
        if group["unit"] is None:
            group["weight_decay"] = 0.0
    return opt


# ----- train / evaluate --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on (x, y); non-finite loss reported as inf."""
    model.eval()
    logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(-1) == y).float().mean().item()
    model.train()
    return (loss if math.isfinite(loss) else math.inf), acc


def _span(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(W, U, V): the first hidden layer's weight and orthonormal bases of its column / row space."""
    with torch.no_grad():
        if isinstance(layer, LowRankLinear):
            return layer.dense_weight().clone(), layer.U.clone(), layer.V.clone()
        if isinstance(layer, FactorizedLinear):
            return layer.dense_weight().clone(), torch.linalg.qr(layer.A).Q, torch.linalg.qr(layer.B).Q
    return None


def _off_core(before, layer: nn.Module) -> tuple[float, float]:
    """(||dW - U U^T dW V V^T||_F^2, ||U U^T dW V V^T||_F^2) for one step dW of a rank-r layer, with
    U, V the bases before the step: the part of the step that moves the subspaces (the basis update)
    and the part inside them (the S / core update)."""
    W, U, V = before
    with torch.no_grad():
        dW = layer.dense_weight() - W
        core = (U.T @ dW @ V).norm() ** 2
        off = (dW.norm() ** 2 - core).clamp_min(0)
    return off.item(), core.item()


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    batch: int,
    seed: int,
    warmup_steps: int,
    bar,
    ratios: list[float] | None = None,
) -> list[float]:
    """``steps`` minibatch steps (batch order from ``seed``, the same for every arm); returns the
    minibatch losses (stops early, padding with inf, once the loss is not finite). ``ratios``: if
    given, receives :func:`_off_core` of the first layer at every step."""
    sched = None
    if warmup_steps > 0:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup_steps))
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    perm, pos = torch.randperm(len(x), generator=g), 0
    for _ in range(steps):
        if pos + batch > len(x):  # drop the last partial batch: every step sees `batch` examples
            perm, pos = torch.randperm(len(x), generator=g), 0
        idx = perm[pos : pos + batch]
        pos += batch
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        before = _span(model[0]) if ratios is not None else None
        opt.step()
        if before is not None:
            ratios.append(_off_core(before, model[0]))
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        bar.update(1)
        if not math.isfinite(losses[-1]):
            bar.update(steps - len(losses))
            losses += [math.inf] * (steps - len(losses))
            break
    if isinstance(opt, LowRankAdam):
        opt.remove_hooks()
    return losses


@dataclass
class Run:
    setting: str
    arm: str
    lr: float
    seed: int
    val_loss: float
    val_acc: float
    test_acc: float
    train_loss: float  # full training set, after training
    seconds: float
    curve: list[float] = field(default_factory=list)
    off_core_ratio: float | None = None  # sqrt(sum off^2 / sum core^2) over the steps, first hidden layer


def one_run(setting: Setting, arm: Arm, data: Split, lr: float, seed: int, cfg: AblationConfig, bar) -> Run:
    t0 = time.perf_counter()
    model = build(setting, arm, data.x_train.shape[1], seed)
    opt = make_optimizer(model, arm, lr)
    warm = math.ceil(cfg.warmup_fraction * setting.steps) if arm.warmup else 0
    ratios: list[tuple[float, float]] | None = [] if arm.kind != "dense" else None
    losses = train(
        model, opt, data.x_train, data.y_train, setting.steps, setting.batch, seed, warm, bar, ratios
    )
    val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
    _, test_acc = evaluate(model, data.x_test, data.y_test)
    train_loss, _ = evaluate(model, data.x_train, data.y_train)
    k = cfg.curve_every
    curve = [statistics.fmean(losses[i : i + k]) for i in range(0, len(losses), k)]
    return Run(
        setting.key,
        arm.key,
        lr,
        seed,
        val_loss,
        val_acc,
        test_acc,
        train_loss,
        time.perf_counter() - t0,
        [c if math.isfinite(c) else math.inf for c in curve],
        _ratio(ratios),
    )


def _ratio(pairs: list[tuple[float, float]] | None) -> float | None:
    if not pairs:
        return None
    off, core = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return math.sqrt(off / core) if core > 0 and math.isfinite(off) else math.inf


def _select(runs: list[Run]) -> Run:
    return max(runs, key=lambda r: (r.val_acc, -r.val_loss))


def study(cfg: AblationConfig, seed: int, quick: bool, progress: bool | None) -> Result:
    t0 = time.perf_counter()
    prov = provenance(NAME, quick)
    seeds = [seed + i for i in range(cfg.n_seeds)]
    runs: list[Run] = []
    chosen: dict[tuple[str, str], float] = {}
    extended: dict[tuple[str, str], str] = {}
    total = sum(s.steps for s in cfg.settings) * len(cfg.arms) * (len(cfg.lr_grid) + 2 + cfg.n_seeds - 1)
    bar = progress_bar(total=total, desc=NAME, enabled=progress)
    with one_thread():
        for setting in cfg.settings:
            data = load_split(setting, seed)
            for arm in cfg.arms:
                # 1. the learning rate: the best of the grid on the validation split (first seed)
                grid = [one_run(setting, arm, data, lr, seeds[0], cfg, bar) for lr in cfg.lr_grid]
                best = _select(grid)
                added = []
                for side, more in ((cfg.lr_grid[0], cfg.lr_below), (cfg.lr_grid[-1], cfg.lr_above)):
                    edge = side
                    for lr in more:  # extend outward while the best is at the edge of what was tried
                        if best.lr != edge:
                            break
                        grid.append(one_run(setting, arm, data, lr, seeds[0], cfg, bar))
                        best, edge = _select(grid), lr
                        added.append(f"{lr:g}")
                if added:
                    extended[(setting.key, arm.key)] = " ".join(added)
                bar.update(setting.steps * (2 - len(added)))
                for r in grid:
                    runs.append(r)
                chosen[(setting.key, arm.key)] = best.lr
                # 2. the chosen lr with the other seeds (the first seed's run is reused)
                for s in seeds[1:]:
                    runs.append(one_run(setting, arm, data, best.lr, s, cfg, bar))
    bar.close()
    return _result(cfg, seeds, runs, chosen, extended, prov, quick, time.perf_counter() - t0)


# ----- write ------------------------------------------------------------------------------------------
@dataclass
class ArmSummary:
    """One (setting, arm) at its chosen lr over the seeds: one row of the first table."""

    setting: str
    factor: str
    arm: str
    lr: float
    extended: str
    val_acc: float
    test_acc: float
    test_acc_std: float
    train_loss: float
    train_loss_std: float
    off_core_ratio: float | str
    seconds: float


def summarize_arm(setting: Setting, arm: Arm, runs: list[Run], lr: float, extended: str, seeds) -> ArmSummary:
    at = [r for r in runs if r.setting == setting.key and r.arm == arm.key and r.lr == lr]
    at = [next(r for r in at if r.seed == s) for s in seeds]
    acc, loss = [r.test_acc for r in at], [r.train_loss for r in at]
    return ArmSummary(
        setting.key,
        arm.factor,
        arm.key,
        lr,
        extended,
        at[0].val_acc,
        statistics.fmean(acc),
        statistics.stdev(acc) if len(acc) > 1 else 0.0,
        statistics.fmean(loss),
        statistics.stdev(loss) if len(loss) > 1 else 0.0,
        "-" if at[0].off_core_ratio is None else at[0].off_core_ratio,
        statistics.fmean(r.seconds for r in at),
    )


def arm_metrics(s: ArmSummary, first: Run) -> dict[str, float]:
    prefix = f"{s.setting}.{s.arm}"
    metrics = {
        f"{prefix}.lr": s.lr,
        f"{prefix}.val_accuracy": s.val_acc,
        f"{prefix}.test_accuracy_mean": s.test_acc,
        f"{prefix}.test_accuracy_std": s.test_acc_std,
        f"{prefix}.train_loss_mean": s.train_loss,
        f"{prefix}.train_loss_std": s.train_loss_std,
        f"{prefix}.first_loss": first.curve[0],
    }
    if first.off_core_ratio is not None:
        metrics[f"{prefix}.off_core_ratio"] = first.off_core_ratio
    return metrics


def grid_rows(setting: Setting, arm: Arm, runs: list[Run], seed: int) -> list[list]:
    """The lr grid of one (setting, arm) on the first seed, by increasing lr."""
    mine = [r for r in runs if r.setting == setting.key and r.arm == arm.key and r.seed == seed]
    return [
        [setting.key, arm.key, r.lr, r.val_loss, r.val_acc, r.train_loss]
        + ["-" if r.off_core_ratio is None else r.off_core_ratio]
        for r in sorted(mine, key=lambda r: r.lr)
    ]


PLOTTED_ARMS = (
    "dense_adam",
    "factorized_adam",
    "lowrank_default",
    "lowrank_elementwise",
    "lowrank_basis_3",
    "lowrank_elementwise_basis_3",
)


def setting_plots(setting: Setting, cfg: AblationConfig, summaries, curves, chosen, seeds) -> list[Plot]:
    arms = {a.key: a for a in cfg.arms}
    series = [
        Series(
            f"{arms[key].label} (lr {chosen[(setting.key, key)]:g})",
            [cfg.curve_every * (i + 1) for i in range(len(curves[f"{setting.key}.{key}"]))],
            curves[f"{setting.key}.{key}"],
        )
        for key in PLOTTED_ARMS
        if key in arms
    ]
    mine = [summaries[(setting.key, a.key)] for a in cfg.arms]
    bars = Series(
        "test accuracy",
        [a.key.replace("lowrank_", "") for a in cfg.arms],
        [s.test_acc for s in mine],
        [s.test_acc_std for s in mine],
    )
    return [
        Plot(
            f"{setting.key}_loss",
            f"{setting.key}: training loss at the validation-chosen lr (seed {seeds[0]})",
            "line",
            series,
            xlabel="step",
            ylabel=f"minibatch loss (mean of {cfg.curve_every} steps)",
            logy=True,
        ),
        Plot(
            f"{setting.key}_test_accuracy",
            f"{setting.key}: test accuracy at the chosen lr (mean, std over {len(seeds)} seeds)",
            "bar",
            [bars],
            ylabel="test accuracy",
        ),
    ]


SUMMARY_COLUMNS = [
    "setting",
    "factor",
    "arm",
    "lr",
    "extended",
    "val acc",
    "test acc",
    "std",
    "train loss",
    "loss std",
    "off-core / core step",
    "s/run",
]
GRID_COLUMNS = ["setting", "arm", "lr", "val loss", "val acc", "train loss", "off-core / core step"]


def setting_notes(seed: int, command: str) -> str:
    return (
        "Each arm varies one factor of LowRankAdam (or is a baseline). Learning rate: the best of the grid "
        "on the validation split (rule in the config), seed " + str(seed) + "; 'extended' names the lr "
        "added when the best was at the grid's edge. "
        "'off-core / core step': for the first hidden layer, "
        "sqrt(sum_k ||dW_k - U U^T dW_k V V^T||^2 / sum_k ||U U^T dW_k V V^T||^2) over the steps k (U, V: the "
        "bases before step k), the size of the basis update relative to the update inside the current subspaces "
        "(first seed). Test accuracy and full-training-set loss: mean and std "
        "over the seeds at the chosen lr. Interpretation: docs/geometric-ablation.md. Reproduce: `"
        + command
        + "`."
    )


def config_of(cfg: AblationConfig, quick: bool, prov: dict) -> dict:
    return {
        "settings": [asdict(s) for s in cfg.settings],
        "arms": [asdict(a) for a in cfg.arms],
        "lr_grid": list(cfg.lr_grid),
        "lr_below": list(cfg.lr_below),
        "lr_above": list(cfg.lr_above),
        "n_seeds": cfg.n_seeds,
        "warmup_fraction": cfg.warmup_fraction,
        "selection": cfg.selection,
        "curve_every": cfg.curve_every,
        "quick": quick,
        **prov,
    }


def _result(
    cfg: AblationConfig,
    seeds: list[int],
    runs: list[Run],
    chosen: dict,
    extended: dict,
    prov: dict,
    quick: bool,
    wall: float,
) -> Result:
    metrics: dict[str, float] = {}
    summaries: dict[tuple[str, str], ArmSummary] = {}
    grid: list[list] = []
    curves: dict[str, list[float]] = {}
    for setting in cfg.settings:
        for arm in cfg.arms:
            key, lr = (setting.key, arm.key), chosen[(setting.key, arm.key)]
            s = summarize_arm(setting, arm, runs, lr, extended.get(key, "-"), seeds)
            first = next(r for r in runs if (r.setting, r.arm, r.lr, r.seed) == (*key, lr, seeds[0]))
            summaries[key] = s
            metrics.update(arm_metrics(s, first))
            curves[f"{setting.key}.{arm.key}"] = first.curve
            grid += grid_rows(setting, arm, runs, seeds[0])
    plots = [p for st in cfg.settings for p in setting_plots(st, cfg, summaries, curves, chosen, seeds)]
    return Result(
        name=NAME,
        config=config_of(cfg, quick, prov),
        seeds=seeds,
        metrics=metrics,
        tables=[
            Table(
                "Chosen learning rate, test accuracy and training loss per arm",
                SUMMARY_COLUMNS,
                [list(vars(s).values()) for s in summaries.values()],
            ),
            Table("Validation results over the learning-rate grid (first seed)", GRID_COLUMNS, grid),
        ],
        history={"curves": curves, "runs": [asdict(r) | {"curve": None} for r in runs]},
        plots=plots,
        notes=setting_notes(seeds[0], prov["command"]),
        wall_time_s=wall,
        environment=environment_info(),
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    return study(QUICK if quick else FULL, seed, quick, progress)
