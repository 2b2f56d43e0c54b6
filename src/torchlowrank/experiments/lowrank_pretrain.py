"""lowrank-pretrain: training MLP / LeNet-5 from scratch at a parameter budget (DESIGN §4.5).

Methods, each from the same seeded dense initialisation:
- ``dense Adam``: the dense model, AdamW (weight decay 0);
- ``factorized Adam``: targeted layers as A B^T (balanced SVD split of the dense init), Adam;
- ``GaLore``: the dense model with GaLoreAdamW, projection rank = the layer's budget rank (the
  parameters stay dense: GaLore saves optimizer memory, not parameters);
- ``LowRankAdam``: targeted layers as U S V^T (best rank-k approximation of the dense init),
  LowRankAdam at fixed rank;
- ``LowRankAdam tau=...``: rank adaptive, starting from the largest budget's ranks with
  max_rank = that rank; the kept fraction is what the run ends with.
Budgets: rank k = floor(p m n / (m + n)) per targeted layer for p in ``fractions`` (the first
conv of LeNet-5 and the classifier heads stay dense, as in DLRT's reference setting).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..compress import count_parameters, rank_for_fraction
from ..data import ImageData, load_fashion_mnist, load_mnist_5k
from ..factorized import factorize_ab
from ..layers import LowRankConv2d, LowRankLinear
from ..models import MLP, LeNet5
from ..optim import GaLoreAdamW, LowRankAdam
from ..progress import progress_bar
from ..reproducibility import environment_info, one_thread
from ..results import Plot, Result, Series, Table
from ..targets import find_targets, replace_module
from .geometry_toy import provenance
from .training import accuracy

DESCRIPTION = (
    "MLP / LeNet-5 from scratch at 5-20% of the parameters: dense, factorized Adam, "
    "GaLore, LowRankAdam fixed and rank-adaptive"
)

TARGETS = {"mlp": ["features.0", "features.2"], "lenet5": ["features.3", "classifier.1", "classifier.3"]}
# factorized / lowrank: the best of {1e-3, 3e-3} / {3e-3, 1e-2, 3e-2} on an MNIST-5k dev run (MLP 512-256,
# 10% budget, 3 epochs; a different data set from the report's); dense Adam and GaLore: standard values, untuned
LRS = {"adam": 1e-3, "factorized": 3e-3, "galore": 1e-2, "lowrank": 3e-2}

# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    name: str = "lowrank-pretrain"
    quick: bool = False
    dataset: str = "fashion-mnist"  # or "mnist-5k"
    n_train: int | None = 10000  # None: all of the data set's images
    n_test: int | None = 2000
    data_seed: int = 0
    archs: dict = field(
        default_factory=lambda: {
            "mlp": {"hidden": (512, 256), "epochs": 3, "batch": 128, "galore_gap": 50},
            "lenet5": {"epochs": 3, "batch": 128, "galore_gap": 50},
        }
    )
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])  # parameter budgets p
    taus: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3])  # rank-adaptive LowRankAdam
    seeds: dict = field(default_factory=lambda: {"mlp": [0, 1, 2], "lenet5": [0, 1]})
    lrs: dict = field(default_factory=lambda: dict(LRS))

    @classmethod
    def make(cls, quick: bool, seed: int) -> Config:
        if not quick:
            return cls(data_seed=seed, seeds={"mlp": [seed, seed + 1, seed + 2], "lenet5": [seed, seed + 1]})
        return cls(
            quick=True,
            dataset="mnist-5k",
            n_train=2000,
            n_test=500,
            data_seed=seed,
            archs={
                "mlp": {"hidden": (128, 64), "epochs": 1, "batch": 128, "galore_gap": 10},
                "lenet5": {"epochs": 1, "batch": 256, "galore_gap": 4},
            },
            fractions=[0.1],
            taus=[0.2],
            seeds={"mlp": [seed], "lenet5": [seed]},
        )

    @classmethod
    def demo(cls) -> Config:
        return cls(
            name="demo-lowrank-pretrain",
            quick=True,
            dataset="mnist-5k",
            n_train=None,
            n_test=None,
            archs={"mlp": {"hidden": (128, 64), "epochs": 1, "batch": 128, "galore_gap": 10}},
            fractions=[0.1],
            taus=[0.2],
            seeds={"mlp": [0]},
        )


# ----------------------------------------------------------------------------------------- data


def load_data(cfg: Config) -> ImageData:
    if cfg.dataset == "fashion-mnist":
        return load_fashion_mnist(n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.data_seed)
    d = load_mnist_5k(seed=cfg.data_seed)
    if cfg.n_train is None:
        return d
    return ImageData(
        d.x_train[: cfg.n_train],
        d.y_train[: cfg.n_train],
        d.x_test[: cfg.n_test],
        d.y_test[: cfg.n_test],
        d.classes,
    )


# ---------------------------------------------------------------------------------------- model


def build(arch: str, hidden: tuple[int, ...], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(784, hidden, 10) if arch == "mlp" else LeNet5()


def targeted_params(model: nn.Module, arch: str) -> int:
    return sum(count_parameters(m) for _, m in find_targets(model, TARGETS[arch]))


def to_lowrank(model: nn.Module, arch: str, fraction: float) -> nn.Module:
    for name, mod in find_targets(model, TARGETS[arch], lambda m: isinstance(m, (nn.Linear, nn.Conv2d))):
        k = max(1, rank_for_fraction(tuple(mod.weight.shape), fraction))
        new = (
            LowRankLinear.from_linear(mod, k)
            if isinstance(mod, nn.Linear)
            else LowRankConv2d.from_conv2d(mod, k)
        )
        replace_module(model, name, new)
    return model


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch: int,
    seed: int,
    bar,
) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            bar.update(1)


def _inputs(arch: str, data):
    if arch == "mlp":
        return data.flat()
    return data.x_train, data.x_test


# ---------------------------------------------------------------------------------------- train


def method_runs(base: nn.Module, arch: str, cfg: Config):
    """(method, model, optimizer, fraction label) of every run from the dense init ``base``, in
    training order; each model is built only when the previous one has trained."""
    lrs = cfg.lrs
    m = copy.deepcopy(base)
    yield "dense Adam", m, torch.optim.AdamW(m.parameters(), lr=lrs["adam"], weight_decay=0.0), 1.0
    for p in cfg.fractions:
        m = factorize_ab(copy.deepcopy(base), p, TARGETS[arch])
        yield "factorized Adam", m, torch.optim.Adam(m.parameters(), lr=lrs["factorized"]), p
        m = copy.deepcopy(base)
        yield "GaLore", m, galore(m, arch, p, cfg), p
        m = to_lowrank(copy.deepcopy(base), arch, p)
        yield "LowRankAdam", m, LowRankAdam(m, lr=lrs["lowrank"]), p
    for tau in cfg.taus:
        m = to_lowrank(copy.deepcopy(base), arch, max(cfg.fractions))
        start = max(mod.rank for _, mod in find_targets(m, TARGETS[arch]))
        yield (
            f"LowRankAdam tau={tau:g}",
            m,
            LowRankAdam(m, lr=lrs["lowrank"], tau=tau, max_rank=start),
            "adaptive",
        )


def galore(model: nn.Module, arch: str, p: float, cfg: Config) -> GaLoreAdamW:
    """GaLoreAdamW with projection rank = each targeted layer's budget rank, the rest dense."""
    groups, seen = [], set()
    for _, mod in find_targets(model, TARGETS[arch]):
        W = mod.weight
        groups.append({"params": [W], "rank": max(1, rank_for_fraction(tuple(W.shape), p))})
        seen.add(id(W))
    groups.append({"params": [q for q in model.parameters() if id(q) not in seen], "rank": None})
    gap = cfg.archs[arch]["galore_gap"]
    return GaLoreAdamW(groups, lr=cfg.lrs["galore"], update_gap=gap, scale=0.25, eps=1e-8)


