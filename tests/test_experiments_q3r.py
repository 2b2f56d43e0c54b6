"""Q3R reproductions: q3r-truncation (quick), the q3r demo section, and the q3r-finetune export path."""

import copy
import math

import pytest
import torch

from torchlowrank.experiments.registry import demo_sections, get_experiment, list_experiments


def test_q3r_experiments_and_demo_are_registered():
    names = {e.name for e in list_experiments()}
    assert {"q3r-truncation", "q3r-finetune"} <= names
    orders = [s.order for s in demo_sections()]
    assert "q3r" in [s.name for s in demo_sections()] and len(set(orders)) == len(
        orders
    )  # a well-defined order


def _records(table):
    """The table's rows as dicts keyed by column name."""
    return [dict(zip(table.columns, row)) for row in table.rows]


def test_q3r_truncation_quick_reports_every_method_and_fraction():
    result = get_experiment("q3r-truncation").run(quick=True)
    fractions = result.config["fractions"]
    trunc = _records(result.tables[1])
    assert len(trunc) == 3 * len(fractions) + 1  # dense, q3r, nuclear per fraction + the factorized run
    for row in trunc[:-1]:
        # the truncation kept the asked fraction of the parameters
        assert abs(row["actual fraction"] - row["kept fraction"]) < 0.06
    for key, value in result.metrics.items():
        if "accuracy" in key or "truncated" in key or "finetuned" in key:
            assert 0.0 <= value <= 1.0, key
    m = result.metrics
    for method in ("dense", "q3r", "nuclear"):  # the drop is untruncated minus truncated at 40%
        assert m[f"{method}_drop_at_0.4"] == m[f"{method}_test_accuracy"] - m[f"{method}_truncated_0.4"]
    assert result.config["command"].startswith("torchlowrank reproduce q3r-truncation")
    assert "claim_reproduced" not in m and "reproduced" not in result.notes  # the reading is in docs/


def test_q3r_demo_section_truncates_better_than_dense_training():
    section = next(s for s in demo_sections() if s.name == "q3r")
    result = section.run(progress=False)
    m = result.metrics
    assert m["q3r_truncated_0.1"] > m["dense_truncated_0.1"] + 0.1  # below the target rank: Q3R degrades less
    assert m["q3r_truncated_0.2"] > m["q3r_accuracy"] - 0.01  # at the target rank (8): nothing is lost
    assert m["q3r_accuracy"] > m["dense_accuracy"] - 0.04


def test_update_turned_into_a_lora_adapter_is_served_identically_by_peft(tmp_path):
    pytest.importorskip("peft")
    from torchlowrank.experiments.q3r_finetune import _targeted, adapter_from_update, served_by_peft
    from torchlowrank.models import load_minilm

    tokenizer, base = load_minilm(num_labels=2, seed=0)
    base.eval()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an exactly rank-2 update of every targeted matrix, and a new head
        for layer in _targeted(tuned).values():
            m, n = layer.weight.shape
            layer.weight.add_(0.05 * torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g) / n**0.5)
        tuned.classifier.weight.add_(0.1 * torch.randn(tuned.classifier.weight.shape, generator=g))
    enc = tokenizer(["a gorgeous, witty film", "tedious and flat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = tuned(**enc).logits
        adapted = adapter_from_update(base, tuned, 2)
        served = served_by_peft(base, adapted, tmp_path / "adapter")
        torch.testing.assert_close(adapted(**enc).logits, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(served(**enc).logits, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(base(**enc).logits, want, atol=1e-3)


def test_q3r_finetune_quick_runs_end_to_end():
    pytest.importorskip("peft")
    result = get_experiment("q3r-finetune").run(quick=True)
    m, cfg = result.metrics, result.config
    # the adapter served by peft is the same model as tlr's adapted copy
    assert m["full_adapter_accuracy"] == m["full_adapter_accuracy_tlr"]
    assert m["q3r_adapter_accuracy"] == m["q3r_adapter_accuracy_tlr"]
    for key in ("full", "q3r"):
        # training moved the targeted matrices, and not within rank r: the tail beyond r holds energy
        assert 0.0 < m[f"{key}_update_tail_energy"] < 1.0, key
        # AdamW moves a parameter by about lr per step: the biases moved, by at most ~ steps x lr
        assert 0.0 < m[f"{key}_max_bias_change"] <= 1.5 * cfg["steps"] * cfg["lr"], key
    # the regularizer acted: Q3R's update is not the plain fine-tuning's
    assert m["q3r_update_tail_energy"] != m["full_update_tail_energy"]
    (loss,) = result.plots
    assert [s.label for s in loss.series] == ["full fine-tuning", "full fine-tuning + Q3R", "LoRA (peft)"]
    for curve in loss.series:  # one finite training loss per step
        assert len(curve.y) == cfg["steps"] and all(math.isfinite(v) for v in curve.y), curve.label


def test_q3r_finetune_repeats_itself_and_leaves_the_global_generator_as_it_was():
    """peft's LoRA init and MiniLM's dropout use the global generator: the run seeds it in a fork."""
    pytest.importorskip("peft")
    before = torch.get_rng_state()
    first = get_experiment("q3r-finetune").run(quick=True, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    second = get_experiment("q3r-finetune").run(quick=True, progress=False)
    assert first.metrics == second.metrics
