"""lowrank-pretrain: training MLP / LeNet-5 from scratch at a parameter budget (DESIGN §4.5).

Methods, each from the same seeded dense initialisation and the same batch order per seed:
- ``dense Adam``: the dense model, AdamW (weight decay 0);
- ``factorized Adam``: targeted layers as A B^T (balanced SVD split of the dense init), Adam;
- ``GaLore``: the dense model with GaLoreAdamW, projection rank = the layer's budget rank (the
  parameters stay dense: GaLore saves optimizer memory, not parameters);
- ``LowRankAdam``: targeted layers as U S V^T (best rank-k approximation of the dense init),
  LowRankAdam at fixed rank (its defaults);
- ``LowRankAdam tau=...``: rank adaptive, starting from the largest budget's ranks with
  max_rank = that rank; the kept fraction is what the run ends with.
Budgets: rank k = floor(p m n / (m + n)) per targeted layer for p in ``fractions`` (the first
conv of LeNet-5 and the classifier heads stay dense, as in DLRT's reference setting).

Learning rates: for each (architecture, method, budget) the highest final validation accuracy of the
first seed, searched along one ladder shared by every method (``lowrank_lm.next_lr``: start at
``lr_start``, one ladder step outward while the best is the lowest or highest rate tried). The
validation images are held out of the training set; the test set is evaluated only on the chosen
runs. The rank-adaptive arms reuse the rate chosen for fixed-rank LowRankAdam at the budget they start
from. Curves: at every evaluation step the mean training loss since the previous one and the
validation loss and accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
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
from .lowrank_lm import at_edge, next_lr
from .training import Split, accuracy

DESCRIPTION = (
    "MLP / LeNet-5 from scratch at 5-20% of the parameters: dense, factorized Adam, "
    "GaLore, LowRankAdam fixed and rank-adaptive; lr searched on a validation split"
)

TARGETS = {"mlp": ["features.0", "features.2"], "lenet5": ["features.3", "classifier.1", "classifier.3"]}
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # one ladder of learning rates for every method
QUICK_LRS = {"dense Adam": 1e-3, "factorized Adam": 3e-3, "GaLore": 1e-2, "LowRankAdam": 3e-2}

# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    name: str = "lowrank-pretrain"
    quick: bool = False
    dataset: str = "fashion-mnist"  # or "mnist-5k"
    n_train: int | None = 40000  # None: all of the data set's images (less the validation ones)
    n_val: int = 2000  # held out of the training images, for the learning-rate search
    n_test: int | None = 5000
    data_seed: int = 0
    archs: dict = field(
        default_factory=lambda: {
            "mlp": {"hidden": (512, 256), "epochs": 3, "batch": 128, "galore_gap": 50},
            "lenet5": {"epochs": 3, "batch": 128, "galore_gap": 50},
        }
    )
    eval_every: int = 100  # steps between evaluations of the curves (and the last step)
    min_lr_ratio: float = 0.1  # cosine decay of every learning rate from 1 x to this at the last step
    methods: tuple[str, ...] = ("dense Adam", "factorized Adam", "LowRankAdam")  # "GaLore" optional
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.2])  # parameter budgets p
    taus: list[float] = field(default_factory=lambda: [0.1])  # rank-adaptive LowRankAdam
    seeds: dict = field(default_factory=lambda: {"mlp": [0, 1, 2], "lenet5": [0, 1, 2]})
    lr_ladder: tuple[float, ...] = LADDER
    lr_start: tuple[float, ...] = (3e-3, 1e-2)
    fixed_lr: dict = field(default_factory=dict)  # method -> lr: no search (quick mode)
    # extra arms for ablations, named in ``methods``: label -> (base method "factorized Adam" or
    # "LowRankAdam", optimizer class or None for the base's, optimizer kwargs); empty in the registered run
    variants: dict = field(default_factory=dict)

    @classmethod
    def make(cls, quick: bool, seed: int) -> Config:
        if not quick:
            return cls(data_seed=seed, seeds={a: [seed, seed + 1, seed + 2] for a in ("mlp", "lenet5")})
        return cls(
            quick=True,
            dataset="mnist-5k",
            n_train=2000,
            n_val=500,
            n_test=500,
            data_seed=seed,
            archs={
                "mlp": {"hidden": (128, 64), "epochs": 1, "batch": 128, "galore_gap": 10},
                "lenet5": {"epochs": 1, "batch": 256, "galore_gap": 4},
            },
            eval_every=5,
            methods=("dense Adam", "factorized Adam", "GaLore", "LowRankAdam"),
            fractions=[0.1],
            taus=[0.2],
            seeds={"mlp": [seed], "lenet5": [seed]},
            fixed_lr=dict(QUICK_LRS),
        )

    @classmethod
    def demo(cls) -> Config:
        return cls(
            name="demo-lowrank-pretrain",
            quick=True,
            dataset="mnist-5k",
            n_train=None,
            n_val=500,
            n_test=None,
            archs={"mlp": {"hidden": (128, 64), "epochs": 1, "batch": 128, "galore_gap": 10}},
            eval_every=10,
            methods=("dense Adam", "factorized Adam", "GaLore", "LowRankAdam"),
            fractions=[0.1],
            taus=[0.2],
            seeds={"mlp": [0]},
            fixed_lr=dict(QUICK_LRS),
        )


# ----------------------------------------------------------------------------------------- data


def load_data(cfg: Config) -> Split:
    if cfg.dataset == "fashion-mnist":
        n = None if cfg.n_train is None else cfg.n_train + cfg.n_val
        d = load_fashion_mnist(n_train=n, n_test=cfg.n_test, seed=cfg.data_seed)
    else:
        d = load_mnist_5k(seed=cfg.data_seed)
        n = len(d.y_train) if cfg.n_train is None else min(len(d.y_train), cfg.n_train + cfg.n_val)
        d = ImageData(d.x_train[:n], d.y_train[:n], d.x_test[: cfg.n_test], d.y_test[: cfg.n_test], d.classes)
    perm = torch.randperm(len(d.y_train), generator=torch.Generator().manual_seed(cfg.data_seed))
    val, tr = perm[: cfg.n_val], perm[cfg.n_val :]
    return Split(d.x_train[tr], d.y_train[tr], d.x_train[val], d.y_train[val], d.x_test, d.y_test)


def inputs(arch: str, x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1) if arch == "mlp" else x


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


def galore(model: nn.Module, arch: str, p: float, lr: float, cfg: Config) -> GaLoreAdamW:
    """GaLoreAdamW with projection rank = each targeted layer's budget rank, the rest dense."""
    groups, seen = [], set()
    for _, mod in find_targets(model, TARGETS[arch]):
        W = mod.weight
        groups.append({"params": [W], "rank": max(1, rank_for_fraction(tuple(W.shape), p))})
        seen.add(id(W))
    groups.append({"params": [q for q in model.parameters() if id(q) not in seen], "rank": None})
    gap = cfg.archs[arch]["galore_gap"]
    return GaLoreAdamW(groups, lr=lr, update_gap=gap, scale=0.25, eps=1e-8)


