import math

import pytest
import torch
from torch import nn

import torchlowrank as tlr


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10))


@pytest.mark.parametrize("p", [1.0, 0.5, 0.25, 0.15])
def test_truncate_keeps_the_requested_fraction_as_defined(p):
    model = mlp()
    report = tlr.truncate(model, p)
    for row in report.layers:
        m, n = row.shape
        k = row.rank
        assert k == math.floor(p * m * n / (m + n))
        assert k * (m + n) <= p * m * n < (k + 1) * (m + n)
        assert row.params_after == k * (m + n) + k + m  # U, V, S and the bias
    assert isinstance(model[0], tlr.LowRankLinear)
    assert report.model_params_after == tlr.count_parameters(model)


def test_truncated_model_output_matches_truncated_weights():
    model = mlp().double()
    dense = [model[i].weight.detach().clone() for i in (0, 2, 4)]
    tlr.truncate(model, 0.5)
    for W, i in zip(dense, (0, 2, 4)):
        k = model[i].rank
        U, S, Vh = torch.linalg.svd(W)
        torch.testing.assert_close(model[i].dense_weight().detach(), (U[:, :k] * S[:k]) @ Vh[:k])


def test_energy_allocation_respects_the_global_budget_and_beats_uniform_on_energy():
    model = mlp()
    # make layer 2 nearly low rank: energy allocation should give it few ranks
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(96, 3) @ torch.randn(3, 128) + 1e-3 * torch.randn(96, 128))
    dense_sizes = sum(model[i].weight.numel() for i in (0, 2, 4))
    report = tlr.truncate(model, 0.3, allocation="energy")
    factor_params = sum(r.rank * (r.shape[0] + r.shape[1]) for r in report.layers)
    assert factor_params <= 0.3 * dense_sizes
    ranks = report.ranks
    assert ranks["2"] <= 4 and ranks["0"] > ranks["2"]


def test_factorize_by_int_and_fraction():
    model = mlp()
    report = tlr.factorize(model, 0.5, targets=["0", "2"])
    assert report.ranks == {"0": 32, "2": 48}
    assert isinstance(model[4], nn.Linear)
    model = mlp()
    tlr.factorize(model, 8)
    assert all(isinstance(model[i], tlr.LowRankLinear) and model[i].rank == 8 for i in (0, 2, 4))


def test_factorize_regex_targets_and_conv_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(2, 3, 8, 8)
    tlr.factorize(model, 1.0, targets=r"0|3")
    assert isinstance(model[0], tlr.LowRankConv2d) and isinstance(model[3], tlr.LowRankLinear)
    assert model(x).shape == (2, 10)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match=r"param_fraction must be a number in \(0, 1\]"):
        tlr.truncate(mlp(), 1.5)
    with pytest.raises(ValueError, match=r"param_fraction"):
        tlr.truncate(mlp(), 0)
    with pytest.raises(ValueError, match="matched nothing among: 0, 2, 4"):
        tlr.truncate(mlp(), 0.5, targets=["attention"])
    with pytest.raises(ValueError, match="rank 100 is outside 1..64"):
        tlr.factorize(mlp(), 100)
    with pytest.raises(ValueError, match="rank 0"):
        tlr.truncate(nn.Sequential(nn.Linear(4, 4)), 0.1)
    with pytest.raises(ValueError, match="allocation"):
        tlr.truncate(mlp(), 0.5, allocation="greedy")


def test_count_parameters_counts_shared_once_and_trainable_only():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, lin, nn.Linear(4, 2))
    assert tlr.count_parameters(model) == 20 + 10
    model[2].weight.requires_grad_(False)
    assert tlr.count_parameters(model, trainable_only=True) == 20 + 2
