import pytest
import torch
from torch import nn

import torchlowrank as tlr
from conftest import randomize_trainable


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10))


@pytest.mark.parametrize("p", [1.0, 0.5, 0.25, 0.15])
def test_truncate_keeps_at_most_the_requested_fraction_of_each_layer(p):
    model = mlp()
    before = tlr.count_parameters(model)
    report = tlr.truncate(model, p)
    for row in report.layers:
        m, n = row.shape
        k = row.rank
        # U (m, k), S (k,), V (n, k): the largest k that fits in p * m * n numbers
        assert k * (m + n + 1) <= p * m * n < (k + 1) * (m + n + 1)
        assert row.params_after == k * (m + n + 1) + m  # U, S, V and the bias
        assert row.params_after <= row.params_before
    assert isinstance(model[0], tlr.LowRankLinear)
    assert report.model_params_before == before
    assert report.model_params_after == tlr.count_parameters(model) <= before


def test_truncated_model_output_matches_truncated_weights():
    model = mlp().double()
    dense = [model[i].weight.detach().clone() for i in (0, 2, 4)]
    tlr.truncate(model, 0.5)
    for W, i in zip(dense, (0, 2, 4)):
        k = model[i].rank
        U, S, Vh = torch.linalg.svd(W)
        torch.testing.assert_close(model[i].dense_weight().detach(), (U[:, :k] * S[:k]) @ Vh[:k])


def _mlp_with_a_nearly_low_rank_layer():
    model = mlp()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # layer 2 is nearly rank 3: energy allocation should give it few ranks
        model[2].weight.copy_(
            torch.randn(96, 3, generator=g) @ torch.randn(3, 128, generator=g)
            + 1e-3 * torch.randn(96, 128, generator=g)
        )
    return model


def test_energy_allocation_respects_the_global_budget_and_beats_uniform_on_captured_energy():
    p = 0.3
    uniform = tlr.truncate(_mlp_with_a_nearly_low_rank_layer(), p)
    energy = tlr.truncate(_mlp_with_a_nearly_low_rank_layer(), p, allocation="energy")
    dense_sizes = sum(r.shape[0] * r.shape[1] for r in energy.layers)
    assert sum(r.rank * (r.shape[0] + r.shape[1] + 1) for r in energy.layers) <= p * dense_sizes
    assert energy.ranks["2"] <= 4 < uniform.ranks["2"]
    # the objective the greedy allocation maximises: relative singular-value energy kept, summed over layers
    kept_energy = sum(r.energy_kept for r in energy.layers)
    kept_uniform = sum(r.energy_kept for r in uniform.layers)
    assert kept_energy > kept_uniform + 0.02, (kept_energy, kept_uniform)


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


@pytest.mark.parametrize(
    "shape, rank", [((256, 512), 32), ((784, 512), 77), ((512, 784), 64), ((1024, 1024), 64)]
)
def test_from_linear_is_the_best_rank_k_approximation_at_user_sizes(shape, rank):
    m, n = shape
    torch.manual_seed(1)
    linear = nn.Linear(n, m)  # a flat (Kaiming-uniform) spectrum: the hard case for randomized SVDs
    W = linear.weight.detach().double()
    s = torch.linalg.svdvals(W)
    optimal = float(s[rank:].pow(2).sum().sqrt())
    low = tlr.LowRankLinear.from_linear(linear, rank)
    err = float(torch.linalg.norm(W - low.dense_weight().detach().double()))
    assert err <= optimal * (1 + 1e-5), err / optimal
    torch.testing.assert_close(low.S.detach().double(), s[:rank], rtol=1e-5, atol=1e-6)