def arms(cfg: Config) -> list[tuple[str, float | str]]:
    """(method, budget) in training order; the dense model has budget 1.0, the tau sweep "adaptive"."""
    out = [("dense Adam", 1.0)] if "dense Adam" in cfg.methods else []
    out += [(m, p) for p in cfg.fractions for m in cfg.methods if m != "dense Adam"]
    return out + [(f"LowRankAdam tau={tau:g}", "adaptive") for tau in cfg.taus]


def shared_lr_arm(method: str, cfg: Config) -> tuple[str, float] | None:
    """The arm whose chosen rate a rank-adaptive arm reuses (fixed-rank LowRankAdam at its start budget)."""
    return ("LowRankAdam", max(cfg.fractions)) if method.startswith("LowRankAdam tau=") else None


def make_run(method: str, budget, base: nn.Module, arch: str, lr: float, cfg: Config):
    """(model, optimizer) of one arm, from a copy of the dense init ``base``."""
    if method == "dense Adam":
        m = copy.deepcopy(base)
        return m, torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    method, opt_cls, kwargs = cfg.variants.get(method, (method, None, {}))
    if method == "factorized Adam":
        m = factorize_ab(copy.deepcopy(base), budget, TARGETS[arch])
        return m, (opt_cls or torch.optim.Adam)(m.parameters(), lr=lr, **kwargs)
    if method == "GaLore":
        m = copy.deepcopy(base)
        return m, galore(m, arch, budget, lr, cfg)
    if method == "LowRankAdam":
        m = to_lowrank(copy.deepcopy(base), arch, budget)
        return m, (opt_cls or LowRankAdam)(m, lr=lr, **kwargs)
    if method.startswith("LowRankAdam tau="):
        m = to_lowrank(copy.deepcopy(base), arch, max(cfg.fractions))
        start = max(mod.rank for _, mod in find_targets(m, TARGETS[arch]))
        return m, LowRankAdam(m, lr=lr, tau=float(method.split("=")[1]), max_rank=start)
    raise ValueError(f"unknown method {method!r}")


