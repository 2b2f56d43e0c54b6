import math

import pytest
import torch
from torch import nn

import torchlowrank as tlr


def diag_matrix(values, m=None, n=None):
    k = len(values)
    M = torch.zeros(m or k, n or k, dtype=torch.float64)
    M[range(k), range(k)] = torch.tensor(values, dtype=torch.float64)
    Q1, _ = torch.linalg.qr(torch.randn(M.shape[0], M.shape[0], dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(M.shape[1], M.shape[1], dtype=torch.float64))
    return Q1 @ M @ Q2


def test_stable_rank_is_frobenius_over_spectral_norm_squared():
    W = diag_matrix([3.0, 2.0, 1.0, 0.0], 6, 5)
    assert math.isclose(tlr.stable_rank(W), (9 + 4 + 1) / 9, rel_tol=1e-10)


def test_effective_rank_is_exp_entropy_of_normalised_spectrum():
    W = diag_matrix([1.0, 1.0, 1.0, 1.0])
    assert math.isclose(tlr.effective_rank(W), 4.0, rel_tol=1e-10)
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    p = s / s.sum()
    assert math.isclose(
        tlr.effective_rank(diag_matrix([3.0, 2.0, 1.0])), float(torch.exp(-(p * p.log()).sum())), rel_tol=1e-9
    )


def test_numerical_rank_counts_energy():
    W = diag_matrix([10.0, 1.0, 0.1])  # energies 100, 1, 0.01
    assert tlr.numerical_rank(W, energy=0.99) == 1
    assert tlr.numerical_rank(W, energy=0.9999) == 2
    assert tlr.numerical_rank(W, energy=1.0) == 3
    with pytest.raises(ValueError, match="energy"):
        tlr.numerical_rank(W, energy=1.5)


def test_zero_matrix_has_rank_zero():
    Z = torch.zeros(4, 3)
    assert tlr.stable_rank(Z) == 0 and tlr.effective_rank(Z) == 0 and tlr.numerical_rank(Z) == 0


def test_rank_measures_reject_nan():
    W = torch.randn(4, 4)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tlr.stable_rank(W)


def test_spectrum_table_covers_linear_conv_embedding_and_factorized_layers():
    model = nn.Sequential(
        nn.Embedding(50, 8), nn.Linear(8, 16), nn.Conv2d(3, 4, 3), tlr.LowRankLinear(16, 12, 2)
    )
    table = tlr.spectrum(model, top_k=3)
    by_name = {r.name: r for r in table}
    assert set(by_name) == {"0", "1", "2", "3"}
    assert by_name["2"].shape == (4, 3, 3, 3) and by_name["2"].full_rank == 4
    assert by_name["3"].numerical_rank <= 2 and by_name["3"].full_rank == 12
    W = model[1].weight.detach()
    top = torch.linalg.svdvals(W)[:3].tolist()
    assert by_name["1"].top_singular_values == pytest.approx(top, rel=1e-5)
    assert by_name["1"].stable_rank == pytest.approx(tlr.stable_rank(W))
    assert "stable rank" in str(table) and table.to_markdown().startswith("| layer")


def test_spectrum_targets_that_match_nothing_list_the_available_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"nothing among: 0, 2"):
        tlr.spectrum(model, targets=["attn"])


def test_spectrum_sees_gpt2_conv1d_as_out_by_in_and_lists_tied_weights_once(tiny_gpt2):
    table = tlr.spectrum(tiny_gpt2)
    by_name = {r.name: r for r in table}
    c_attn = "transformer.h.0.attn.c_attn"
    assert by_name[c_attn].kind == "Conv1D" and by_name[c_attn].shape == (96, 32)
    W = tiny_gpt2.get_submodule(c_attn).weight.detach()
    assert by_name[c_attn].top_singular_values == pytest.approx(
        torch.linalg.svdvals(W)[:5].tolist(), rel=1e-5
    )
    conv1d = [n for n, m in tiny_gpt2.named_modules() if type(m).__name__ == "Conv1D"]
    assert set(conv1d) <= set(by_name)
    # wte and lm_head share one tensor: one row, not two
    assert ("transformer.wte" in by_name) != ("lm_head" in by_name)


@pytest.mark.parametrize("top_k", [0, -3, 2.5, True])
def test_spectrum_rejects_a_top_k_that_is_not_a_positive_int(top_k):
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        tlr.spectrum(nn.Sequential(nn.Linear(4, 4)), top_k=top_k)


def test_spectrum_of_a_meta_model_is_a_clear_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="'0'.*meta"):
        tlr.spectrum(model)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_rank_measures_are_scale_invariant_and_work_in_half_precision(scale):
    g = torch.Generator().manual_seed(0)
    W = (
        torch.randn(64, 32, generator=g, dtype=torch.float64)
        @ torch.diag(0.7 ** torch.arange(32.0, dtype=torch.float64))
        @ torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0]
    )
    ref = (tlr.stable_rank(W), tlr.effective_rank(W), tlr.numerical_rank(W))
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        Ws = (W * scale).to(dtype)
        assert tlr.stable_rank(Ws) == pytest.approx(ref[0], rel=tol)
        assert tlr.effective_rank(Ws) == pytest.approx(ref[1], rel=tol)
        assert abs(tlr.numerical_rank(Ws) - ref[2]) <= (0 if dtype != torch.bfloat16 else 1)
