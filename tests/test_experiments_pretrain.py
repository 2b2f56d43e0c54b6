"""lowrank-pretrain: learning rates searched on a held-out validation split, curves at every evaluation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from torchlowrank.experiments import lowrank_pretrain as P


@pytest.fixture(scope="module")
def searched():
    """A tiny MLP run whose learning rates are searched (not fixed) on the validation split."""
    cfg = dataclasses.replace(
        P.Config.make(quick=True, seed=0),
        archs={"mlp": {"hidden": (32, 16), "epochs": 1, "batch": 128, "galore_gap": 10}},
        n_train=768,
        n_val=256,
        eval_every=2,
        methods=("dense Adam", "factorized Adam", "LowRankAdam"),
        lr_ladder=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
        lr_start=(1e-4, 1e-3),
        seeds={"mlp": [0, 1]},
        fixed_lr={},
    )
    return cfg, P.pretrain_study(cfg, progress=False)


def _rows(table):
    return [dict(zip(table.columns, row)) for row in table.rows]


def test_validation_images_are_held_out_of_the_training_images():
    cfg = P.Config.make(quick=True, seed=0)
    d = P.load_data(cfg)
    assert len(d.y_val) == cfg.n_val and len(d.y_train) == cfg.n_train
    train_rows = {tuple(x.flatten()[::7].tolist()) for x in d.x_train}
    assert not any(tuple(x.flatten()[::7].tolist()) in train_rows for x in d.x_val)


def test_learning_rate_is_the_best_validation_accuracy_of_a_ladder_search(searched):
    cfg, result = searched
    tuning, runs = result.history["tuning"], result.history["runs"]
    for row in _rows(result.tables[0]):
        key = (row["model"], row["method"], row["fraction"])
        arm_runs = [r for r in runs if (r["arch"], r["method"], r["fraction"]) == key]
        assert [r["seed"] for r in arm_runs] == [0, 1] and {r["lr"] for r in arm_runs} == {row["lr"]}
        assert all(r["test_accuracy"] is not None for r in arm_runs)
        if row["fraction"] == "adaptive":  # reuses fixed-rank LowRankAdam's rate at its start budget
            source = next(
                r for r in _rows(result.tables[0]) if (r["method"], r["fraction"]) == ("LowRankAdam", 0.1)
            )
            assert row["lr"] == source["lr"]
            continue
        tried = [r for r in tuning if (r["arch"], r["method"], r["fraction"]) == key]
        lrs = sorted(r["lr"] for r in tried)
        i = cfg.lr_ladder.index(lrs[0])
        assert lrs == list(cfg.lr_ladder[i : i + len(lrs)]) and set(cfg.lr_start) <= set(lrs)
        assert row["lr"] == max(tried, key=lambda r: r["val_accuracy"])["lr"]
        assert all(r["test_accuracy"] is None for r in tried if r["lr"] != row["lr"])  # only the chosen run
        assert row["lr at grid edge"] == (row["lr"] in (lrs[0], lrs[-1]))
        assert not row["lr at grid edge"] or row["lr"] in (cfg.lr_ladder[0], cfg.lr_ladder[-1])
        budget = "" if row["fraction"] == 1.0 else f"_{row['fraction']:g}"
        edge_key = f"lr_at_edge_{row['model']}_{row['method'].replace(' ', '_')}{budget}"
        assert result.metrics[edge_key] == float(row["lr at grid edge"])


def test_curves_are_recorded_at_every_evaluation_step(searched):
    cfg, result = searched
    steps = cfg.n_train // 128  # one epoch of full batches
    expected = [0] + [s for s in range(1, steps + 1) if s % cfg.eval_every == 0 or s == steps]
    for r in result.history["runs"] + result.history["tuning"]:
        c = r["curve"]
        assert c["step"] == expected
        assert len(c["train_loss"]) == len(c["val_loss"]) == len(c["val_acc"]) == len(expected)
        assert math.isnan(c["train_loss"][0]) and all(math.isfinite(x) for x in c["train_loss"][1:])
        assert c["val_acc"][-1] == r["val_accuracy"]
    val_table = next(t for t in result.tables if t.title.startswith("mlp: validation accuracy"))
    assert val_table.columns[2:] == [f"step {s}" for s in expected[1:]]
    names = {p.name for p in result.plots}
    assert {"mlp_val_acc_p10", "mlp_train_loss_p10"} <= names


def test_dense_training_lowers_the_training_loss(searched):
    _, result = searched
    dense = [r for r in result.history["runs"] if r["method"] == "dense Adam"]
    assert all(r["curve"]["train_loss"][-1] < r["curve"]["train_loss"][1] for r in dense)
    assert torch.tensor([r["val_accuracy"] for r in dense]).min() > 0.3  # 10 classes: chance is 0.1


def test_training_uses_full_batches_and_decays_the_rate_to_min_lr_ratio():
    cfg = dataclasses.replace(P.Config.make(quick=True, seed=0), eval_every=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    bar = P.progress_bar(total=4, enabled=False)
    curve = P.train(model, opt, x, y, x[:8], y[:8], epochs=2, batch=16, seed=0, cfg=cfg, bar=bar)
    assert curve["step"] == [0, 2, 4]  # 40 // 16 = 2 full batches per epoch; the 8 left over are dropped
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * cfg.min_lr_ratio)


def test_registered_run_has_no_variants_and_the_same_arms():
    """The ``variants`` extension point (for ablations) leaves the registered full run's arms as they were."""
    cfg = P.Config.make(quick=False, seed=0)
    assert cfg.variants == {}
    assert cfg.methods == ("dense Adam", "factorized Adam", "LowRankAdam")
    assert P.arms(cfg) == [
        ("dense Adam", 1.0),
        ("factorized Adam", 0.05),
        ("LowRankAdam", 0.05),
        ("factorized Adam", 0.2),
        ("LowRankAdam", 0.2),
        ("LowRankAdam tau=0.1", "adaptive"),
    ]


def test_a_variant_builds_its_base_arm_with_its_optimizer_and_kwargs():
    from torchlowrank.experiments.per_tensor_adam import PerTensorAdamW
    from torchlowrank.optim import LowRankAdam

    cfg = dataclasses.replace(
        P.Config.make(quick=False, seed=0),
        methods=("factorized Adam", "LowRankAdam", "per-tensor", "elementwise"),
        taus=[],
        variants={
            "per-tensor": ("factorized Adam", PerTensorAdamW, {}),
            "elementwise": ("LowRankAdam", None, {"second_moment": "elementwise", "basis_lr_ratio": 10.0}),
        },
    )
    base = P.build("lenet5", (), 0)
    _, adam = P.make_run("factorized Adam", 0.2, base, "lenet5", 1e-3, cfg)
    model, per_tensor = P.make_run("per-tensor", 0.2, base, "lenet5", 1e-3, cfg)
    assert type(adam) is torch.optim.Adam and type(per_tensor) is PerTensorAdamW
    assert sorted(p.shape for g in per_tensor.param_groups for p in g["params"]) == sorted(
        p.shape for p in model.parameters()
    )
    _, lra = P.make_run("elementwise", 0.2, base, "lenet5", 1e-2, cfg)
    assert isinstance(lra, LowRankAdam)
    assert lra.defaults["second_moment"] == "elementwise" and lra.defaults["basis_lr_ratio"] == 10.0
    lra.remove_hooks()
