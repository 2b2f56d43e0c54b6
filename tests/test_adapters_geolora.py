"""GeoLoRA adapters: Delta W = scaling * U diag(S) V^T stepped by LowRankAdam, rank-adaptive, and the
adapter life cycle (merge, save / load at changed ranks, PEFT export served by peft)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import torchlowrank as tlr
from hf_models import build, example_inputs, outputs, served_by_peft
from torchlowrank.adapters import GeoLoRAAdapter, config_from_dict


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 3)
    ).double()


def _data(seed: int = 1, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _train_mlp(model: nn.Module, steps: int = 15, lr: float = 3e-2, **kw):
    x, y = _data()
    opt = tlr.geolora_optimizer(model, lr=lr, **kw)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if model.tlr_adapter.config.rank_budget is not None:
            tlr.rebalance_ranks(model, opt)
    return opt


def test_config_checks_and_round_trip():
    cfg = tlr.GeoLoRAConfig(r=4, lora_alpha=8, tau=0.2, rank_budget=1000, modules_to_save="head")
    assert cfg.scaling == 2.0 and cfg.modules_to_save == ["head"]
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="tau > 0"):
        tlr.GeoLoRAConfig(tau=0.0, rank_budget=1000)
    with pytest.raises(ValueError, match="tau must be in"):
        tlr.GeoLoRAConfig(tau=1.0)
    with pytest.raises(ValueError, match="max_rank"):
        tlr.GeoLoRAConfig(r=8, max_rank=4)


def test_init_is_zero_update_and_only_linear_layers():
    model = _mlp()
    x, _ = _data()
    ref = model(x)
    tlr.adapt(model, tlr.GeoLoRAConfig(r=3, target_modules=["0", "2"]))
    layer = model[0]
    assert isinstance(layer, GeoLoRAAdapter) and layer.r == 3
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(layer.lora_unit.U.T @ layer.lora_unit.U, eye)
    torch.testing.assert_close(layer.lora_unit.V.T @ layer.lora_unit.V, eye)
    assert torch.equal(layer.lora_unit.S, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(model(x), ref)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="GeoLoRA adapters support nn.Linear"):
        tlr.adapt(conv, tlr.GeoLoRAConfig(r=2, target_modules=["0"]))
    assert isinstance(conv[0], nn.Conv2d)  # unchanged


def test_merge_equals_adapted_outputs_with_scaling():
    model = _mlp()
    x, _ = _data()
    tlr.adapt(model, tlr.GeoLoRAConfig(r=3, lora_alpha=6, target_modules=["0", "2"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in tlr.adapters.adapter_layers(model):
            layer.lora_unit.S.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
    out = model(x)
    plain = copy.deepcopy(model)
    for _, layer in tlr.adapters.adapter_layers(plain):
        layer.disabled = True
    assert (out - plain(x)).abs().max() > 1e-2  # the adapter changes the function
    w = model[0].base_layer.weight.detach().clone()
    u = model[0].lora_unit
    expected = w + 2.0 * (u.U * u.S) @ u.V.T
    tlr.merge(model)
    assert isinstance(model[0], nn.Linear)
    torch.testing.assert_close(model[0].weight, expected.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x), out, rtol=0, atol=1e-12)


def test_lowrankadam_trains_only_adapter_and_modules_to_save():
    model = _mlp()
    tlr.adapt(model, tlr.GeoLoRAConfig(r=3, tau=0.0, target_modules=["0", "2"], modules_to_save=["4"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = _train_mlp(model, steps=3)
    units = {g["unit"] for g in opt.param_groups if g["unit"] is not None}
    assert units == {"0.lora_unit", "2.lora_unit"}
    others = [p for g in opt.param_groups if g["unit"] is None for p in g["params"]]
    assert {id(p) for p in others} == {id(p) for p in model[4].parameters()}
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n]) if p.shape == before[n].shape else True
        assert moved == (".lora_unit." in n or n.startswith("4.")), n
    assert tlr.adapter_ranks(model) == {"0": 3, "2": 3}  # tau = 0: fixed rank
    u = model[0].lora_unit
    torch.testing.assert_close(u.U.T @ u.U, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)


def _orthogonal_complement(X: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k orthonormal columns orthogonal to the orthonormal columns of X."""
    Y = torch.randn(X.shape[0], k, generator=g, dtype=X.dtype)
    return torch.linalg.qr(Y - X @ (X.T @ Y))[0]


def _first_step_of_singular_values(make_optimizer, lr: float = 1e-3) -> torch.Tensor:
    """S after one step minus S before, for an adapter at S = (1, 0.5) whose loss <G, Delta W> puts
    a gradient of +-1e-3 on the singular values and entries of size ~1 on the basis directions."""
    model = _mlp()
    tlr.adapt(model, tlr.GeoLoRAConfig(r=2, tau=0.0, target_modules=["0"]))
    unit = model[0].lora_unit
    with torch.no_grad():
        unit.S.copy_(torch.tensor([1.0, 0.5], dtype=torch.float64))
    U, V = unit.U.detach(), unit.V.detach()
    g = torch.Generator().manual_seed(3)
    U_perp, V_perp = _orthogonal_complement(U, 2, g), _orthogonal_complement(V, 2, g)
    small = U @ torch.diag(torch.tensor([1e-3, -1e-3], dtype=torch.float64)) @ V.T
    big = U_perp @ torch.randn(2, 2, generator=g, dtype=torch.float64) @ V.T
    big = big + U @ torch.randn(2, 2, generator=g, dtype=torch.float64) @ V_perp.T
    G = small + big
    opt = make_optimizer(model, lr)
    before = unit.S.detach().clone()
    (model[0].delta_matrix() * G).sum().backward()
    opt.step()
    return unit.S.detach() - before