# ---------------------------------------------------------------------------------------- train


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode (mode restored after)."""
    was_training = model.training
    model.eval()
    loss = sum(
        float(F.cross_entropy(model(x[i : i + batch]), y[i : i + batch], reduction="sum"))
        for i in range(0, len(x), batch)
    )
    model.train(was_training)
    return loss / len(x), accuracy(model, x, y)


def train(model, opt, x, y, x_val, y_val, epochs: int, batch: int, seed: int, cfg: Config, bar) -> dict:
    """Train (full batches only; the rate decays by a cosine to ``min_lr_ratio``); the curves at step 0,
    every ``eval_every`` steps and the last step: the mean training loss since the previous evaluation,
    the validation loss and accuracy."""
    g = torch.Generator().manual_seed(seed)
    val_loss, val_acc = evaluate(model, x_val, y_val)
    curve = {"step": [0], "train_loss": [float("nan")], "val_loss": [val_loss], "val_acc": [val_acc]}
    last, step, since = epochs * (len(x) // batch), 0, []
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * s / last))
    )
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):  # the last partial batch is dropped
            idx = perm[i : i + batch]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            since.append(float(loss.detach()))
            bar.update(1)
            if step % cfg.eval_every == 0 or step == last:
                val_loss, val_acc = evaluate(model, x_val, y_val)
                curve["step"].append(step)
                curve["train_loss"].append(statistics.fmean(since))
                curve["val_loss"].append(val_loss)
                curve["val_acc"].append(val_acc)
                since = []
    return curve


@dataclass
class Record:
    """One trained model (one row of the history)."""

    arch: str
    method: str
    seed: int
    fraction: float | str  # the budget p, 1.0 for dense, "adaptive" for the rank-adaptive runs
    lr: float
    kept: float  # measured fraction of the targeted layers' parameters at the end
    total_params: int
    val_accuracy: float  # at the end of training
    test_accuracy: float | None  # only for the runs at the chosen learning rate
    ranks: str  # ranks of the targeted layers, "/"-separated ("full" for dense ones)
    seconds: float
    curve: dict  # step, train_loss, val_loss, val_acc at every evaluation step


def run_one(
    arch: str, method: str, budget, seed: int, lr: float, cfg: Config, data: Split, base, bar
) -> tuple:
    acfg = cfg.archs[arch]
    model, opt = make_run(method, budget, base, arch, lr, cfg)
    t1 = time.perf_counter()
    x_val = inputs(arch, data.x_val)
    curve = train(
        model,
        opt,
        inputs(arch, data.x_train),
        data.y_train,
        x_val,
        data.y_val,
        acfg["epochs"],
        acfg["batch"],
        seed,
        cfg,
        bar,
    )
    seconds = time.perf_counter() - t1
    if isinstance(opt, LowRankAdam):
        opt.remove_hooks()
    mods = [m for _, m in find_targets(model, TARGETS[arch])]
    kept = sum(count_parameters(m) for m in mods) / targeted_params(base, arch)
    ranks = "/".join(str(getattr(m, "rank", "full")) for m in mods)
    rec = Record(
        arch,
        method,
        seed,
        budget,
        lr,
        kept,
        count_parameters(model),
        curve["val_acc"][-1],
        None,
        ranks,
        seconds,
        curve,
    )
    return rec, model


def search_lr(arch: str, method: str, budget, cfg: Config, data: Split, base, bar) -> tuple[list, tuple]:
    """The first seed at lr_start, then outward along the ladder (``next_lr``) on validation accuracy."""
    runs = {}
    queue = [cfg.fixed_lr[method]] if cfg.fixed_lr else list(cfg.lr_start)
    while queue:
        lr = queue.pop(0)
        runs[lr] = run_one(arch, method, budget, cfg.seeds[arch][0], lr, cfg, data, base, bar)
        if not queue and not cfg.fixed_lr:
            nxt = next_lr(cfg.lr_ladder, {k: -r[0].val_accuracy for k, r in runs.items()})
            queue = [] if nxt is None else [nxt]
    best = max(runs.values(), key=lambda rm: rm[0].val_accuracy)  # ties: the first tried
    return [r for r, _ in runs.values()], best


def train_arch(arch: str, cfg: Config, data: Split, bar) -> tuple[list[Record], list[Record], dict]:
    """(tuning runs of the first seed, runs at the chosen rates on every seed, rates tried per arm)."""
    acfg = cfg.archs[arch]
    seeds = cfg.seeds[arch]
    bases = {s: build(arch, acfg.get("hidden", ()), s) for s in seeds}
    x_test = inputs(arch, data.x_test)
    tuning, chosen, tried = [], [], {}
    for seed in seeds:
        for method, budget in arms(cfg):
            source = shared_lr_arm(method, cfg)
            if seed == seeds[0] and source is None:  # searched on the validation split
                runs, (rec, model) = search_lr(arch, method, budget, cfg, data, bases[seed], bar)
                tuning += runs
                tried[(method, budget)] = sorted(r.lr for r in runs)
            else:
                lr = next(r.lr for r in chosen if (r.method, r.fraction) == (source or (method, budget)))
                tried.setdefault((method, budget), tried[source] if source else [lr])
                rec, model = run_one(arch, method, budget, seed, lr, cfg, data, bases[seed], bar)
            rec.test_accuracy = accuracy(model, x_test, data.y_test)  # only the chosen runs see the test set
            chosen.append(rec)
    return tuning, chosen, tried


def train_all(cfg: Config, data: Split, progress: bool | None) -> tuple[list[Record], list[Record], dict]:
    tuning, chosen, tried = [], [], {}
    per_search = 1 if cfg.fixed_lr else len(cfg.lr_start) + 1  # a guess: the search length is not known ahead
    for arch, acfg in cfg.archs.items():
        steps = acfg["epochs"] * (len(data.y_train) // acfg["batch"])
        runs = len(arms(cfg)) * (per_search + len(cfg.seeds[arch]) - 1)
        bar = progress_bar(total=runs * steps, desc=f"{cfg.name} {arch}", enabled=progress)
        t, c, tr = train_arch(arch, cfg, data, bar)
        tuning, chosen = tuning + t, chosen + c
        tried.update({(arch, *k): v for k, v in tr.items()})
        bar.close()
    return tuning, chosen, tried


# ------------------------------------------------------------------------------------- evaluate


@dataclass
class Summary:
    """One (architecture, method, budget) over seeds; one row of the table."""

    model: str
    method: str
    fraction: float | str
    lr: float
    lrs_tried: str  # on the first seed ("from LowRankAdam p" for the rank-adaptive arms)
    lr_at_edge: bool  # the chosen rate is the lowest or highest tried: the ladder ended there
    kept: float
    params: int
    val_accuracy: float
    accuracy: float  # test
    std: float  # test accuracy over seeds
    seeds: int
    ranks: str  # of the first seed
    train_s: float

    @property
    def metric_key(self) -> str:
        budget = f"_{self.fraction:g}" if isinstance(self.fraction, float) and self.fraction != 1.0 else ""
        return f"accuracy_{self.model}_{self.method.replace(' ', '_')}{budget}"


def group(records: list[Record]) -> dict[tuple, list[Record]]:
    """(arch, method, fraction) -> its records, in the order the runs were made."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((r.arch, r.method, r.fraction), []).append(r)
    return groups


def summarise(chosen: list[Record], tried: dict) -> dict[tuple, Summary]:
    out = {}
    for key, rs in group(chosen).items():
        accs = [r.test_accuracy for r in rs]
        lrs = tried[key]
        out[key] = Summary(
            *key,
            rs[0].lr,
            " / ".join(f"{x:g}" for x in lrs),
            at_edge(lrs, rs[0].lr),
            round(statistics.fmean(r.kept for r in rs), 4),
            round(statistics.fmean(r.total_params for r in rs)),
            statistics.fmean(r.val_accuracy for r in rs),
            statistics.fmean(accs),
            statistics.stdev(accs) if len(accs) > 1 else 0.0,
            len(rs),
            rs[0].ranks,
            statistics.fmean(r.seconds for r in rs),
        )
    return out


def mean_curve(rs: list[Record], name: str) -> list[float]:
    return [statistics.fmean(r.curve[name][i] for r in rs) for i in range(len(rs[0].curve["step"]))]


# ---------------------------------------------------------------------------------------- write

COLUMNS = [
    "model",
    "method",
    "fraction",
    "lr",
    "lrs tried (seed 0)",
    "lr at grid edge",
    "kept",
    "params (total)",
    "val accuracy",
    "accuracy",
    "std",
    "seeds",
    "ranks (seed 0)",
    "train s",
]


