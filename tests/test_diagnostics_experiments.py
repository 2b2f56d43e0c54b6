"""The registered diagnostics reproductions run (--quick) on real data and show what they claim."""

import os

import pytest

from torchlowrank.experiments import demo_sections, get_experiment
from torchlowrank.report import load_result, write_report

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytestmark = pytest.mark.slow


def test_dropout_lowrank_quick_matches_the_closed_form(tmp_path):
    r = get_experiment("dropout-lowrank").run(quick=True)
    assert r.metrics["max_abs_error_gd_vs_closed_form"] < 1e-6
    assert r.metrics["max_abs_error_dropout_vs_closed_form"] < 0.02
    ranks = r.history["rank_closed_form"]
    assert ranks == sorted(ranks, reverse=True)  # thetas are listed from high to low keep probability
    paths = write_report(r, tmp_path)
    assert load_result(paths["json"]).metrics == r.metrics


def test_gradient_rank_quick_gradients_are_far_below_full_rank():
    r = get_experiment("gradient-rank").run(quick=True)
    # the claim: a minibatch gradient's energy sits in a few directions, far fewer than its exact rank
    # (<= the batch size, 64) and than the layer's full rank (measured: 0.0075 MLP, 0.027 ViT)
    assert r.metrics["mlp_median_grad_stable_rank_over_full_rank"] < 0.02
    assert r.metrics["vit_median_grad_stable_rank_over_full_rank"] < 0.06
    assert (
        r.metrics["mlp_median_grad_stable_rank"]
        < 0.1 * r.metrics["mlp_exact_rank_of_one_batch_gradient_features.0"]
    )
    assert {p.name for p in r.plots} >= {"mlp_stable_rank_grad", "vit_stable_rank_update"}


def test_pretrained_spectra_quick_trained_weights_have_lower_stable_rank_than_random():
    pytest.importorskip("transformers")
    r = get_experiment("pretrained-spectra").run(quick=True)
    table = r.tables[0]
    rows = {row[0]: dict(zip(table.columns, row)) for row in table.rows}
    for t in ("query", "key", "value", "attn-out", "ffn-in", "ffn-out"):
        # stable rank: pretrained vs Gaussian of the same shape
        assert rows[t]["stable rank"] < 0.6 * rows[t]["stable (random)"], t


def test_tracker_demo_section_records_ranks_over_training():
    (section,) = [s for s in demo_sections() if s.name == "tracker"]
    r = section.run(progress=False)
    assert r.metrics["steps"] == 900 and r.metrics["test_accuracy"] > 0.9
    assert any(p.kind == "heatmap" for p in r.plots)