@dataclass
class Record:
    """One trained model (one row of the history)."""

    arch: str
    method: str
    seed: int
    fraction: float | str  # the budget p, 1.0 for dense, "adaptive" for the rank-adaptive runs
    kept: float  # measured fraction of the targeted layers' parameters at the end
    total_params: int
    accuracy: float
    ranks: str  # ranks of the targeted layers, "/"-separated ("full" for dense ones)
    seconds: float


def train_arch(arch: str, cfg: Config, data: ImageData, bar) -> list[Record]:
    """Every method on every seed of one architecture."""
    acfg = cfg.archs[arch]
    x_train, x_test = _inputs(arch, data)
    records = []
    for seed in cfg.seeds[arch]:
        base = build(arch, acfg.get("hidden", ()), seed)
        dense_targeted = targeted_params(base, arch)
        for method, model, opt, label in method_runs(base, arch, cfg):
            t1 = time.perf_counter()
            train(model, opt, x_train, data.y_train, acfg["epochs"], acfg["batch"], seed, bar)
            acc = accuracy(model, x_test, data.y_test)
            mods = [m for _, m in find_targets(model, TARGETS[arch])]
            kept = sum(count_parameters(m) for m in mods) / dense_targeted
            ranks = "/".join(str(getattr(m, "rank", "full")) for m in mods)
            seconds = time.perf_counter() - t1
            records.append(
                Record(arch, method, seed, label, kept, count_parameters(model), acc, ranks, seconds)
            )
            if isinstance(opt, LowRankAdam):
                opt.remove_hooks()
    return records


