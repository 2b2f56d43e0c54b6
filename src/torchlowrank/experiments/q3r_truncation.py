"""Q3R then truncate (DESIGN §4.6): train dense weights toward a target rank, cut them to a parameter budget.

Registered experiment ``q3r-truncation``: a SmallViT on Fashion-MNIST with every attention (q, k, v,
proj) and MLP Linear regularized; four runs per seed -- dense AdamW, AdamW + Q3R, AdamW + nuclear
norm (sub-gradient), and factorized ``LowRankLinear`` training at the Q3R target rank (the parameter
count the Q3R model has when truncated to its target rank) -- then ``tlr.truncate`` of each dense
model to kept fractions 0.1 .. 1.0 of the regularized layers' parameters, with and without one short
fine-tuning epoch. The published claim tested: the Q3R model keeps its accuracy at 40% of the
parameters while the dense model collapses under the same truncation.

Also the ``q3r`` section of ``torchlowrank demo`` (digits MLP: spectra with and without Q3R, and the
truncation curve).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compress import count_parameters, factorize, truncate
from ..data import ImageData, load_digits, load_fashion_mnist
from ..models import MLP, SmallViT
from ..regularizers import Q3R, NuclearNorm
from ..reproducibility import environment_info, git_commit, one_thread, seed_everything
from ..results import Plot, Result, Series, Table
from .training import accuracy, fit_classifier

DESCRIPTION = (
    "SmallViT on Fashion-MNIST: Q3R vs dense / nuclear norm / factorized, "
    "accuracy after SVD truncation to 10%..100% of the parameters"
)

VIT_TARGETS = r"blocks\.\d+\.(attn\.(q|k|v|proj)|mlp\.(0|3))"
METHODS = ("dense", "q3r", "nuclear", "factorized")
TRUNCATED = ("dense", "q3r", "nuclear")  # the dense-weight methods, truncated after training

# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    quick: bool = False
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_train: int = 4000
    n_test: int = 2000
    epochs: int = 5
    fractions: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 11)])
    vit: dict = field(default_factory=lambda: dict(dim=64, depth=4, heads=4, patch_size=7))
    rank: int = 8  # the Q3R target rank (and the factorized model's rank)
    lr: float = 1e-3
    lam_q3r: float = 0.1
    lam_nuclear: float = 0.03
    finetune_n: int = 1000  # images of the one short fine-tuning epoch after truncation (at lr / 10)
    command: str = "torchlowrank reproduce q3r-truncation --out docs/results/q3r-truncation"

    @classmethod
    def make(cls, quick: bool, seed: int) -> Config:
        if not quick:
            return cls(seeds=[seed, seed + 1, seed + 2])
        return cls(
            quick=True,
            seeds=[seed],
            n_train=600,
            n_test=300,
            epochs=1,
            fractions=[0.2, 0.4, 1.0],
            vit=dict(dim=32, depth=2, heads=4, patch_size=7),
            rank=4,
            finetune_n=200,
            command="torchlowrank reproduce q3r-truncation --quick",
        )


# ------------------------------------------------------------------------------------ model


def tail_energy(model: nn.Module, targets, rank: int) -> float:
    """Mean over the targeted dense layers of sum_{i > rank} s_i^2 / sum_i s_i^2."""
    fracs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _matches(name, targets):
            s2 = torch.linalg.svdvals(module.weight.detach().double()) ** 2
            fracs.append(float(s2[rank:].sum() / s2.sum()))
    return statistics.fmean(fracs) if fracs else float("nan")


def _matches(name: str, targets) -> bool:
    from ..targets import name_matches

    return name_matches(name, targets)


def train_method(
    method: str,
    build,
    data: ImageData,
    *,
    targets,
    rank: int,
    epochs: int,
    lr: float,
    lam_q3r: float,
    lam_nuclear: float,
    seed: int,
    progress: bool | None,
) -> tuple[nn.Module, dict]:
    """Train one model with ``method``; returns (model, info) with test accuracy and wall time."""
    seed_everything(seed)
    model = build()
    if method == "factorized":
        factorize(model, rank, targets=targets)
    reg = None
    if method == "q3r":
        reg = Q3R(model, rank, lam_q3r, period=5, targets=targets, seed=seed)
    elif method == "nuclear":
        reg = NuclearNorm(model, lam_nuclear, targets=targets)
    t0 = time.perf_counter()
    fit_classifier(
        model,
        data.x_train,
        data.y_train,
        epochs=epochs,
        lr=lr,
        seed=seed,
        progress=progress,
        desc=method,
        after_backward=(lambda step: reg.step()) if reg is not None else None,
    )
    info = {
        "accuracy": accuracy(model, data.x_test, data.y_test),
        "train_s": time.perf_counter() - t0,
        "parameters": count_parameters(model),
    }
    if method != "factorized":
        info["tail_energy"] = tail_energy(model, targets, rank)
    return model, info


def truncation_curve(
    model: nn.Module,
    data: ImageData,
    *,
    targets,
    fractions,
    finetune_n: int,
    lr: float,
    seed: int,
    progress: bool | None,
) -> tuple[list[float], list[float], list[float]]:
    """(accuracy truncated, accuracy after one fine-tuning epoch on ``finetune_n`` images, actual fraction)."""
    acc, acc_ft, actual = [], [], []
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.x_train), generator=g)[:finetune_n]
    for p in fractions:
        m = copy.deepcopy(model)
        report = truncate(m, p, targets=targets)
        acc.append(accuracy(m, data.x_test, data.y_test))
        actual.append(report.targeted_params_after / report.targeted_params_before)
        fit_classifier(
            m,
            data.x_train[idx],
            data.y_train[idx],
            epochs=1,
            lr=lr / 10,
            seed=seed,
            progress=progress,
            desc=f"finetune {p:g}",
        )
        acc_ft.append(accuracy(m, data.x_test, data.y_test))
    return acc, acc_ft, actual


# ------------------------------------------------------------------------------------- train


@dataclass
class MethodRun:
    """One method trained on one seed, and (dense methods) its truncation curve."""

    accuracy: float
    train_s: float
    parameters: int
    tail_energy: float | None = None  # None for the factorized model
    truncated: list[float] | None = None  # accuracy per kept fraction, no fine-tuning
    finetuned: list[float] | None = None  # ... after one short fine-tuning epoch
    actual_fraction: list[float] | None = None  # kept fraction the truncation reached


def train_seed(cfg: Config, seed: int, progress: bool | None) -> dict[str, MethodRun]:
    """Every method on one seed's data, each dense model then truncated to every kept fraction."""
    data = load_fashion_mnist(n_train=cfg.n_train, n_test=cfg.n_test, seed=seed)
    out = {}
    for method in METHODS:
        model, info = train_method(
            method,
            lambda: SmallViT(**cfg.vit),
            data,
            targets=VIT_TARGETS,
            rank=cfg.rank,
            epochs=cfg.epochs,
            lr=cfg.lr,
            lam_q3r=cfg.lam_q3r,
            lam_nuclear=cfg.lam_nuclear,
            seed=seed,
            progress=progress,
        )
        run = MethodRun(info["accuracy"], info["train_s"], info["parameters"], info.get("tail_energy"))
        if method in TRUNCATED:
            run.truncated, run.finetuned, run.actual_fraction = truncation_curve(
                model,
                data,
                targets=VIT_TARGETS,
                fractions=cfg.fractions,
                finetune_n=cfg.finetune_n,
                lr=cfg.lr,
                seed=seed,
                progress=progress,
            )
        out[method] = run
    return out


def factorized_fraction(cfg: Config) -> float:
    """Parameters of the rank-r factorized targeted layers over their dense parameters."""
    layers = [
        m
        for n, m in SmallViT(**cfg.vit).named_modules()
        if isinstance(m, nn.Linear) and _matches(n, VIT_TARGETS)
    ]
    targeted = sum(m.weight.numel() for m in layers)
    return sum(cfg.rank * (m.weight.shape[0] + m.weight.shape[1]) for m in layers) / targeted


# ---------------------------------------------------------------------------------- evaluate


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: list[float]) -> str:
    m, s = _mean_std(values)
    return f"{m:.4f} ± {s:.4f}"


@dataclass
class Study:
    """All runs, read by name: ``runs[method]`` is the list over seeds."""

    cfg: Config
    runs: dict[str, list[MethodRun]]
    factorized_fraction: float

    def accuracies(self, method: str) -> list[float]:
        return [r.accuracy for r in self.runs[method]]

    def at(self, method: str, curve: str, j: int) -> list[float]:
        """Accuracy over seeds at the j-th kept fraction; curve: "truncated" or "finetuned"."""
        return [getattr(r, curve)[j] for r in self.runs[method]]


def metrics_of(study: Study) -> dict:
    cfg, metrics = study.cfg, {}
    for method in TRUNCATED:
        metrics[f"{method}_test_accuracy"] = statistics.fmean(study.accuracies(method))
        for j, p in enumerate(cfg.fractions):
            metrics[f"{method}_truncated_{p:g}"] = _mean_std(study.at(method, "truncated", j))[0]
            metrics[f"{method}_finetuned_{p:g}"] = _mean_std(study.at(method, "finetuned", j))[0]
    metrics["factorized_test_accuracy"] = statistics.fmean(study.accuracies("factorized"))
    metrics["factorized_param_fraction"] = study.factorized_fraction
    # the accuracy lost by truncation at the kept fraction nearest 40% (the published claim's budget)
    p40 = cfg.fractions[min(range(len(cfg.fractions)), key=lambda j: abs(cfg.fractions[j] - 0.4))]
    for m in TRUNCATED:
        metrics[f"{m}_drop_at_{p40:g}"] = metrics[f"{m}_test_accuracy"] - metrics[f"{m}_truncated_{p40:g}"]
    return metrics


