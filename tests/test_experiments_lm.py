"""Quick run of the lowrank-lm reproduction (byte-level Llama at a parameter budget)."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from torchlowrank.data.datasets import load_rotten_tomatoes_bytes
from torchlowrank.experiments import lowrank_lm
from torchlowrank.experiments.registry import get_experiment, list_experiments
from torchlowrank.report import load_result, write_report

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lm():
    return get_experiment("lowrank-lm").run(quick=True)


def test_registered():
    assert "lowrank-lm" in {e.name for e in list_experiments()}


def test_byte_corpus_is_split_by_snippet():
    c = load_rotten_tomatoes_bytes()
    n = len(c.train) + len(c.val) + len(c.test)
    assert n > 1_000_000 and 0.07 < len(c.val) / n < 0.13 and 0.07 < len(c.test) / n < 0.13
    text = bytes(c.val.tolist()).decode("utf-8")  # whole snippets: valid UTF-8
    first = text.split("\n")[0]
    assert len(first) > 20 and first.encode() not in bytes(c.test.tolist())


def test_budget_ranks_follow_the_parameter_fraction():
    model = lowrank_lm.build_model(lowrank_lm.QUICK, seed=0)
    ranks = lowrank_lm.budget_ranks(model, 0.25)
    assert len(ranks) == 7 * lowrank_lm.QUICK.layers  # every attention and MLP projection
    for name, r in ranks.items():
        m, n = model.get_submodule(name).weight.shape
        assert r == math.floor(0.25 * m * n / (m + n + 1))
        assert r * (m + n + 1) <= 0.25 * m * n < (r + 1) * (m + n + 1)


def test_quick_run_every_method_learns(lm):
    runs = lm.history["runs"]
    assert {r["method"] for r in runs} == set(lowrank_lm.METHODS)
    for r in runs:
        assert r["step"][-1] == lm.config["steps"], r["method"]  # no divergence
        assert r["val"][0] > 5.0  # ~ln 256 nats/byte at initialisation
        assert r["val"][-1] < r["val"][0] - 1.0, r["method"]
        assert all(b <= a + 0.05 for a, b in zip(r["val"], r["val"][1:])), (r["method"], r["val"])
        assert math.isfinite(r["test"]) and r["test"] < r["val"][0] - 1.0
        assert r["seconds"] == sorted(r["seconds"]) and r["train_s"] > 0


def test_quick_run_parameter_budgets(lm):
    m = lm.metrics
    dense = m["dense_targeted_params"]
    assert m["targeted_params_dense_AdamW"] == dense
    for p in lm.config["fractions"]:
        key = {meth: lowrank_lm.arm_key(meth, p) for meth in lowrank_lm.METHODS[1:]}
        for meth in ("factorized AdamW", "LowRankAdam"):
            assert 0.8 * p * dense <= m[f"targeted_params_{key[meth]}"] <= p * dense, meth  # the budget, used
            assert m[f"params_{key[meth]}"] < m["params_dense_AdamW"]
        adaptive = m[f"targeted_params_{key['LowRankAdam adaptive']}"]
        assert adaptive <= m[f"targeted_params_{key['LowRankAdam']}"]  # ranks may only shrink
        assert m[f"kept_{key['LowRankAdam adaptive']}"] <= p
        # GaLore trains the dense weights: its budget is optimizer state, reported as such
        assert m[f"targeted_params_{key['GaLoreAdamW']}"] == dense
        table = lm.tables[0]
        rows = [dict(zip(table.columns, r)) for r in table.rows]
        row = next(r for r in rows if (r["method"], r["fraction"]) == ("GaLoreAdamW", p))
        assert row["budget kind"].startswith("optimizer state")


def test_quick_run_records_learning_rates(lm):
    assert lm.config["lr_ladder"] and lm.config["fixed_lr"]
    for meth, p in lowrank_lm.arms(lowrank_lm.QUICK):
        key = lowrank_lm.arm_key(meth, p)
        source = lowrank_lm.QUICK.shared_lr.get(meth, meth)  # the adaptive arm reuses LowRankAdam's rate
        assert lm.config["chosen_lr"][key] == lm.metrics[f"lr_{key}"] == lowrank_lm.QUICK.fixed_lr[source]
        assert lm.metrics[f"lr_at_edge_{key}"] == 0.0  # one fixed rate is no grid


def test_quick_run_records_curves_at_every_evaluation_step(lm):
    for r in lm.history["runs"]:
        assert r["step"] == lowrank_lm.eval_steps(lowrank_lm.QUICK), r["method"]
        assert len(r["val"]) == len(r["train_loss"]) == len(r["seconds"]) == len(r["step"])
        assert math.isnan(r["train_loss"][0])  # no training before step 0
        assert all(math.isfinite(x) for x in r["train_loss"][1:])
        assert r["train_loss"][-1] < r["train_loss"][1], r["method"]


def test_next_lr_steps_outward_while_the_best_is_at_an_end():
    ladder = (1e-4, 1e-3, 1e-2, 1e-1)
    assert lowrank_lm.next_lr(ladder, {1e-3: 2.0, 1e-2: 3.0}) == 1e-4  # best lowest: one step down
    assert lowrank_lm.next_lr(ladder, {1e-3: 3.0, 1e-2: 2.0}) == 1e-1  # best highest: one step up
    assert lowrank_lm.next_lr(ladder, {1e-4: 3.0, 1e-3: 2.0, 1e-2: 2.5}) is None  # bracketed: done
    assert lowrank_lm.next_lr(ladder, {1e-2: 3.0, 1e-1: 2.0}) is None  # the ladder ends: done
    assert lowrank_lm.next_lr(ladder, {1e-3: math.inf, 1e-2: math.inf, 1e-1: 3.0}) is None  # diverged = worst


def _searched(cfg):
    return lowrank_lm.lm_study("lowrank-lm-tuning", cfg, quick=True, progress=False)


def test_learning_rate_is_searched_on_validation_and_reused_for_other_seeds():
    cfg = dataclasses.replace(
        lowrank_lm.QUICK,
        fixed_lr={},
        lr_ladder=(1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
        lr_start=(1e-4, 1e-3),
        steps=20,
        eval_every=10,
        seeds=(0, 1),
    )
    result = _searched(cfg)
    rows = [dict(zip(result.tables[0].columns, r)) for r in result.tables[0].rows]
    for method, p in lowrank_lm.arms(cfg):
        tuning = [r for r in result.history["tuning"] if (r["method"], r["fraction"]) == (method, p)]
        runs = [r for r in result.history["runs"] if (r["method"], r["fraction"]) == (method, p)]
        row = next(r for r in rows if (r["method"], r["fraction"]) == (method, p))
        chosen = runs[0]["lr"]
        assert [(r["seed"], r["lr"]) for r in runs] == [(0, chosen), (1, chosen)]
        assert all("test" in r for r in runs) and all("test" not in r for r in tuning if r["lr"] != chosen)
        if method in cfg.shared_lr:  # no search of its own: the rate of the arm it shares with
            assert not tuning
            source = next(
                r for r in result.history["runs"] if (r["method"], r["fraction"]) == ("LowRankAdam", p)
            )
            assert chosen == source["lr"]
            continue
        tried = sorted(r["lr"] for r in tuning)
        i = cfg.lr_ladder.index(tried[0])
        assert tried == list(cfg.lr_ladder[i : i + len(tried)])  # a contiguous stretch of the ladder
        assert set(cfg.lr_start) <= set(tried) and chosen == min(tuning, key=lambda r: r["final_val"])["lr"]
        assert row["lr at grid edge"] == (chosen in (tried[0], tried[-1]))
        if row["lr at grid edge"]:  # only where the ladder ended
            assert chosen in (cfg.lr_ladder[0], cfg.lr_ladder[-1])
        assert row["lrs tried (seed 0)"] == " / ".join(f"{x:g}" for x in tried)


def test_a_choice_at_the_end_of_the_ladder_is_flagged():
    cfg = dataclasses.replace(
        lowrank_lm.QUICK,
        fixed_lr={},
        lr_ladder=(1e-6, 1e-5),  # both far too small for 20 steps: the larger wins, at the ladder's end
        lr_start=(1e-6, 1e-5),
        fractions=(),
        steps=20,
        eval_every=10,
        seeds=(0,),
    )
    result = _searched(cfg)
    assert [r["lr"] for r in result.history["tuning"]] == [1e-6, 1e-5]
    assert result.config["chosen_lr"] == {"dense_AdamW": 1e-5}
    assert result.metrics["lr_at_edge_dense_AdamW"] == 1.0


def test_quick_report_writes(lm, tmp_path):
    paths = write_report(lm, tmp_path)
    md = paths["md"].read_text()
    assert "{" not in lm.notes and "}" not in lm.notes
    assert not re.search(r"\{[A-Za-z_][^{}]*\}", md)  # no unformatted f-string placeholder
    assert "torchlowrank reproduce lowrank-lm" in md
    assert sum(k.startswith("png:") for k in paths) == 2 * len(lm.config["fractions"])
    assert load_result(paths["json"]).metrics == pytest.approx(lm.metrics)


def test_a_diverged_run_is_recorded_not_raised():
    cfg = dataclasses.replace(
        lowrank_lm.QUICK, fixed_lr={m: 50.0 for m in lowrank_lm.METHODS}, steps=12, eval_every=4
    )
    result = lowrank_lm.lm_study("lowrank-lm-diverged", cfg, quick=True, progress=False)
    for r in result.history["runs"]:
        assert r["val"][-1] == math.inf and len(r["val"]) == len(r["step"]) == len(r["seconds"]), r["method"]
    lowrank = [r for r in result.history["runs"] if r["method"].startswith("LowRankAdam")]
    assert lowrank and all(r["step"][-1] < cfg.steps for r in lowrank)  # the refused-step (ValueError) path


def test_a_subset_of_methods_runs_only_those_arms():
    cfg = dataclasses.replace(
        lowrank_lm.QUICK,
        methods=("factorized AdamW", "LowRankAdam"),
        fractions=(0.25, 0.5),
        steps=20,
        eval_every=10,
    )
    assert lowrank_lm.arms(cfg) == [(m, p) for p in (0.25, 0.5) for m in ("factorized AdamW", "LowRankAdam")]
    result = lowrank_lm.lm_study("lowrank-lm-subset", cfg, quick=True, progress=False)
    assert [(r["method"], r["fraction"]) for r in result.history["runs"]] == lowrank_lm.arms(cfg)
    assert result.config["methods"] == ["factorized AdamW", "LowRankAdam"]
    assert set(result.config["chosen_lr"]) == {
        "factorized_AdamW_p25",
        "LowRankAdam_p25",
        "factorized_AdamW_p50",
        "LowRankAdam_p50",
    }
    assert lowrank_lm.arms(lowrank_lm.LMConfig()) == lowrank_lm.arms(  # the default: every method
        dataclasses.replace(lowrank_lm.LMConfig(), methods=lowrank_lm.METHODS)
    ) and len(lowrank_lm.arms(lowrank_lm.LMConfig())) == len(lowrank_lm.METHODS)


def test_an_unknown_or_orphaned_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        dataclasses.replace(lowrank_lm.QUICK, methods=("dense AdamW", "SGD"))
    with pytest.raises(ValueError, match="shared_lr"):  # the adaptive arm reuses LowRankAdam's rate
        dataclasses.replace(lowrank_lm.QUICK, methods=("LowRankAdam adaptive",))
    with pytest.raises(ValueError, match="no method"):
        dataclasses.replace(lowrank_lm.QUICK, methods=())


# ----- ablation knobs (issue 19): the other parameters' own AdamW, the optimizer's extra arguments ---------
def _arm(method, cfg, lr=1e-2, seed=0):
    base = lowrank_lm.build_model(cfg, seed)
    ranks = lowrank_lm.budget_ranks(base, 0.25)
    model, opts = lowrank_lm.make_arm(method, base, ranks, lr, cfg)
    return model, opts, ranks


def _ids(opt):
    return [id(p) for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("method", lowrank_lm.SPLIT_METHODS)
def test_split_arm_trains_the_other_parameters_with_their_own_adamw(method):
    import torch

    from torchlowrank.layers import LowRankLinear
    from torchlowrank.optim import LowRankAdam

    other = {"LowRankAdam": 3e-3, "factorized AdamW": 1e-3}[method]
    cfg = dataclasses.replace(lowrank_lm.QUICK, other_lr={method: other})
    model, (main, rest), ranks = _arm(method, cfg, lr=2e-2)
    assert type(rest) is torch.optim.AdamW
    assert [(g["lr"], g["weight_decay"]) for g in rest.param_groups] == [(other, 0.0)]
    assert all(g["lr"] == 2e-2 for g in main.param_groups)  # the searched rate: projections only
    projections = {id(p) for n in ranks for p in model.get_submodule(n).parameters()}
    named = dict(model.named_parameters())
    outside = {id(p) for n, p in named.items() if not any(f".{t}." in n for t in lowrank_lm.TARGETS)}
    assert outside and projections and not outside & projections
    assert set(_ids(rest)) == outside and len(_ids(rest)) == len(outside)  # embeddings, norms, head
    assert set(_ids(main)) == projections and len(_ids(main)) == len(projections)
    assert len(projections) + len(outside) == len(named)  # the two cover the model, no overlap
    if method == "LowRankAdam":
        assert type(main) is LowRankAdam
        lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
        assert len(lowrank) == len(ranks)
        assert {id(p) for m in lowrank for p in (m.U, m.S, m.V)} == projections
        assert all(g["unit"] is not None for g in main.param_groups)  # no plain group left in it
    else:
        assert type(main) is torch.optim.AdamW


def test_without_ablation_knobs_one_optimizer_trains_everything():
    for method in lowrank_lm.SPLIT_METHODS:
        model, opts, _ = _arm(method, lowrank_lm.QUICK)
        assert len(opts) == 1 and set(_ids(opts[0])) == {id(p) for p in model.parameters()}
        assert all(g["lr"] == 1e-2 for g in opts[0].param_groups)


def _curve(method, cfg, lr):
    import torch

    from torchlowrank.progress import progress_bar

    corpus = load_rotten_tomatoes_bytes()
    base = lowrank_lm.build_model(cfg, 0)
    ctx = {
        "bases": {0: base},
        "ranks": {0.25: lowrank_lm.budget_ranks(base, 0.25)},
        "device": torch.device("cpu"),
        "train": corpus.train,
        "offsets": {0: lowrank_lm.train_offsets(len(corpus.train), cfg, 0)},
        "val": lowrank_lm.windows(corpus.val, cfg.seq_len, cfg.eval_seqs),
        "bar": progress_bar(total=1, enabled=False),
    }
    return lowrank_lm.run_arm(method, 0.25, 0, lr, cfg, ctx)[0]["val"]


@pytest.mark.parametrize("method", lowrank_lm.SPLIT_METHODS)
def test_split_at_the_arms_own_rate_is_the_registered_arm(method):
    # the others' AdamW at the searched rate is the registered arm (same Adam update); at a 10x
    # smaller rate it is not: the split changes nothing but the other parameters' rate
    cfg = dataclasses.replace(lowrank_lm.QUICK, steps=20, eval_every=10)
    plain = _curve(method, cfg, 1e-2)
    same = _curve(method, dataclasses.replace(cfg, other_lr={method: 1e-2}), 1e-2)
    slower = _curve(method, dataclasses.replace(cfg, other_lr={method: 1e-3}), 1e-2)
    assert same == pytest.approx(plain, rel=1e-5, abs=1e-5)
    assert abs(slower[-1] - plain[-1]) > 1e-3


def test_optimizer_kwargs_reach_the_searched_optimizer_only():
    cfg = dataclasses.replace(
        lowrank_lm.QUICK,
        other_lr={"LowRankAdam": 3e-3},
        optimizer_kwargs={"LowRankAdam": {"basis_lr_ratio": 10.0, "second_moment": "elementwise"}},
    )
    _, (main, rest), _ = _arm("LowRankAdam", cfg)
    assert all((g["basis_lr_ratio"], g["second_moment"]) == (10.0, "elementwise") for g in main.param_groups)
    assert rest.param_groups[0]["betas"] == main.defaults["betas"]  # what the unsplit arm gives them
    cfg = dataclasses.replace(lowrank_lm.QUICK, optimizer_kwargs={"factorized AdamW": {"betas": (0.9, 0.95)}})
    _, (opt,), _ = _arm("factorized AdamW", cfg)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    _, (opt,), _ = _arm("factorized AdamW", lowrank_lm.QUICK)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)  # the registered arm: AdamW's default


def test_ablation_knobs_for_an_unsupported_method_are_refused():
    with pytest.raises(ValueError, match="other_lr"):
        dataclasses.replace(lowrank_lm.QUICK, other_lr={"GaLoreAdamW": 1e-3})
    with pytest.raises(ValueError, match="optimizer_kwargs"):
        dataclasses.replace(lowrank_lm.QUICK, optimizer_kwargs={"LowRankAdam adaptive": {"tau": 0.5}})


def test_ablation_knobs_are_stated_in_the_notes_only_when_set():
    corpus = load_rotten_tomatoes_bytes()
    cfg = dataclasses.replace(
        lowrank_lm.QUICK,
        other_lr={"LowRankAdam": 3e-3},
        optimizer_kwargs={"factorized AdamW": {"betas": (0.9, 0.95)}},
    )
    notes = lowrank_lm.setting_notes(cfg, corpus, "", 1, type("D", (), {"type": "cpu"}), "cmd")
    assert "own AdamW (weight decay 0) at lr 0.003" in notes and "betas=(0.9, 0.95)" in notes
    assert "{" not in notes and "}" not in notes
    plain = lowrank_lm.setting_notes(lowrank_lm.QUICK, corpus, "", 1, type("D", (), {"type": "cpu"}), "cmd")
    assert "own AdamW" not in plain and "optimizer arguments" not in plain


def test_the_per_tensor_arm_trains_every_parameter_of_the_ab_model_with_one_per_tensor_adamw():
    from torchlowrank.experiments.per_tensor_adam import PerTensorAdamW

    assert lowrank_lm.PER_TENSOR not in lowrank_lm.LMConfig().methods  # not in the registered run
    model, opts, _ = _arm(lowrank_lm.PER_TENSOR, lowrank_lm.QUICK)
    assert len(opts) == 1 and type(opts[0]) is PerTensorAdamW
    assert set(_ids(opts[0])) == {id(p) for p in model.parameters()}
