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

from ..compress import count_parameters, truncate
from ..data import ImageData, load_digits, load_fashion_mnist
from ..models import MLP
from ..ranks import singular_values, spectrum
from ..reproducibility import environment_info, seed_everything
from ..results import Plot, Result, Series, Table
from .training import accuracy, fit_classifier

DESCRIPTION = "Fashion-MNIST MLP: accuracy vs kept parameter fraction, uniform vs energy rank allocation"


def truncation_study(
    name: str,
    data: ImageData,
    hidden: tuple[int, ...],
    epochs: int,
    fractions: list[float],
    seed: int,
    lr: float = 1e-3,
    finetune_epochs: int = 1,
    progress: bool | None = None,
) -> Result:
    t0 = time.perf_counter()
    seed_everything(seed)
    x_train, x_test = data.flat()
    model = MLP(x_train.shape[1], hidden, data.num_classes)
    fit_classifier(
        model, x_train, data.y_train, epochs=epochs, lr=lr, seed=seed, progress=progress, desc="dense"
    )
    dense_acc = accuracy(model, x_test, data.y_test)
    dense_params = count_parameters(model)
    table = spectrum(model, top_k=5)

    rows, acc_by = [], {"uniform": [], "energy": []}
    for p in fractions:
        for allocation in ("uniform", "energy"):
            m = copy.deepcopy(model)
            report = truncate(m, p, targets=r"features\..*", allocation=allocation)
            acc_trunc = accuracy(m, x_test, data.y_test)
            fit_classifier(
                m,
                x_train,
                data.y_train,
                epochs=finetune_epochs,
                lr=lr / 10,
                seed=seed,
                progress=progress,
                desc=f"finetune {p:g} {allocation}",
            )
            acc_ft = accuracy(m, x_test, data.y_test)
            acc_by[allocation].append(acc_trunc)
            rows.append(
                [
                    p,
                    allocation,
                    " / ".join(str(r) for r in report.ranks.values()),
                    report.targeted_params_after,
                    round(report.targeted_params_after / report.targeted_params_before, 4),
                    acc_trunc,
                    acc_ft,
                ]
            )

    plots = [
        Plot(
            "spectra",
            "Singular values of the trained weights",
            "line",
            [
                Series(r.name + f" ({'x'.join(map(str, r.shape))})", list(range(1, len(sv) + 1)), sv)
                for r, sv in (
                    (r, singular_values(dict(model.named_modules())[r.name].weight).tolist()) for r in table
                )
            ],
            xlabel="index i",
            ylabel="singular value s_i",
            logy=True,
        ),
        Plot(
            "accuracy",
            "Test accuracy after SVD truncation (no fine-tuning)",
            "line",
            [Series(a, fractions, acc_by[a], style="o-") for a in ("uniform", "energy")],
            xlabel="fraction of parameters kept",
            ylabel="test accuracy",
            logx=True,
            hlines={f"dense {dense_acc:.3f}": dense_acc},
        ),
    ]
    return Result(
        name=name,
        config={
            "dataset": "digits" if x_train.shape[1] == 64 else "fashion-mnist",
            "hidden": list(hidden),
            "epochs": epochs,
            "lr": lr,
            "finetune_epochs": finetune_epochs,
            "finetune_lr": lr / 10,
            "n_train": len(x_train),
            "n_test": len(x_test),
        },
        seeds=[seed],
        metrics={
            "dense_test_accuracy": dense_acc,
            "dense_parameters": dense_params,
            **{f"accuracy_{a}_{p:g}": acc_by[a][i] for a in acc_by for i, p in enumerate(fractions)},
        },
        tables=[
            Table("Spectra of the trained dense weights", table.columns, table.rows()),
            Table(
                "Truncation to a parameter budget",
                [
                    "kept fraction",
                    "allocation",
                    "ranks per layer",
                    "params after",
                    "actual fraction",
                    "accuracy (truncated)",
                    "accuracy (+fine-tune)",
                ],
                rows,
            ),
        ],
        plots=plots,
        notes=(
            f"A dense MLP {list(hidden)} reaches {dense_acc:.3f} test accuracy. Each targeted layer is "
            "replaced by its best rank-k approximation (truncated SVD, Eckart-Young); the classifier head "
            "stays dense. 'actual fraction' counts the stored U, S, V and bias against the dense hidden layers."
        ),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )


def demo_truncation(progress: bool | None = None) -> Result:
    """Digits: train an MLP, show its spectra, truncate to 50% and 25% of the parameters."""
    return truncation_study(
        "demo-truncation",
        load_digits(),
        hidden=(256, 256),
        epochs=30,
        fractions=[0.5, 0.25],
        seed=0,
        progress=progress,
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    if quick:
        return truncation_study(
            "truncation-sweep",
            load_digits(seed=seed),
            hidden=(256, 256),
            epochs=15,
            fractions=[0.5, 0.25, 0.1],
            seed=seed,
            progress=progress,
        )
    data = load_fashion_mnist(n_train=20000, seed=seed)
    return truncation_study(
        "truncation-sweep",
        data,
        hidden=(512, 256),
        epochs=8,
        fractions=[0.5, 0.25, 0.1, 0.05, 0.02],
        seed=seed,
        progress=progress,
    )