# ------------------------------------------------------------------------------------- write


def tables_of(study: Study) -> list[Table]:
    cfg = study.cfg
    train_rows = []
    for method in METHODS:
        runs = study.runs[method]
        tail = [r.tail_energy for r in runs if r.tail_energy is not None]
        train_rows.append(
            [
                method,
                _pm(study.accuracies(method)),
                f"{statistics.fmean(tail):.4f}" if tail else "-",
                round(statistics.fmean(r.train_s for r in runs), 1),
                runs[0].parameters,
            ]
        )
    rows = [
        [method, p, round(study.runs[method][-1].actual_fraction[j], 4)]
        + [_pm(study.at(method, "truncated", j)), _pm(study.at(method, "finetuned", j))]
        for method in TRUNCATED
        for j, p in enumerate(cfg.fractions)
    ]
    fact = [f"factorized (trained at rank {cfg.rank})", "-", round(study.factorized_fraction, 4)]
    rows.append(fact + [_pm(study.accuracies("factorized")), "-"])
    return [
        Table(
            "Training (mean ± std over seeds)",
            ["method", "test accuracy", "tail energy beyond target rank", "train time (s)", "parameters"],
            train_rows,
        ),
        Table(
            "Accuracy after truncation to a kept fraction of the regularized layers' parameters",
            [
                "method",
                "kept fraction",
                "actual fraction",
                "accuracy (truncated)",
                "accuracy (+1 short epoch)",
            ],
            rows,
        ),
    ]


def plot_of(study: Study) -> Plot:
    cfg = study.cfg
    n = len(cfg.fractions)

    def series(curve: str, style: str, suffix: str) -> list[Series]:
        out = []
        for method in TRUNCATED:
            ys = [statistics.fmean(study.at(method, curve, j)) for j in range(n)]
            err = [_mean_std(study.at(method, curve, j))[1] for j in range(n)]
            err = err if len(cfg.seeds) > 1 else None
            out.append(Series(f"{method}{suffix}", list(cfg.fractions), ys, err=err, style=style))
        return out

    fact_acc = statistics.fmean(study.accuracies("factorized"))
    dense_full = statistics.fmean(study.accuracies("dense"))
    return Plot(
        "accuracy",
        "SmallViT on Fashion-MNIST: test accuracy after SVD truncation",
        "line",
        series("truncated", "o-", " (truncated)")
        + series("finetuned", "s--", " (+1 short epoch)")
        + [Series(f"factorized rank {cfg.rank}", [study.factorized_fraction], [fact_acc], style="k*")],
        xlabel="fraction of the regularized layers' parameters kept",
        ylabel="test accuracy",
        hlines={f"dense untruncated {dense_full:.3f}": dense_full},
    )


def setting_notes(cfg: Config) -> str:
    """The setting, as run; the reading of the numbers is in docs/."""
    return (
        f"'tail energy' = mean over the regularized layers of sum_(i>{cfg.rank}) s_i^2 / sum s_i^2; "
        f"'drop_at_p' = untruncated minus truncated test accuracy at kept fraction p (means over seeds "
        f"{cfg.seeds}). Budget: {cfg.n_train} training / {cfg.n_test} test images, {cfg.epochs} epochs, "
        f"fine-tuning = 1 epoch over {cfg.finetune_n} training images at lr/10. Command: {cfg.command}"
    )


def config_of(cfg: Config, commit: str | None) -> dict:
    return {
        "dataset": "fashion-mnist",
        "n_train": cfg.n_train,
        "n_test": cfg.n_test,
        "epochs": cfg.epochs,
        "batch_size": 64,
        "optimizer": "AdamW",
        "lr": cfg.lr,
        "vit": cfg.vit,
        "targets": VIT_TARGETS,
        "target_rank": cfg.rank,
        "q3r": {"lam": cfg.lam_q3r, "period": 5, "mode": "coupled"},
        "nuclear": {"lam": cfg.lam_nuclear, "mode": "sub-gradient"},
        "fractions": cfg.fractions,
        "finetune": {"epochs": 1, "n_images": cfg.finetune_n, "lr": cfg.lr / 10},
        "command": cfg.command,
        "git_commit": commit,
    }


