"""bf16 autocast (float32 parameters, bfloat16 matmuls) for adapters and the low-rank optimizers.
Half-precision *parameters* are tested beside each feature (test_layers, test_adapters_models,
test_optim_*, test_regularizers_q3r)."""

import copy

import pytest
import torch
from torch import nn

import hf_models
import torchlowrank as tlr
from torchlowrank.adapters.model import adapter_layers


@pytest.mark.parametrize(
    "config",
    [
        tlr.LoRAConfig(r=4, target_modules="all-linear"),
        tlr.DeepLoRAConfig(r=4, depth=3, compress=True, target_modules="all-linear"),
    ],
    ids=["lora", "deep3-compressed"],
)
def test_adapted_llama_under_bf16_autocast_matches_float32_and_gives_float32_gradients(tiny_llama, config):
    model = tlr.adapt(tiny_llama, copy.deepcopy(config))
    ids = hf_models.example_inputs("llama")["input_ids"]
    if isinstance(config, tlr.LoRAConfig):
        for _, layer in adapter_layers(model):
            with torch.no_grad():
                layer.lora_factors[-1].normal_(0, 1e-2)  # B = 0 would hide the adapter path
    else:
        tlr.init_compressed(model, {"input_ids": ids, "labels": ids})
    ref = model(input_ids=ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    assert abs(out.loss.item() - ref.item()) < 2e-2 * abs(ref.item())
    out.loss.backward()
    factors = [W for _, layer in adapter_layers(model) for W in layer.lora_factors]
    assert all(
        W.grad is not None and W.grad.dtype == torch.float32 and torch.isfinite(W.grad).all() for W in factors
    )
    assert sum(bool(W.grad.abs().sum() > 0) for W in factors) == len(factors)


def _train_small(make_opt, autocast):
    torch.manual_seed(0)
    model = nn.Sequential(tlr.LowRankLinear(32, 24, 4), nn.ReLU(), nn.Linear(24, 3))
    x, y = torch.randn(64, 32), torch.randint(0, 3, (64,))
    opt = make_opt(model)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: tlr.optim.LowRankAdam(m, lr=1e-2, tau=0.1),
        lambda m: tlr.optim.LowRankSGD(m, lr=5e-2),
        lambda m: tlr.optim.GaLoreAdamW(m.parameters(), lr=1e-2, rank=2, update_gap=10),
    ],
    ids=["LowRankAdam", "LowRankSGD", "GaLoreAdamW"],
)
def test_optimizers_train_under_bf16_autocast_like_float32_and_keep_float32_orthonormal_factors(make_opt):
    model, opt, losses = _train_small(make_opt, autocast=True)
    _, _, ref = _train_small(make_opt, autocast=False)
    layer = model[0]
    assert layer.U.dtype == torch.float32 and all(torch.isfinite(p).all() for p in model.parameters())
    if not isinstance(opt, tlr.optim.GaLoreAdamW):  # the geometric optimizers keep U, V orthonormal
        for F in (layer.U, layer.V):
            torch.testing.assert_close(F.T @ F, torch.eye(layer.rank), atol=1e-5, rtol=0)
    assert losses[-1] < 0.9 * losses[0]
    assert abs(losses[-1] - ref[-1]) < 1e-2 * ref[-1]  # the bf16 matmuls do not change the trajectory