def curve_table(arch: str, chosen: list[Record], name: str, title: str) -> Table:
    """One row per arm of ``arch``: the curve ``name`` (mean over seeds) at every evaluation step after 0."""
    groups = {k: rs for k, rs in group(chosen).items() if k[0] == arch}
    steps = next(iter(groups.values()))[0].curve["step"][1:]
    rows = [[method, budget] + mean_curve(rs, name)[1:] for (_, method, budget), rs in groups.items()]
    return Table(f"{arch}: {title}", ["method", "fraction"] + [f"step {s}" for s in steps], rows)


def _mean_point(records: list[Record], arch: str, method: str, label) -> tuple[float, float]:
    """(mean kept fraction, mean test accuracy) of one cell over seeds (the kept fraction unrounded)."""
    rs = [r for r in records if (r.arch, r.method, r.fraction) == (arch, method, label)]
    return statistics.fmean(r.kept for r in rs), statistics.fmean(r.test_accuracy for r in rs)


def plot_arch(arch: str, cfg: Config, chosen: list[Record], dense_acc: float) -> Plot:
    series = []
    for method in [m for m in cfg.methods if m != "dense Adam"]:
        pts = sorted(_mean_point(chosen, arch, method, p) for p in cfg.fractions)
        series.append(Series(method, [a for a, _ in pts], [b for _, b in pts], style="o-"))
    adaptive = sorted(_mean_point(chosen, arch, f"LowRankAdam tau={t:g}", "adaptive") for t in cfg.taus)
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


def curve_plots(arch: str, cfg: Config, chosen: list[Record]) -> list[Plot]:
    """Per budget: validation accuracy and training loss (mean over seeds) against steps, every arm at that
    budget with the dense model (and, at the largest budget, the rank-adaptive arms that start there)."""
    groups = {k: rs for k, rs in group(chosen).items() if k[0] == arch}
    plots = []
    for p in cfg.fractions:
        keep = [k for k in groups if k[2] in (1.0, p) or (k[2] == "adaptive" and p == max(cfg.fractions))]
        for name, label, logy in (
            ("val_acc", "validation accuracy", False),
            ("train_loss", "training loss", True),
        ):
            series = []
            for k in keep:
                rs = groups[k]
                series.append(
                    Series(
                        f"{k[1]} (lr {rs[0].lr:g})",
                        rs[0].curve["step"][1:],
                        mean_curve(rs, name)[1:],
                        style=".-",
                    )
                )
            plots.append(
                Plot(
                    f"{arch}_{name}_p{round(100 * p)}",
                    f"{arch}: {label} vs step, budget {p:g} (mean over seeds)",
                    "line",
                    series,
                    xlabel="step",
                    ylabel=label + (" (mean since the previous point)" if name == "train_loss" else ""),
                    logy=logy,
                )
            )
    return plots


def setting_notes(cfg: Config, data: Split, command: str) -> str:
    search = (
        "fixed per method (quick): " + ", ".join(f"{m} {lr:g}" for m, lr in cfg.fixed_lr.items())
        if cfg.fixed_lr
        else "searched per (model, method, budget) on the first seed: start at "
        + " and ".join(f"{x:g}" for x in cfg.lr_start)
        + ", then one step of the ladder "
        + " / ".join(f"{x:g}" for x in cfg.lr_ladder)
        + " beyond the best while the best is the lowest or highest rate tried; best = highest final "
        "validation accuracy"
    )
    return (
        f"Training from scratch on {len(data.y_train)} training images; {len(data.y_val)} validation images "
        f"held out of the training set; test accuracy (mean and std over seeds) on {len(data.y_test)} test "
        "images, evaluated only on the runs at the chosen learning rate. 'fraction' is the budget p (rank "
        "k = floor(p m n / (m + n)) per targeted layer); 'kept' is the measured fraction of the targeted "
        "layers' parameters at the end (GaLore keeps the dense parameters: kept = 1, its budget is the "
        f"optimizer rank). Rank-adaptive runs start at the {max(cfg.fractions):g} budget ranks and may only "
        "shrink (max_rank = start); they reuse the rate chosen for fixed-rank LowRankAdam at that budget. "
        f"Learning rates {search}; 'lr at grid edge' marks a chosen rate that is the lowest or highest "
        f"tried (the ladder ended). Curves: evaluated every {cfg.eval_every} steps and at the last step; "
        "'train loss' is the mean minibatch loss since the previous evaluation. Every rate decays by a cosine "
        f"to {cfg.min_lr_ratio:g} x at the last step; the last partial batch of each epoch is dropped. "
        f"Reproduce: `{command}`."
    )