def test_truncate_and_factorize_are_exact_on_a_512_wide_model():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512))
    dense = [model[i].weight.detach().double().clone() for i in (0, 2)]
    report = tlr.truncate(model, 0.2)
    for W, i, row in zip(dense, (0, 2), report.layers):
        s = torch.linalg.svdvals(W)
        optimal = float(s[row.rank :].pow(2).sum().sqrt())
        err = float(torch.linalg.norm(W - model[i].dense_weight().detach().double()))
        assert err <= optimal * (1 + 1e-5)


def test_truncate_gpt2_compresses_every_conv1d_and_keeps_the_tied_embedding(tiny_gpt2):
    import hf_models

    model = tiny_gpt2
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    mats = {n: model.get_submodule(n).weight.detach().T.double().clone() for n in conv1d}
    before = tlr.count_parameters(model)
    with pytest.warns(UserWarning, match=r"lm_head.*tied to transformer\.wte\.weight"):
        report = tlr.truncate(model, 0.5)
    assert sorted(report.ranks) == sorted(conv1d) and len(conv1d) == 8
    assert model.lm_head.weight is model.transformer.wte.weight
    for name in conv1d:
        layer = model.get_submodule(name)
        assert isinstance(layer, tlr.LowRankLinear)
        W = mats[name]  # (out, in), the matrix Conv1D applies
        assert layer.dense_weight().shape == W.shape
        k = report.ranks[name]
        U, S, Vh = torch.linalg.svd(W)
        torch.testing.assert_close(
            layer.dense_weight().detach().double(), (U[:, :k] * S[:k]) @ Vh[:k], atol=1e-5, rtol=1e-4
        )
    after = tlr.count_parameters(model)
    assert report.model_params_before == before and report.model_params_after == after < before
    out = hf_models.outputs(model, hf_models.example_inputs("gpt2"))
    assert torch.isfinite(out).all()


def test_truncating_a_tied_layer_by_name_is_refused_and_changes_nothing(tiny_gpt2):
    state = {k: v.clone() for k, v in tiny_gpt2.state_dict().items()}
    with pytest.raises(ValueError, match=r"lm_head.*tied.*transformer\.wte\.weight"):
        tlr.truncate(tiny_gpt2, 0.5, targets=["lm_head"])
    assert (
        type(tiny_gpt2.lm_head) is nn.Linear and tiny_gpt2.lm_head.weight is tiny_gpt2.transformer.wte.weight
    )
    for k, v in tiny_gpt2.state_dict().items():
        assert torch.equal(v, state[k])


def test_factorize_at_full_rank_preserves_outputs_of_every_tiny_hf_model(tiny_hf_model):
    import hf_models

    name, model, inputs = tiny_hf_model
    model = model.double()
    ref = hf_models.outputs(model, inputs)
    with pytest.warns(UserWarning) if name == "gpt2" else _no_warning():
        report = tlr.factorize(model, 1.0)
    assert report.layers
    torch.testing.assert_close(hf_models.outputs(model, inputs), ref, atol=1e-9, rtol=1e-7)


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_truncate_refuses_layers_inside_adapters_and_leaves_the_model_unchanged():
    model = mlp()
    tlr.adapt(model, tlr.LoRAConfig(r=4, alpha=8, target_modules=["0", "2"]))
    randomize_trainable(model)  # a non-zero adapter
    x = torch.randn(5, 64)
    ref = model(x)
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"adapter.*tlr\.merge"):
        tlr.truncate(model, 0.5)
    assert [type(m) for m in model.modules()] == types
    torch.testing.assert_close(model(x), ref)
    tlr.merge(model)  # the adapter is still there and merges
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_truncate_keeps_the_original_requires_grad_flags():
    model = mlp()
    model.requires_grad_(False)
    model[2].bias.requires_grad_(True)
    tlr.truncate(model, 0.5)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n != "2.bias")
    assert model[2].bias.requires_grad