def test_geolora_optimizer_moves_each_singular_value_by_lr_however_small_its_share_of_the_gradient():
    """Adam's first step moves every coordinate by lr whatever its gradient's size; geolora_optimizer
    (elementwise second moment) does so for the singular values, as Adam does for LoRA's B. One
    second moment per layer ("unit") divides them by the whole core's gradient and they hardly move."""
    lr = 1e-3
    step = _first_step_of_singular_values(tlr.geolora_optimizer, lr)
    # dL/dS = (+1e-3, -1e-3): S_1 decreases and S_2 increases by lr, up to the second-order shift
    # of the basis blocks' rotation (~(3 lr)^2 / s)
    torch.testing.assert_close(step, torch.tensor([-lr, lr], dtype=torch.float64), atol=0.1 * lr, rtol=0)
    unit_step = _first_step_of_singular_values(
        lambda model, lr: tlr.geolora_optimizer(model, lr=lr, second_moment="unit"), lr
    )
    assert unit_step.abs().max() < 0.1 * lr  # only the second-order shift is left


def test_rank_adaptive_training_then_save_load_merge(tmp_path):
    model = _mlp()
    cfg = tlr.GeoLoRAConfig(r=3, lora_alpha=6, tau=0.4, target_modules=["0", "2"], modules_to_save=["4"])
    base = copy.deepcopy(model)
    tlr.adapt(model, cfg)
    _train_mlp(model, steps=15)
    ranks = tlr.adapter_ranks(model)
    assert ranks != {"0": 3, "2": 3}, ranks
    x, _ = _data(seed=5)
    out = model(x).detach()
    tlr.save_adapter(model, tmp_path / "geo")
    # into a fresh base: adapted with the file's config, factors sized from the file
    fresh = tlr.load_adapter(copy.deepcopy(base), tmp_path / "geo")
    assert tlr.adapter_ranks(fresh) == ranks
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=1e-12)
    # into a model adapted with the same config but still at the initial ranks
    again = tlr.adapt(copy.deepcopy(base), cfg)
    tlr.load_adapter(again, tmp_path / "geo")
    torch.testing.assert_close(again(x), out, rtol=0, atol=1e-12)
    tlr.merge(fresh)
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=1e-12)


def test_load_refuses_a_corrupt_rank(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tlr.adapt(_mlp(), tlr.GeoLoRAConfig(r=3, target_modules=["0"]))
    folder = tlr.save_adapter(model, tmp_path / "geo")
    weights = folder / "torchlowrank_adapter.safetensors"
    tensors = load_file(weights)
    tensors["0.lora_unit.S"] = torch.zeros(2, dtype=torch.float64)
    save_file(tensors, weights)
    with pytest.raises(ValueError):
        tlr.load_adapter(_mlp(), folder)


def test_global_budget_caps_total_parameters():
    model = _mlp()
    budget = 4 * (12 + 24 + 1) + 4 * (24 + 16 + 1)
    cfg = tlr.GeoLoRAConfig(r=6, tau=1e-3, rank_budget=budget, target_modules=["0", "2"])
    tlr.adapt(model, cfg)
    opt = _train_mlp(model, steps=12)
    ranks = tlr.adapter_ranks(model)
    used = ranks["0"] * (12 + 24 + 1) + ranks["2"] * (24 + 16 + 1)
    assert used <= budget, (ranks, used, budget)
    assert used >= budget - 2 * (24 + 16 + 1)  # tau is tiny: the budget is (nearly) spent
    with pytest.raises(ValueError, match="rank_budget"):
        tlr.rebalance_ranks(model, opt, budget=100)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_geolora_save_load_merge_and_peft_export(name, tmp_path):
    pytest.importorskip("peft")
    base = build(name).double().eval()
    inputs = example_inputs(name)
    model = copy.deepcopy(base)
    tlr.adapt(model, tlr.GeoLoRAConfig(r=4, lora_alpha=8, tau=0.3))
    opt = tlr.geolora_optimizer(model, lr=5e-2)
    model.train()
    for _ in range(6):
        ids = inputs["input_ids"]
        logits = model(**inputs).logits
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    ranks = tlr.adapter_ranks(model)
    assert len(set(ranks.values())) > 1, ranks  # per-layer ranks: the export needs a rank_pattern
    out = outputs(model, inputs)
    assert (out - outputs(base, inputs)).abs().max() > 1e-3
    tlr.save_adapter(model, tmp_path / "tlr")
    loaded = tlr.load_adapter(copy.deepcopy(base), tmp_path / "tlr")
    torch.testing.assert_close(outputs(loaded, inputs), out, rtol=0, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tlr.export_peft(model, tmp_path / "peft")
    # the PEFT folder loads back as LoRA adapters at the per-layer ranks of its rank_pattern
    lora = tlr.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert isinstance(lora.tlr_adapter.config, tlr.LoRAConfig)
    assert {n: layer.r for n, layer in tlr.adapters.adapter_layers(lora)} == ranks
    torch.testing.assert_close(outputs(lora, inputs), out, rtol=0, atol=1e-10)
    served = served_by_peft(base, tmp_path / "peft")
    torch.testing.assert_close(outputs(served, inputs), out, rtol=0, atol=1e-10)
    merged = tlr.merge(copy.deepcopy(model))
    torch.testing.assert_close(outputs(merged, inputs), out, rtol=0, atol=1e-10)