def config_of(cfg: Config, data: Split, prov: dict) -> dict:
    archs = {
        a: {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()} for a, c in cfg.archs.items()
    }
    return {
        "archs": archs,
        "methods": list(cfg.methods),
        "fractions": cfg.fractions,
        "taus": cfg.taus,
        "seeds": {a: list(s) for a, s in cfg.seeds.items()},
        "eval_every": cfg.eval_every,
        "min_lr_ratio": cfg.min_lr_ratio,
        "lr_ladder": list(cfg.lr_ladder),
        "lr_start": list(cfg.lr_start),
        "fixed_lr": cfg.fixed_lr,
        "n_train": len(data.y_train),
        "n_val": len(data.y_val),
        "n_test": len(data.y_test),
        "targets": TARGETS,
        **prov,
    }


def tuning_table(tuning: list[Record], chosen: list[Record]) -> Table:
    picked = {(r.arch, r.method, r.fraction, r.lr) for r in chosen}
    return Table(
        "Learning-rate search (first seed, final validation accuracy)",
        ["model", "method", "fraction", "lr", "val accuracy", "val loss", "chosen"],
        [
            [
                r.arch,
                r.method,
                r.fraction,
                r.lr,
                r.val_accuracy,
                r.curve["val_loss"][-1],
                (r.arch, r.method, r.fraction, r.lr) in picked,
            ]
            for r in tuning
        ],
    )


def pretrain_study(cfg: Config, progress: bool | None = None) -> Result:
    t0 = time.perf_counter()
    prov = provenance(cfg.name, cfg.quick)  # at the start: the commit of the code that runs
    data = load_data(cfg)
    with one_thread():
        tuning, chosen, tried = train_all(cfg, data, progress)
    summaries = summarise(chosen, tried)
    dense = {
        a: statistics.fmean(r.test_accuracy for r in chosen if (r.arch, r.method) == (a, "dense Adam"))
        for a in cfg.archs
    }
    metrics = {s.metric_key: s.accuracy for s in summaries.values()}
    metrics.update({s.metric_key.replace("accuracy_", "lr_", 1): s.lr for s in summaries.values()})
    metrics.update(
        {s.metric_key.replace("accuracy_", "lr_at_edge_", 1): float(s.lr_at_edge) for s in summaries.values()}
    )
    return Result(
        name=cfg.name,
        config=config_of(cfg, data, prov),
        seeds=sorted({s for v in cfg.seeds.values() for s in v}),
        metrics=metrics,
        tables=[
            Table(
                "Accuracy at a parameter budget (at each arm's validation-chosen lr)",
                COLUMNS,
                [list(dataclasses.astuple(s)) for s in summaries.values()],
            ),
            tuning_table(tuning, chosen),
            *[
                curve_table(a, chosen, "val_acc", "validation accuracy vs step (mean over seeds)")
                for a in cfg.archs
            ],
            *[
                curve_table(a, chosen, "train_loss", "training loss vs step (mean over seeds)")
                for a in cfg.archs
            ],
        ],
        history={
            "runs": [dataclasses.asdict(r) for r in chosen],
            "tuning": [dataclasses.asdict(r) for r in tuning],
        },
        plots=[plot_arch(a, cfg, chosen, dense[a]) for a in cfg.archs]
        + [p for a in cfg.archs for p in curve_plots(a, cfg, chosen)],
        notes=setting_notes(cfg, data, prov["command"]),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    return pretrain_study(Config.make(quick, seed), progress=progress)


def demo_pretrain(progress: bool | None = None) -> Result:
    """MNIST-5k MLP at 10% of the hidden-layer parameters: factorized Adam vs GaLore vs LowRankAdam (~15 s)."""
    return pretrain_study(Config.demo(), progress=progress)
