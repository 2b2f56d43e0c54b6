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


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def q3r_truncation_study(
    *,
    n_train: int,
    n_test: int,
    epochs: int,
    seeds: list[int],
    fractions: list[float],
    vit: dict,
    rank: int,
    lr: float = 1e-3,
    lam_q3r: float = 0.1,
    lam_nuclear: float = 0.03,
    finetune_n: int = 2000,
    progress: bool | None = None,
    command: str = "",
) -> Result:
    t0 = time.perf_counter()
    commit = git_commit()  # read at the start: the tree may move on during a long run
    per_seed = {m: [] for m in METHODS}
    curves = {m: {"acc": [], "ft": [], "actual": None} for m in ("dense", "q3r", "nuclear")}
    with one_thread():
        for seed in seeds:
            data = load_fashion_mnist(n_train=n_train, n_test=n_test, seed=seed)
            for method in METHODS:
                model, info = train_method(
                    method,
                    lambda: SmallViT(**vit),
                    data,
                    targets=VIT_TARGETS,
                    rank=rank,
                    epochs=epochs,
                    lr=lr,
                    lam_q3r=lam_q3r,
                    lam_nuclear=lam_nuclear,
                    seed=seed,
                    progress=progress,
                )
                per_seed[method].append(info)
                if method in curves:
                    acc, ft, actual = truncation_curve(
                        model,
                        data,
                        targets=VIT_TARGETS,
                        fractions=fractions,
                        finetune_n=finetune_n,
                        lr=lr,
                        seed=seed,
                        progress=progress,
                    )
                    curves[method]["acc"].append(acc)
                    curves[method]["ft"].append(ft)
                    curves[method]["actual"] = actual
    probe = SmallViT(**vit)
    targeted = sum(
        m.weight.numel()
        for n, m in probe.named_modules()
        if isinstance(m, nn.Linear) and _matches(n, VIT_TARGETS)
    )
    fact_fraction = (
        sum(
            rank * (m.weight.shape[0] + m.weight.shape[1])
            for n, m in probe.named_modules()
            if isinstance(m, nn.Linear) and _matches(n, VIT_TARGETS)
        )
        / targeted
    )

    train_rows = []
    for method in METHODS:
        acc_m, acc_s = _mean_std([i["accuracy"] for i in per_seed[method]])
        tail = [i["tail_energy"] for i in per_seed[method] if "tail_energy" in i]
        train_rows.append(
            [
                method,
                f"{acc_m:.4f} ± {acc_s:.4f}",
                f"{statistics.fmean(tail):.4f}" if tail else "-",
                round(statistics.fmean(i["train_s"] for i in per_seed[method]), 1),
                per_seed[method][0]["parameters"],
            ]
        )
    rows, metrics = [], {}
    dense_full = statistics.fmean(i["accuracy"] for i in per_seed["dense"])
    for method in curves:
        metrics[f"{method}_test_accuracy"] = statistics.fmean(i["accuracy"] for i in per_seed[method])
        for j, p in enumerate(fractions):
            a_m, a_s = _mean_std([c[j] for c in curves[method]["acc"]])
            f_m, f_s = _mean_std([c[j] for c in curves[method]["ft"]])
            rows.append(
                [
                    method,
                    p,
                    round(curves[method]["actual"][j], 4),
                    f"{a_m:.4f} ± {a_s:.4f}",
                    f"{f_m:.4f} ± {f_s:.4f}",
                ]
            )
            metrics[f"{method}_truncated_{p:g}"] = a_m
            metrics[f"{method}_finetuned_{p:g}"] = f_m
    fact_acc = statistics.fmean(i["accuracy"] for i in per_seed["factorized"])
    metrics["factorized_test_accuracy"] = fact_acc
    metrics["factorized_param_fraction"] = fact_fraction
    rows.append(
        [
            f"factorized (trained at rank {rank})",
            "-",
            round(fact_fraction, 4),
            f"{fact_acc:.4f} ± {_mean_std([i['accuracy'] for i in per_seed['factorized']])[1]:.4f}",
            "-",
        ]
    )

    def series(key: str, style: str, suffix: str) -> list[Series]:
        out = []
        for method in curves:
            ys = [statistics.fmean(c[j] for c in curves[method][key]) for j in range(len(fractions))]
            err = [(_mean_std([c[j] for c in curves[method][key]])[1]) for j in range(len(fractions))]
            out.append(
                Series(
                    f"{method}{suffix}", list(fractions), ys, err=err if len(seeds) > 1 else None, style=style
                )
            )
        return out

    plots = [
        Plot(
            "accuracy",
            "SmallViT on Fashion-MNIST: test accuracy after SVD truncation",
            "line",
            series("acc", "o-", " (truncated)")
            + series("ft", "s--", " (+1 short epoch)")
            + [Series(f"factorized rank {rank}", [fact_fraction], [fact_acc], style="k*")],
            xlabel="fraction of the regularized layers' parameters kept",
            ylabel="test accuracy",
            hlines={f"dense untruncated {dense_full:.3f}": dense_full},
        )
    ]

    # the published claim at 40% of the parameters
    p40 = min(range(len(fractions)), key=lambda j: abs(fractions[j] - 0.4))
    drop = {m: metrics[f"{m}_test_accuracy"] - metrics[f"{m}_truncated_{fractions[p40]:g}"] for m in curves}
    for m in curves:
        metrics[f"{m}_drop_at_{fractions[p40]:g}"] = drop[m]
    claim = drop["q3r"] <= 0.02 and drop["dense"] >= 3 * max(drop["q3r"], 0.01)
    metrics["claim_reproduced"] = bool(claim)
    notes = (
        f"Kept {fractions[p40]:g} of the regularized parameters without fine-tuning: Q3R loses "
        f"{100 * drop['q3r']:.1f} points, dense AdamW {100 * drop['dense']:.1f}, nuclear norm "
        f"{100 * drop['nuclear']:.1f} (means over seeds {seeds}). Published claim (Q3R keeps its accuracy at "
        f"40% of the parameters while the dense model collapses): "
        f"{'reproduced' if claim else 'NOT reproduced'} at this scale (criterion: Q3R drop <= 2 points and "
        f"the dense drop >= 3x larger). 'tail energy' = mean over the regularized layers of "
        f"sum_(i>{rank}) s_i^2 / sum s_i^2. Budget: {n_train} training / {n_test} test images, {epochs} "
        f"epochs, fine-tuning = 1 epoch over {finetune_n} training images at lr/10. Command: {command}"
    )
    return Result(
        name="q3r-truncation",
        config={
            "dataset": "fashion-mnist",
            "n_train": n_train,
            "n_test": n_test,
            "epochs": epochs,
            "batch_size": 64,
            "optimizer": "AdamW",
            "lr": lr,
            "vit": vit,
            "targets": VIT_TARGETS,
            "target_rank": rank,
            "q3r": {"lam": lam_q3r, "period": 5, "mode": "coupled"},
            "nuclear": {"lam": lam_nuclear, "mode": "sub-gradient"},
            "fractions": fractions,
            "finetune": {"epochs": 1, "n_images": finetune_n, "lr": lr / 10},
            "command": command,
            "git_commit": commit,
        },
        seeds=seeds,
        metrics=metrics,
        tables=[
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
        ],
        plots=plots,
        notes=notes,
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    fractions = [round(0.1 * i, 1) for i in range(1, 11)]
    if quick:
        return q3r_truncation_study(
            n_train=600,
            n_test=300,
            epochs=1,
            seeds=[seed],
            fractions=[0.2, 0.4, 1.0],
            vit=dict(dim=32, depth=2, heads=4, patch_size=7),
            rank=4,
            finetune_n=200,
            progress=progress,
            command="torchlowrank reproduce q3r-truncation --quick",
        )
    return q3r_truncation_study(
        n_train=4000,
        n_test=2000,
        epochs=5,
        seeds=[seed, seed + 1, seed + 2],
        fractions=fractions,
        vit=dict(dim=64, depth=4, heads=4, patch_size=7),
        rank=8,
        finetune_n=1000,
        progress=progress,
        command="torchlowrank reproduce q3r-truncation --out docs/results/q3r-truncation",
    )


# -- demo section ----------------------------------------------------------------------------------------------
def demo_q3r(progress: bool | None = None) -> Result:
    """Digits MLP trained with and without Q3R (rank 8): spectra, then truncation to 10%..50%."""
    t0 = time.perf_counter()
    data = load_digits()
    x_train, x_test = data.flat()
    rank, targets, fractions = 8, r"features\..*", [0.05, 0.1, 0.2, 0.3, 0.5]
    models, rows, spectra, curves, full_acc = {}, [], [], {}, {}
    with one_thread():
        for label, lam in (("dense", 0.0), ("q3r", 0.1)):
            seed_everything(0)
            model = MLP(64, (128, 128), 10)
            reg = Q3R(model, rank, lam, targets=targets) if lam else None
            fit_classifier(
                model,
                x_train,
                data.y_train,
                epochs=15,
                lr=1e-3,
                progress=progress,
                desc=label,
                after_backward=(lambda step, reg=reg: reg.step()) if reg else None,
            )
            models[label] = model
            s = torch.linalg.svdvals(model.features[2].weight.detach()).tolist()
            spectra.append(Series(f"{label} (features.2)", list(range(1, len(s) + 1)), s))
            accs = []
            for p in fractions:
                m = copy.deepcopy(model)
                truncate(m, p, targets=targets)
                accs.append(accuracy(m, x_test, data.y_test))
            curves[label] = accs
            full_acc[label] = accuracy(model, x_test, data.y_test)
            rows.append([label, full_acc[label], round(tail_energy(model, targets, rank), 4)] + accs)
    return Result(
        name="demo-q3r",
        config={
            "dataset": "digits",
            "hidden": [128, 128],
            "epochs": 15,
            "lr": 1e-3,
            "target_rank": rank,
            "lam": 0.1,
            "fractions": fractions,
        },
        seeds=[0],
        metrics={
            **{f"{label}_accuracy": a for label, a in full_acc.items()},
            **{
                f"{label}_truncated_{p:g}": curves[label][j]
                for label in curves
                for j, p in enumerate(fractions)
            },
        },
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
        notes="Q3R (lam 0.1, period 5, coupled with AdamW) pushes each hidden layer toward rank 8; its spectrum "
        "drops after index 8, so truncation to a small budget keeps the accuracy.",
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )
