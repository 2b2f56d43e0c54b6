"""Train a dense MLP, look at the spectra of its weights, then SVD-truncate it to a parameter budget.

The core ``torchlowrank demo`` section (digits, ~30 s) and the registered experiment
``truncation-sweep`` (Fashion-MNIST; ``--quick`` uses digits). For each kept fraction of the
hidden layers' parameters (the classifier head stays dense) it compares two rank allocations (DESIGN §4.2): ``uniform`` (every layer keeps the same
fraction: k = floor(p m n / (m + n))) and ``energy`` (one global budget shared greedily by
singular-value energy), reporting test accuracy right after truncation and after one short
fine-tuning epoch of the factorized model.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from ..compress import count_parameters, truncate
from ..data import ImageData, load_digits, load_fashion_mnist
from ..models import MLP
from ..ranks import singular_values, spectrum
from ..reproducibility import environment_info, seed_everything
from ..results import Plot, Result, Series, Table
from .training import accuracy, fit_classifier

DESCRIPTION = "Fashion-MNIST MLP: accuracy vs kept parameter fraction, uniform vs energy rank allocation"


# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    name: str = "truncation-sweep"
    dataset: str = "fashion-mnist"  # or "digits"
    n_train: int = 20000  # Fashion-MNIST training images
    hidden: tuple[int, ...] = (512, 256)
    epochs: int = 8
    fractions: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.1, 0.05, 0.02])  # kept parameters
    seed: int = 0
    lr: float = 1e-3
    finetune_epochs: int = 1  # at lr / 10, after truncation

    @classmethod
    def make(cls, quick: bool, seed: int) -> Config:
        if quick:
            return cls(dataset="digits", hidden=(256, 256), epochs=15, fractions=[0.5, 0.25, 0.1], seed=seed)
        return cls(seed=seed)

    @classmethod
    def demo(cls) -> Config:
        return cls(
            name="demo-truncation", dataset="digits", hidden=(256, 256), epochs=30, fractions=[0.5, 0.25]
        )


ALLOCATIONS = ("uniform", "energy")
TARGETS = r"features\..*"


def load_data(cfg: Config, demo: bool = False) -> ImageData:
    if cfg.dataset == "digits":
        return load_digits() if demo else load_digits(seed=cfg.seed)
    return load_fashion_mnist(n_train=cfg.n_train, seed=cfg.seed)


# ----------------------------------------------------------------------------------- train, truncate


@dataclass
class Truncated:
    """The dense model truncated to one kept fraction with one rank allocation: one table row."""

    fraction: float
    allocation: str
    ranks: str  # per targeted layer, " / "-separated
    params_after: int
    actual_fraction: float
    accuracy: float  # right after truncation
    accuracy_finetuned: float  # after the short fine-tuning


def truncate_and_finetune(model, x_train, x_test, data: ImageData, cfg: Config, progress) -> list[Truncated]:
    out = []
    for p in cfg.fractions:
        for allocation in ALLOCATIONS:
            m = copy.deepcopy(model)
            report = truncate(m, p, targets=TARGETS, allocation=allocation)
            acc_trunc = accuracy(m, x_test, data.y_test)
            fit_classifier(
                m,
                x_train,
                data.y_train,
                epochs=cfg.finetune_epochs,
                lr=cfg.lr / 10,
                seed=cfg.seed,
                progress=progress,
                desc=f"finetune {p:g} {allocation}",
            )
            acc_ft = accuracy(m, x_test, data.y_test)
            ranks = " / ".join(str(r) for r in report.ranks.values())
            kept = round(report.targeted_params_after / report.targeted_params_before, 4)
            out.append(Truncated(p, allocation, ranks, report.targeted_params_after, kept, acc_trunc, acc_ft))
    return out


# ----------------------------------------------------------------------------------------- write

COLUMNS = [
    "kept fraction",
    "allocation",
    "ranks per layer",
    "params after",
    "actual fraction",
    "accuracy (truncated)",
    "accuracy (+fine-tune)",
]


def plots_of(model, spectra_table, results: list[Truncated], cfg: Config, dense_acc: float) -> list[Plot]:
    modules = dict(model.named_modules())
    spectra = [
        Series(
            r.name + f" ({'x'.join(map(str, r.shape))})",
            list(range(1, len(sv) + 1)),
            sv,
        )
        for r, sv in ((r, singular_values(modules[r.name].weight).tolist()) for r in spectra_table)
    ]
    acc = [
        Series(a, cfg.fractions, [t.accuracy for t in results if t.allocation == a], style="o-")
        for a in ALLOCATIONS
    ]
    return [
        Plot(
            "spectra",
            "Singular values of the trained weights",
            "line",
            spectra,
            xlabel="index i",
            ylabel="singular value s_i",
            logy=True,
        ),
        Plot(
            "accuracy",
            "Test accuracy after SVD truncation (no fine-tuning)",
            "line",
            acc,
            xlabel="fraction of parameters kept",
            ylabel="test accuracy",
            logx=True,
            hlines={f"dense {dense_acc:.3f}": dense_acc},
        ),
    ]


def truncation_study(cfg: Config, data: ImageData, progress: bool | None = None) -> Result:
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    x_train, x_test = data.flat()
    model = MLP(x_train.shape[1], cfg.hidden, data.num_classes)
    fit_classifier(
        model,
        x_train,
        data.y_train,
        epochs=cfg.epochs,
        lr=cfg.lr,
        seed=cfg.seed,
        progress=progress,
        desc="dense",
    )
    dense_acc = accuracy(model, x_test, data.y_test)
    dense_params = count_parameters(model)
    table = spectrum(model, top_k=5)
    results = truncate_and_finetune(model, x_train, x_test, data, cfg, progress)
    by = {
        f"accuracy_{a}_{t.fraction:g}": t.accuracy for a in ALLOCATIONS for t in results if t.allocation == a
    }
    return Result(
        name=cfg.name,
        config={
            "dataset": "digits" if x_train.shape[1] == 64 else "fashion-mnist",
            "hidden": list(cfg.hidden),
            "epochs": cfg.epochs,
            "lr": cfg.lr,
            "finetune_epochs": cfg.finetune_epochs,
            "finetune_lr": cfg.lr / 10,
            "n_train": len(x_train),
            "n_test": len(x_test),
        },
        seeds=[cfg.seed],
        metrics={"dense_test_accuracy": dense_acc, "dense_parameters": dense_params, **by},
        tables=[
            Table("Spectra of the trained dense weights", table.columns, table.rows()),
            Table("Truncation to a parameter budget", COLUMNS, [list(vars(t).values()) for t in results]),
        ],
        plots=plots_of(model, table, results, cfg, dense_acc),
        notes=(
            f"A dense MLP {list(cfg.hidden)} reaches {dense_acc:.3f} test accuracy. Each targeted layer is "
            "replaced by its best rank-k approximation (truncated SVD, Eckart-Young); the classifier head "
            "stays dense. 'actual fraction' counts the stored U, S, V and bias against the dense hidden layers."
        ),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )


def demo_truncation(progress: bool | None = None) -> Result:
    """Digits: train an MLP, show its spectra, truncate to 50% and 25% of the parameters."""
    cfg = Config.demo()
    return truncation_study(cfg, load_data(cfg, demo=True), progress=progress)


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    cfg = Config.make(quick, seed)
    return truncation_study(cfg, load_data(cfg), progress=progress)
