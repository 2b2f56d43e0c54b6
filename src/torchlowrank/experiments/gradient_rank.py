"""``gradient-rank``: how low-rank are gradients and updates W - W0 during training? (DESIGN §4.7)

An MLP (784-256-256-10) and the small ViT (dim 64, depth 4) train on a Fashion-MNIST subset with
AdamW; a :class:`~torchlowrank.diagnostics.SpectrumTracker` records, every few steps, the stable and
numerical ranks of each layer's minibatch gradient and of its update W - W0. Reference scales: the
full rank min(m, n), and the batch size B: the gradient of a linear layer is a sum of one rank-one
term per input row, so rank(grad) <= B for the MLP, and <= B * tokens (= 64 * 17) for the ViT.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..data import load_digits, load_fashion_mnist
from ..diagnostics import SpectrumTracker, rank_curves, rank_heatmap
from ..models import MLP, SmallViT
from ..reproducibility import environment_info, one_thread, seed_everything
from ..results import Result, Table
from .training import accuracy, fit_classifier

DESCRIPTION = "Stable rank of gradients and of W - W0 while training an MLP and a small ViT on Fashion-MNIST"


# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    quick: bool = False
    seed: int = 0
    n_train: int = 10000
    n_test: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    epochs: dict = field(default_factory=lambda: {"mlp": 3, "vit": 2})
    every: dict = field(default_factory=lambda: {"mlp": 10, "vit": 10})  # steps between tracker records

    @classmethod
    def make(cls, quick: bool, seed: int) -> Config:
        if quick:
            return cls(
                quick=True, seed=seed, n_train=2000, epochs={"mlp": 1, "vit": 1}, every={"mlp": 5, "vit": 5}
            )
        return cls(seed=seed)


TOKENS = {"mlp": 1, "vit": 17}  # rows per example a linear layer sees (ViT: 16 patches + class token)
VIT_PLOTTED = [
    "blocks.0.attn.q",
    "blocks.0.attn.v",
    "blocks.0.mlp.0",
    "blocks.3.attn.q",
    "blocks.3.attn.v",
    "blocks.3.mlp.0",
    "patch_embed",
    "head",
]


# ----------------------------------------------------------------------------------------- train


def _median(xs: list) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def tracked_training(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    every: int,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool | None = None,
    desc: str = "train",
) -> tuple[SpectrumTracker, dict[str, list[float]]]:
    """Train with AdamW while a SpectrumTracker (attached to the optimizer) records every ``every`` steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    tracker = SpectrumTracker(model, every=every, top_k=8).attach(opt)
    hist = fit_classifier(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=opt,
        seed=seed,
        progress=progress,
        desc=desc,
    )
    tracker.detach()
    return tracker, hist


# -------------------------------------------------------------------------------------- evaluate


@dataclass
class LayerRanks:
    """One layer of one model: one row of the table."""

    model: str
    layer: str
    shape: str
    full_rank: int
    grad_bound: int  # min(full rank, batch size x rows per example)
    grad_stable_median: float
    grad_numerical_median: float
    grad_numerical_max: int
    update_stable_end: float
    update_numerical_end: int
    weight_stable_init: float
    weight_stable_end: float


def layer_ranks(tag: str, tracker: SpectrumTracker, batch_size: int, tokens: int) -> list[LayerRanks]:
    out = []
    for name, _ in tracker.layers:
        g, u, w = tracker.rows("grad", name), tracker.rows("update", name), tracker.rows("weight", name)
        if not g:
            continue
        m, n, full = g[0]["rows"], g[0]["cols"], g[0]["full_rank"]
        out.append(
            LayerRanks(
                tag,
                name,
                f"{m}x{n}",
                full,
                min(full, batch_size * tokens),
                _median([r["stable_rank"] for r in g]),
                _median([r["numerical_rank"] for r in g]),
                max(r["numerical_rank"] for r in g),
                u[-1]["stable_rank"],
                u[-1]["numerical_rank"],
                w[0]["stable_rank"],
                w[-1]["stable_rank"],
            )
        )
    return out


def model_metrics(tag: str, tracker: SpectrumTracker, layers: list[LayerRanks], acc: float) -> dict:
    grads = tracker.rows("grad")
    return {
        f"{tag}_test_accuracy": acc,
        f"{tag}_steps": tracker.steps,
        f"{tag}_median_grad_stable_rank": _median([r["stable_rank"] for r in grads]),
        f"{tag}_median_grad_stable_rank_over_full_rank": _median(
            [r["stable_rank"] / r["full_rank"] for r in grads]
        ),
        f"{tag}_final_update_stable_rank_median": _median([r.update_stable_end for r in layers]),
    }


def model_history(tag: str, tracker: SpectrumTracker, hist: dict) -> dict:
    history = {f"{tag}_loss": hist["loss"]}
    for q in ("grad", "update"):
        for name, _ in tracker.layers:
            steps, vals = tracker.series(name, q, "stable_rank")
            if vals:
                history[f"{tag}:{q}_stable_rank:{name}"] = [round(v, 4) for v in vals]
                history[f"{tag}:{q}_steps"] = steps
    return history


def exact_batch_gradient_rank(model, data, batch_size: int) -> int:
    """Exact rank of one minibatch gradient of the MLP's first layer (at most the batch size)."""
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(data.x_train[:batch_size]), data.y_train[:batch_size]).backward()
    rank = int(torch.linalg.matrix_rank(model.features[0].weight.grad))
    model.zero_grad()
    return rank


# ----------------------------------------------------------------------------------------- write


def model_plots(tag: str, tracker: SpectrumTracker, batch_size: int) -> list:
    plots = []
    hl = {f"batch size B = {batch_size}": batch_size} if tag == "mlp" else {}
    layers = None if tag == "mlp" else VIT_PLOTTED
    for q in ("grad", "update"):
        p = rank_curves(
            tracker.history, q, "stable_rank", layers=layers, hlines=hl if q == "grad" else {}, logy=True
        )
        what = "(minibatch gradient)" if q == "grad" else "W - W0"
        p.name, p.title = f"{tag}_{p.name}", f"{tag.upper()}: stable rank of the {q} {what}"
        plots.append(p)
    p = rank_heatmap(tracker.history, "grad", "numerical_rank", relative=True)
    p.name, p.title = (
        f"{tag}_{p.name}",
        f"{tag.upper()}: numerical rank (99% energy) of the gradient / full rank",
    )
    plots.append(p)
    return plots


COLUMNS = [
    "model",
    "layer",
    "shape",
    "min(m,n)",
    "grad bound",
    "grad stable rank (median)",
    "grad numerical rank (median)",
    "grad numerical rank (max)",
    "update stable rank (end)",
    "update numerical rank (end)",
    "weight stable rank (init)",
    "weight stable rank (end)",
]


def setting_notes(cfg: Config) -> str:
    """The setting, as run; the reading of the numbers is in docs/."""
    return (
        f"AdamW (lr 1e-3), batch size B = {cfg.batch_size}, Fashion-MNIST subset of {cfg.n_train} training images; "
        "the tracker records every few steps (attached to the optimizer, so gradients are those of the step just "
        "taken). 'grad bound' = min(min(m, n), B x rows per example): a linear layer's minibatch gradient is a sum "
        "of B x tokens rank-one terms (tokens = 17 for the ViT). "
        f"Caveats: a {cfg.n_train}-image subset and {cfg.epochs['mlp']}/{cfg.epochs['vit']} epochs (MLP/ViT); the "
        "stable rank is a smooth, conservative measure (it is <= the rank); only AdamW was measured (other "
        "optimizers may give different update ranks)."
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    cfg = Config.make(quick, seed)
    with one_thread():  # small models: one thread is faster and steadier on a loaded 2-core machine
        t0 = time.perf_counter()
        seed_everything(seed)
        data = load_fashion_mnist(n_train=cfg.n_train, n_test=cfg.n_test, seed=seed)
        B = cfg.batch_size
        layers, plots, metrics, history = [], [], {}, {}
        for tag in ("mlp", "vit"):
            torch.manual_seed(seed)
            model = MLP(784, (256, 256), 10) if tag == "mlp" else SmallViT()
            tracker, hist = tracked_training(
                model,
                data.x_train,
                data.y_train,
                epochs=cfg.epochs[tag],
                batch_size=B,
                every=cfg.every[tag],
                seed=seed,
                progress=progress,
                desc=tag,
            )
            acc = accuracy(model, data.x_test, data.y_test)
            rows = layer_ranks(tag, tracker, B, TOKENS[tag])
            layers += rows
            metrics.update(model_metrics(tag, tracker, rows, acc))
            history.update(model_history(tag, tracker, hist))
            plots += model_plots(tag, tracker, B)
            if tag == "mlp":
                metrics["mlp_exact_rank_of_one_batch_gradient_features.0"] = exact_batch_gradient_rank(
                    model, data, B
                )
                metrics["mlp_features.0_full_rank"] = 256
        return Result(
            name="gradient-rank",
            config={
                "dataset": "fashion-mnist",
                "n_train": cfg.n_train,
                "n_test": cfg.n_test,
                "batch_size": B,
                "optimizer": "AdamW",
                "lr": cfg.lr,
                "mlp": "784-256-256-10",
                "vit": "SmallViT(dim=64, depth=4, heads=4, patch 7)",
                "epochs": dict(cfg.epochs),
                "every": dict(cfg.every),
            },
            seeds=[seed],
            metrics=metrics,
            history=history,
            tables=[
                Table(
                    "Per layer: gradient and update ranks against min(m, n) and the batch size",
                    COLUMNS,
                    [list(dataclasses.astuple(r)) for r in layers],
                )
            ],
            plots=plots,
            notes=setting_notes(cfg),
            wall_time_s=time.perf_counter() - t0,
            environment=environment_info(),
        )


# ------------------------------------------------------------------------------------ demo section


def demo_columns(last: int) -> list[str]:
    """The demo table's columns; ``last`` is the step of the final record."""
    return [
        "layer",
        "shape",
        "full rank",
        "weight stable rank (0)",
        f"weight stable rank ({last})",
        "update stable rank",
        "update numerical rank",
        "grad stable rank (median)",
        "angle to step-0 top-8 subspace (rad)",
    ]


def _demo_rows(tracker: SpectrumTracker) -> list[list]:
    rows = []
    for name, _ in tracker.layers:
        w, u, g = tracker.rows("weight", name), tracker.rows("update", name), tracker.rows("grad", name)
        rows.append(
            [
                name,
                f"{w[0]['rows']}x{w[0]['cols']}",
                w[0]["full_rank"],
                w[0]["stable_rank"],
                w[-1]["stable_rank"],
                u[-1]["stable_rank"],
                u[-1]["numerical_rank"],
                _median([r["stable_rank"] for r in g]),
                w[-1]["angle_left"],
            ]
        )
    return rows


def demo_tracker(progress: bool | None = None) -> Result:
    """Digits: train an MLP with a SpectrumTracker attached; ranks of weights, updates and gradients over training."""
    from ..diagnostics import angle_plot, singular_value_plot

    with one_thread():
        t0 = time.perf_counter()
        seed_everything(0)
        data = load_digits()
        x_train, x_test = data.flat()
        model = MLP(64, (128, 128), 10)
        tracker, hist = tracked_training(
            model,
            x_train,
            data.y_train,
            epochs=20,
            batch_size=32,
            every=15,
            seed=0,
            progress=progress,
            desc="tracker demo",
        )
        acc = accuracy(model, x_test, data.y_test)
    last = tracker.steps
    plots = [
        rank_heatmap(tracker.history, "weight", "stable_rank"),
        rank_curves(tracker.history, "update", "stable_rank"),
        rank_curves(tracker.history, "grad", "stable_rank", hlines={"batch size 32": 32}, logy=True),
        singular_value_plot(tracker.history, "features.0", "update"),
        angle_plot(tracker.history, "weight"),
    ]
    config = {"dataset": "digits", "model": "MLP 64-128-128-10", "optimizer": "AdamW lr 1e-3"}
    return Result(
        name="demo-tracker",
        config=config | {"batch_size": 32, "epochs": 20, "every": 15},
        seeds=[0],
        metrics={"test_accuracy": acc, "steps": last, "records": len(tracker.history)},
        history={"loss": hist["loss"]},
        tables=[
            Table(
                f"Ranks over training (step 0 -> {last})",
                demo_columns(last),
                _demo_rows(tracker),
            )
        ],
        plots=plots,
        notes=(
            "`tlr.SpectrumTracker(model, every=15).attach(optimizer)` records the spectra of every layer's "
            "weight, update W - W0 and gradient while an MLP trains on digits."
        ),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )
