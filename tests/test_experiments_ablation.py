"""Quick run of the geometric-ablation experiment (LowRankAdam vs factorized Adam, one factor at a time)."""

from __future__ import annotations

import math
import re

import pytest

from torchlowrank.experiments import geometric_ablation as ga
from torchlowrank.experiments.registry import get_experiment
from torchlowrank.report import load_result, write_report


@pytest.fixture(scope="module")
def quick():
    return get_experiment("geometric-ablation").run(quick=True, progress=False)


def test_every_arm_is_reported_by_name(quick):
    assert [s.key for s in ga.QUICK.settings] == ["digits"]
    for arm in ga.QUICK.arms:
        p = f"digits.{arm.key}"
        for field in (
            "lr",
            "val_accuracy",
            "test_accuracy_mean",
            "test_accuracy_std",
            "train_loss_mean",
            "train_loss_std",
            "first_loss",
        ):
            assert math.isfinite(quick.metrics[f"{p}.{field}"]), (p, field)
        assert 0.0 <= quick.metrics[f"{p}.test_accuracy_mean"] <= 1.0
        if arm.kind == "dense":
            assert f"{p}.off_core_ratio" not in quick.metrics
        else:  # a rank-r step has a part in the current subspaces and (augmenting) a part that moves them
            assert 0.0 < quick.metrics[f"{p}.off_core_ratio"] < math.inf, p
    # the baselines and every factor the issue names are present
    factors = {a.factor for a in ga.QUICK.arms}
    assert {
        "reference",
        "baseline",
        "second moment",
        "basis step",
        "S init",
        "weight decay",
        "augment_every",
        "warm-up",
    } <= factors
    kinds = {a.key: a.kind for a in ga.QUICK.arms}
    assert kinds["factorized_adam"] == "factorized" and kinds["dense_adam"] == "dense"
    moments = {a.second_moment for a in ga.QUICK.arms if a.kind == "lowrank"}
    assert moments == {"unit", "elementwise", "elementwise_mean", "elementwise_reset"}


def test_learning_rate_is_the_validation_choice_from_the_grid(quick):
    cfg = ga.QUICK
    allowed = set(cfg.lr_grid) | set(cfg.lr_below) | set(cfg.lr_above)
    grid = quick.tables[1]
    col = {c: i for i, c in enumerate(grid.columns)}
    for arm in cfg.arms:
        lr = quick.metrics[f"digits.{arm.key}.lr"]
        assert lr in allowed
        rows = [r for r in grid.rows if r[col["arm"]] == arm.key]
        tried = {r[col["lr"]] for r in rows}
        assert set(cfg.lr_grid) <= tried  # the whole grid was run for every arm
        assert tried - set(cfg.lr_grid) <= allowed
        if tried != set(cfg.lr_grid):  # an extension only when the grid's best lay at its edge
            best_in_grid = max(
                (r for r in rows if r[col["lr"]] in cfg.lr_grid),
                key=lambda r: (r[col["val acc"]], -r[col["val loss"]]),
            )
            assert best_in_grid[col["lr"]] in (cfg.lr_grid[0], cfg.lr_grid[-1])
            side = cfg.lr_below if best_in_grid[col["lr"]] == cfg.lr_grid[0] else cfg.lr_above
            assert tried - set(cfg.lr_grid) == set(
                side[: len(tried) - len(cfg.lr_grid)]
            )  # in order, one side
        best = max(rows, key=lambda r: (r[col["val acc"]], -r[col["val loss"]]))
        assert best[col["lr"]] == lr  # chosen on the validation split, by the stated rule
        assert quick.metrics[f"digits.{arm.key}.val_accuracy"] == best[col["val acc"]]


def test_every_arm_learned(quick):
    for arm in ga.QUICK.arms:
        p = f"digits.{arm.key}"
        # full-training-set loss after training below the first steps' minibatch loss (~ log 10)
        assert quick.metrics[f"{p}.train_loss_mean"] < quick.metrics[f"{p}.first_loss"] - 0.1, p
        assert quick.metrics[f"{p}.test_accuracy_mean"] > 0.2, p  # chance is 0.1


def test_same_initial_weights_across_arms():
    import torch

    setting = ga.QUICK.settings[0]
    arms = {a.key: a for a in ga.QUICK.arms}
    low = ga.build(setting, arms["lowrank_default"], 64, seed=3)
    fac = ga.build(setting, arms["factorized_adam"], 64, seed=3)
    other = ga.build(setting, arms["lowrank_elementwise"], 64, seed=3)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.allclose(low(x), fac(x), atol=1e-5)
        assert torch.equal(low(x), other(x))
        frob = ga.build(setting, arms["lowrank_init_frobenius"], 64, seed=3)
        dense = ga.build(setting, arms["dense_adam"], 64, seed=3)
        assert torch.allclose(frob[0].weight.norm(), dense[0].weight.norm(), rtol=1e-5)


def test_report_has_no_unformatted_placeholders(quick, tmp_path):
    paths = write_report(quick, tmp_path)
    md = paths["md"].read_text()
    assert re.search(r"\{[A-Za-z_][A-Za-z0-9_.]*(![rsa])?(:[^}]*)?\}", md) is None
    assert "geometric-ablation --quick" in md
    back = load_result(paths["json"])
    assert back.metrics == pytest.approx(quick.metrics)
    assert any(k.startswith("png:") for k in paths)