def test_failed_truncate_leaves_the_model_unchanged_and_names_the_layer():
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 4] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for allocation in ("uniform", "energy"):
        with pytest.raises(ValueError, match=r"layer '2'.*NaN"):
            tlr.truncate(model, 0.5, allocation=allocation)
        assert all(type(model[i]) is nn.Linear for i in (0, 2, 4))
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]) or (
                torch.isnan(v).any() and torch.equal(v.isnan(), state[k].isnan())
            )


def test_meta_models_get_a_clear_error_from_truncate_and_factorize():
    with torch.device("meta"):
        model = mlp()
    for fn in (
        lambda: tlr.truncate(model, 0.5),
        lambda: tlr.truncate(model, 0.5, allocation="energy"),
        lambda: tlr.factorize(model, 4),
    ):
        with pytest.raises(ValueError, match="meta"):
            fn()
    assert all(type(model[i]) is nn.Linear for i in (0, 2, 4))


def test_unsupported_conv_is_refused_by_name_and_skipped_with_a_warning_otherwise():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, groups=2),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    with pytest.raises(ValueError, match=r"layer '0'.*groups=2"):
        tlr.truncate(model, 0.5, targets=["0"])
    with pytest.warns(
        UserWarning, match=r"skipped 2 layer\(s\).*0 \(Conv2d with groups=2.*1 \(Conv2d.*reflect"
    ):
        report = tlr.truncate(model, 0.5)
    assert list(report.ranks) == ["3"]
    assert model(torch.randn(2, 4, 6, 6)).shape == (2, 10)


def test_a_target_naming_only_unsupported_layers_is_an_error_not_silently_dropped(tiny_gpt2):
    with pytest.raises(ValueError, match=r"target 'ln_1' names only layers of unsupported types:.*LayerNorm"):
        tlr.truncate(tiny_gpt2, 0.5, targets=["c_attn", "ln_1"])
    with pytest.raises(
        ValueError, match=r"target 'attn' names only.*GPT2Attention.*transformer\.h\.0\.attn\.c_attn"
    ):
        tlr.spectrum(tiny_gpt2, targets=["attn"])


def test_truncate_on_every_available_device_matches_the_cpu_result(device):
    model = mlp().double()
    cpu = tlr.truncate(mlp().double(), 0.3)
    report = tlr.truncate(model.to(device), 0.3)
    assert report.ranks == cpu.ranks
    x = torch.randn(4, 64, dtype=torch.float64)
    ref = mlp().double()
    tlr.truncate(ref, 0.3)
    torch.testing.assert_close(model(x.to(device)).cpu(), ref(x), atol=1e-8, rtol=1e-8)


def test_factorize_ab_parametrization_gives_balanced_factors_with_the_same_function(tiny_gpt2):
    import hf_models

    model = mlp().double()
    dense = [model[i].weight.detach().clone() for i in (0, 2, 4)]
    report = tlr.factorize(model, 8, parametrization="AB")
    for W, i in zip(dense, (0, 2, 4)):
        layer = model[i]
        assert isinstance(layer, tlr.FactorizedLinear) and layer.rank == 8
        U, S, Vh = torch.linalg.svd(W)
        torch.testing.assert_close(layer.dense_weight().detach(), (U[:, :8] * S[:8]) @ Vh[:8])
        torch.testing.assert_close(layer.A.detach().norm(dim=0), layer.B.detach().norm(dim=0))  # balanced
    assert report.model_params_after == tlr.count_parameters(model)
    gpt2 = tiny_gpt2.double()
    ref = hf_models.outputs(gpt2, hf_models.example_inputs("gpt2"))
    with pytest.warns(UserWarning, match="tied"):
        tlr.factorize(gpt2, 1.0, parametrization="AB")
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, tlr.FactorizedLinear)
    torch.testing.assert_close(
        hf_models.outputs(gpt2, hf_models.example_inputs("gpt2")), ref, atol=1e-9, rtol=1e-7
    )
    with pytest.raises(ValueError, match="parametrization"):
        tlr.factorize(mlp(), 4, parametrization="UV")