def train_all(cfg: Config, data: ImageData, progress: bool | None) -> list[Record]:
    records = []
    runs_per_seed = 1 + 3 * len(cfg.fractions) + len(cfg.taus)
    total_runs = sum(len(cfg.seeds[a]) * runs_per_seed for a in cfg.archs)
    for arch, acfg in cfg.archs.items():
        x_train, _ = _inputs(arch, data)
        steps = acfg["epochs"] * ((len(x_train) + acfg["batch"] - 1) // acfg["batch"])
        bar = progress_bar(total=total_runs * steps, desc=f"{cfg.name} {arch}", enabled=progress)
        records += train_arch(arch, cfg, data, bar)
        bar.close()
    return records


# ------------------------------------------------------------------------------------- evaluate


@dataclass
class Summary:
    """One (architecture, method, budget) over seeds; one row of the table."""

    model: str
    method: str
    fraction: float | str
    kept: float
    params: int
    accuracy: float
    std: float
    seeds: int
    ranks: str  # of the first seed
    train_s: float

    @property
    def metric_key(self) -> str:
        budget = f"_{self.fraction:g}" if isinstance(self.fraction, float) and self.fraction != 1.0 else ""
        return f"accuracy_{self.model}_{self.method.replace(' ', '_')}{budget}"


def summarise(records: list[Record]) -> dict[tuple, Summary]:
    """(arch, method, fraction) -> :class:`Summary`, in the order the runs were made."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((r.arch, r.method, r.fraction), []).append(r)
    out = {}
    for (arch, method, label), rs in groups.items():
        accs = [r.accuracy for r in rs]
        out[(arch, method, label)] = Summary(
            arch,
            method,
            label,
            round(statistics.fmean(r.kept for r in rs), 4),
            round(statistics.fmean(r.total_params for r in rs)),
            statistics.fmean(accs),
            statistics.stdev(accs) if len(accs) > 1 else 0.0,
            len(rs),
            rs[0].ranks,
            statistics.fmean(r.seconds for r in rs),
        )
    return out


# ---------------------------------------------------------------------------------------- write

COLUMNS = [
    "model",
    "method",
    "fraction",
    "kept",
    "params (total)",
    "accuracy",
    "std",
    "seeds",
    "ranks (seed 0)",
    "train s",
]


def _mean_point(records: list[Record], arch: str, method: str, label) -> tuple[float, float]:
    """(mean kept fraction, mean accuracy) of one cell over seeds (the kept fraction unrounded)."""
    rs = [r for r in records if (r.arch, r.method, r.fraction) == (arch, method, label)]
    return statistics.fmean(r.kept for r in rs), statistics.fmean(r.accuracy for r in rs)


def plot_arch(arch: str, cfg: Config, records: list[Record], dense_acc: float) -> Plot:
    series = []
    for method in ("factorized Adam", "GaLore", "LowRankAdam"):
        pts = sorted(_mean_point(records, arch, method, p) for p in cfg.fractions)
        series.append(Series(method, [a for a, _ in pts], [b for _, b in pts], style="o-"))
    adaptive = sorted(_mean_point(records, arch, f"LowRankAdam tau={t:g}", "adaptive") for t in cfg.taus)
    series.append(
        Series(
            "LowRankAdam rank-adaptive (tau sweep)",
            [a for a, _ in adaptive],
            [b for _, b in adaptive],
            style="s--",
        )
    )
    return Plot(
        f"{arch}_accuracy_vs_params",
        f"{arch}: test accuracy vs kept fraction of the targeted parameters",
        "line",
        series,
        xlabel="kept fraction of targeted parameters (GaLore: optimizer rank budget)",
        ylabel="test accuracy",
        logx=True,
        hlines={f"dense {dense_acc:.3f}": dense_acc},
    )


def setting_notes(cfg: Config, data: ImageData, command: str) -> str:
    return (
        f"Test accuracy (mean and std over seeds) after training from scratch on {len(data.y_train)} training "
        f"images ({len(data.y_test)} test images). 'fraction' is the budget p (rank k = floor(p m n / (m + n)) "
        "per targeted layer); 'kept' is the measured fraction of the targeted layers' parameters at the end "
        "(GaLore keeps the dense parameters: kept = 1, its budget is the optimizer rank). Rank-adaptive runs start "
        f"at the {max(cfg.fractions):g} budget ranks and may only shrink (max_rank = start). Learning rates ({cfg.lrs}): factorized "
        "Adam and LowRankAdam took the best of a small grid on an MNIST-5k dev run (a different data set), dense "
        "Adam and GaLore standard values (untuned); nothing was tuned on this test set. "
        f"Reproduce: `{command}`."
    )


def config_of(cfg: Config, data: ImageData, prov: dict) -> dict:
    archs = {
        a: {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()} for a, c in cfg.archs.items()
    }
    return {
        "archs": archs,
        "fractions": cfg.fractions,
        "taus": cfg.taus,
        "seeds": {a: list(s) for a, s in cfg.seeds.items()},
        "lrs": cfg.lrs,
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
        "targets": TARGETS,
        **prov,
    }


def pretrain_study(cfg: Config, progress: bool | None = None) -> Result:
    t0 = time.perf_counter()
    prov = provenance(cfg.name, cfg.quick)  # at the start: the commit of the code that runs
    data = load_data(cfg)
    with one_thread():
        records = train_all(cfg, data, progress)
    summaries = summarise(records)
    dense = {
        a: statistics.fmean(r.accuracy for r in records if (r.arch, r.method) == (a, "dense Adam"))
        for a in cfg.archs
    }
    return Result(
        name=cfg.name,
        config=config_of(cfg, data, prov),
        seeds=sorted({s for v in cfg.seeds.values() for s in v}),
        metrics={s.metric_key: s.accuracy for s in summaries.values()},
        tables=[
            Table(
                "Accuracy at a parameter budget",
                COLUMNS,
                [list(dataclasses.astuple(s)) for s in summaries.values()],
            )
        ],
        history={"runs": [list(dataclasses.astuple(r)) for r in records]},
        plots=[plot_arch(a, cfg, records, dense[a]) for a in cfg.archs],
        notes=setting_notes(cfg, data, prov["command"]),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    return pretrain_study(Config.make(quick, seed), progress=progress)


def demo_pretrain(progress: bool | None = None) -> Result:
    """MNIST-5k MLP at 10% of the hidden-layer parameters: factorized Adam vs GaLore vs LowRankAdam (~15 s)."""
    return pretrain_study(Config.demo(), progress=progress)