def q3r_truncation_study(cfg: Config, progress: bool | None = None) -> Result:
    t0 = time.perf_counter()
    commit = git_commit()  # read at the start: the tree may move on during a long run
    runs: dict[str, list[MethodRun]] = {m: [] for m in METHODS}
    with one_thread():
        for seed in cfg.seeds:
            for method, run_ in train_seed(cfg, seed, progress).items():
                runs[method].append(run_)
    study = Study(cfg, runs, factorized_fraction(cfg))
    return Result(
        name="q3r-truncation",
        config=config_of(cfg, commit),
        seeds=cfg.seeds,
        metrics=metrics_of(study),
        tables=tables_of(study),
        plots=[plot_of(study)],
        notes=setting_notes(cfg),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    return q3r_truncation_study(Config.make(quick, seed), progress=progress)


# -- demo section ----------------------------------------------------------------------------------------------

DEMO = dict(
    rank=8, targets=r"features\..*", fractions=[0.05, 0.1, 0.2, 0.3, 0.5], lam=0.1, epochs=15, lr=1e-3
)


def _demo_model(label: str, lam: float, x_train, y_train, progress: bool | None) -> nn.Module:
    """The digits MLP trained with AdamW, with Q3R when ``lam`` > 0."""
    seed_everything(0)
    model = MLP(64, (128, 128), 10)
    reg = Q3R(model, DEMO["rank"], lam, targets=DEMO["targets"]) if lam else None
    fit_classifier(
        model,
        x_train,
        y_train,
        epochs=DEMO["epochs"],
        lr=DEMO["lr"],
        progress=progress,
        desc=label,
        after_backward=(lambda step, reg=reg: reg.step()) if reg else None,
    )
    return model


def _demo_truncated(model: nn.Module, x_test, y_test) -> list[float]:
    accs = []
    for p in DEMO["fractions"]:
        m = copy.deepcopy(model)
        truncate(m, p, targets=DEMO["targets"])
        accs.append(accuracy(m, x_test, y_test))
    return accs


def demo_q3r(progress: bool | None = None) -> Result:
    """Digits MLP trained with and without Q3R (rank 8): spectra, then truncation to 10%..50%."""
    t0 = time.perf_counter()
    data = load_digits()
    x_train, x_test = data.flat()
    rank, targets, fractions = DEMO["rank"], DEMO["targets"], DEMO["fractions"]
    rows, spectra, curves, full_acc = [], [], {}, {}
    with one_thread():
        for label, lam in (("dense", 0.0), ("q3r", DEMO["lam"])):
            model = _demo_model(label, lam, x_train, data.y_train, progress)
            s = torch.linalg.svdvals(model.features[2].weight.detach()).tolist()
            spectra.append(Series(f"{label} (features.2)", list(range(1, len(s) + 1)), s))
            curves[label] = _demo_truncated(model, x_test, data.y_test)
            full_acc[label] = accuracy(model, x_test, data.y_test)
            rows.append([label, full_acc[label], round(tail_energy(model, targets, rank), 4)] + curves[label])
    metrics = {f"{label}_accuracy": a for label, a in full_acc.items()}
    metrics.update({f"{k}_truncated_{p:g}": v[j] for k, v in curves.items() for j, p in enumerate(fractions)})
    return Result(
        name="demo-q3r",
        config={
            "dataset": "digits",
            "hidden": [128, 128],
            "epochs": DEMO["epochs"],
            "lr": DEMO["lr"],
            "target_rank": rank,
            "lam": DEMO["lam"],
            "fractions": fractions,
        },
        seeds=[0],
        metrics=metrics,
        tables=[
            Table(
                "Digits MLP with and without Q3R (target rank 8), then SVD truncation",
                ["model", "accuracy", f"tail energy beyond rank {rank}"]
                + [f"acc @ {p:g}" for p in fractions],
                rows,
            )
        ],
        plots=[
            Plot(
                "spectra",
                "Singular values of the second hidden layer",
                "line",
                spectra,
                xlabel="index i",
                ylabel="s_i",
                logy=True,
            ),
            Plot(
                "truncation",
                "Accuracy after truncation (no fine-tuning)",
                "line",
                [Series(k, fractions, v, style="o-") for k, v in curves.items()],
                xlabel="fraction of hidden-layer parameters kept",
                ylabel="test accuracy",
            ),
        ],
        notes="Q3R: lam 0.1, period 5, coupled with AdamW, target rank 8 for each hidden layer.",
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )
