"""geolora-finetune (quick): GeoLoRA vs peft's LoRA and AdaLoRA end to end, at one final budget."""

from __future__ import annotations

import pytest
import torch

from torchlowrank.experiments.registry import get_experiment


def test_geolora_finetune_quick_runs_end_to_end():
    pytest.importorskip("peft")
    before = torch.get_rng_state()
    result = get_experiment("geolora-finetune").run(quick=True)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is left alone
    m = result.metrics
    budget = result.config["geolora_rank_budget_parameters"]
    n_matrices = 24
    assert budget == n_matrices * result.config["budget_rank"] * (384 + 384 + 1)
    for arm in ("lora", "adalora", "geolora"):
        assert 0.0 <= m[f"{arm}_accuracy_mean"] <= 1.0
        assert m[f"{arm}_step_ms"] > 0
        ranks = m[f"{arm}_ranks_seed0"]
        assert len(ranks) == n_matrices
        # one lr per arm, picked from the same grid by validation accuracy on the first seed
        grid = m[f"{arm}_grid_val_accuracy"]
        assert sorted(grid) == sorted(result.config["lr_grid"])
        assert grid[m[f"{arm}_lr"]] == max(grid.values())
    # every arm ends within the budget of budget_rank ranks per matrix on average
    assert m["lora_total_rank"] == [n_matrices * result.config["budget_rank"]]
    assert m["adalora_total_rank"][0] <= n_matrices * result.config["budget_rank"]
    assert m["geolora_adapter_parameters"][0] <= budget
    assert result.config["command"].startswith("torchlowrank reproduce geolora-finetune --quick")
    assert len(result.tables) == 3 and len(result.tables[2].rows) == n_matrices
