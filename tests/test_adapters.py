"""Specification of LoRA / Deep LoRA adapters on a small model with every supported layer type
(nn.Linear, HF Conv1D, nn.Conv2d, nn.Embedding): the forward equals the dense-weight formula,
merge is exact, only adapters train, parameter counts follow the formula, compressed Deep LoRA
matches the gradient-subspace construction, save/load round-trips, and bad input is refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchlowrank as tlr
from torchlowrank.adapters import adapter_layers
from torchlowrank.adapters.compressed import random_semi_orthogonal
from torchlowrank.adapters.io import WEIGHTS_NAME
from torchlowrank.linalg import principal_angles

TARGETS = ["emb", "conv", "fc1", "c1d", "fc2"]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(50, 12)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(20, 16)
        self.c1d = Conv1D(16, 16)  # (nf=out, nx=in)
        self.fc2 = nn.Linear(16, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, ids, img):
        e = self.emb(ids).mean(1)
        c = self.conv(img).mean((2, 3))
        h = torch.tanh(self.fc1(torch.cat([e, c], 1)))
        h = torch.tanh(self.c1d(h))
        return self.head(torch.tanh(self.fc2(h)))


def toy(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return Toy().to(dtype)


def inputs(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (4, 7), generator=g), torch.randn(4, 3, 6, 6, generator=g, dtype=dtype)


def randomize(model, std=0.1, seed=3):
    """Make every adapter non-zero (like PEFT's tests do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for W in layer.lora_factors:
                W.copy_(torch.randn(W.shape, generator=g, dtype=W.dtype) * std)


def dense_reference(model, x):
    """The adapted model's function computed from dense_weight() of every layer (no adapter code path)."""
    ids, img = x
    m = model
    e = F.embedding(ids, m.emb.dense_weight()).mean(1)
    c = F.conv2d(img, m.conv.dense_weight(), m.conv.base_layer.bias, padding=1).mean((2, 3))
    h = torch.tanh(F.linear(torch.cat([e, c], 1), m.fc1.dense_weight(), m.fc1.base_layer.bias))
    h = torch.tanh(h @ m.c1d.dense_weight() + m.c1d.base_layer.bias)
    return m.head(torch.tanh(F.linear(h, m.fc2.dense_weight(), m.fc2.base_layer.bias)))


CONFIGS = [
    tlr.LoRAConfig(r=3, alpha=6, target_modules=TARGETS, modules_to_save=["head"]),
    tlr.LoRAConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=TARGETS),
    tlr.DeepLoRAConfig(r=4, depth=3, compress=False, target_modules=TARGETS, modules_to_save=["head"]),
    tlr.DeepLoRAConfig(r=2, depth=4, compress=False, target_modules=TARGETS),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["lora", "rslora", "deep3", "deep4"])
def test_forward_equals_dense_weight_and_merge_is_exact(config):
    model = tlr.adapt(toy(), copy.deepcopy(config))
    randomize(model)
    x = inputs()
    y = model(*x)
    torch.testing.assert_close(y, dense_reference(model, x), rtol=0, atol=1e-12)
    keys_before = set(toy().state_dict())
    tlr.merge(model)
    assert set(model.state_dict()) == keys_before
    assert [type(model.get_submodule(n)) for n in TARGETS] == [type(toy().get_submodule(n)) for n in TARGETS]
    torch.testing.assert_close(model(*x), y, rtol=0, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())  # pre-adapt flags restored


def test_default_lora_starts_at_the_base_function_and_scaling_is_alpha_over_r():
    base = toy()
    model = tlr.adapt(copy.deepcopy(base), tlr.LoRAConfig(r=3, alpha=6, target_modules=TARGETS))
    x = inputs()
    torch.testing.assert_close(model(*x), base(*x), rtol=0, atol=0)  # B = 0 (embedding: A = 0)
    layer = model.fc1
    assert layer.scaling == 2.0 and tlr.LoRAConfig(r=4, alpha=8, use_rslora=True).scaling == 4.0
    randomize(model)
    expected = base.fc1.weight + 2.0 * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer.dense_weight(), expected)


def test_pissa_keeps_the_function_and_moves_the_top_subspace_into_the_adapter():
    base = toy()
    model = tlr.adapt(copy.deepcopy(base), tlr.LoRAConfig(r=3, init="pissa", target_modules=["fc1", "fc2"]))
    x = inputs()
    torch.testing.assert_close(model(*x), base(*x), rtol=0, atol=1e-12)
    s0 = torch.linalg.svdvals(base.fc1.weight)
    s_res = torch.linalg.svdvals(model.fc1.base_layer.weight)
    torch.testing.assert_close(s_res[: len(s0) - 3], s0[3:])  # residual = W0 minus its top-3 SVD part


def test_only_adapters_and_modules_to_save_receive_gradients():
    model = tlr.adapt(toy(), tlr.LoRAConfig(r=2, target_modules=TARGETS, modules_to_save=["head"]))
    randomize(model)
    model(*inputs()).square().sum().backward()
    for name, p in model.named_parameters():
        is_adapter = "lora_factors" in name or name.startswith("head.")
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == is_adapter, name


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_trainable_parameter_count_matches_formula(depth):
    r = 2
    model = tlr.adapt(
        toy(),
        tlr.DeepLoRAConfig(
            r=r, depth=depth, compress=False, target_modules=TARGETS, modules_to_save=["head"]
        ),
    )
    shapes = {"emb": (12, 50), "conv": (8, 27), "fc1": (16, 20), "c1d": (16, 16), "fc2": (10, 16)}
    expected = sum(r * (m + n) + (depth - 2) * r * r for m, n in shapes.values()) + 10 * 3 + 3
    assert tlr.count_parameters(model, trainable_only=True) == expected
    line = tlr.print_trainable_parameters(model, print_fn=None)
    assert f"trainable params: {expected:,d}" in line


def test_all_linear_skips_the_output_head_and_spectrum_sees_the_adapted_weight():
    model = tlr.adapt(toy(), tlr.LoRAConfig(r=2))
    assert sorted(n for n, _ in adapter_layers(model)) == ["c1d", "fc1", "fc2"]  # Linear / Conv1D, no head
    randomize(model)
    table = {row.name: row for row in tlr.spectrum(model)}
    s = torch.linalg.svdvals(model.fc1.dense_weight().detach())
    assert table["fc1"].top_singular_values[0] == pytest.approx(float(s[0]), rel=1e-6)


def test_deep_lora_narrow_init_is_orthogonal_at_scale_eps_and_collapses_to_a_lora_pair():
    eps = 1e-2
    model = tlr.adapt(
        toy(), tlr.DeepLoRAConfig(r=4, depth=3, init_scale=eps, compress=False, target_modules=TARGETS)
    )
    for _, layer in adapter_layers(model):
        for W in layer.lora_factors:
            torch.testing.assert_close(torch.linalg.svdvals(W), torch.full((4,), eps, dtype=W.dtype))
    randomize(model)
    B, A = model.fc1.collapsed_pair()
    torch.testing.assert_close(B @ A, model.fc1.delta_matrix())
    with torch.no_grad():
        full = torch.linalg.svdvals(model.fc1.delta_matrix())
    torch.testing.assert_close(model.fc1.delta_singular_values(), full[:4])


def _independent_gradient(base, x, name):
    """dLoss/dW at W0 for one layer of the un-adapted model, as an (out, in-flat) matrix."""
    model = copy.deepcopy(base)
    loss = model(*x).square().mean()
    w = model.get_submodule(name).weight
    (g,) = torch.autograd.grad(loss, [w])
    if name in ("emb", "c1d"):  # stored as (in, out)
        return g.T
    return g.reshape(g.shape[0], -1)


def test_compressed_init_matches_the_gradient_subspace_construction():
    base, x, r, eps, depth = toy(), inputs(), 4, 1e-2, 3
    model = tlr.adapt(
        copy.deepcopy(base), tlr.DeepLoRAConfig(r=r, depth=depth, init_scale=eps, target_modules=TARGETS)
    )
    grads = tlr.init_compressed(
        model, x, loss_fn=lambda m, b: m(*b).square().mean(), generator=torch.Generator().manual_seed(7)
    )
    gen = torch.Generator().manual_seed(7)  # replay the construction from DESIGN §4.3 in module order
    for name, layer in adapter_layers(model):
        G = _independent_gradient(base, x, name)
        torch.testing.assert_close(grads[name], G)
        m, n = G.shape
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        Q = random_semi_orthogonal(m, n, generator=gen, dtype=G.dtype)
        right, _ = torch.linalg.qr(torch.cat([Vh[: r // 2].T, Q.T @ U[:, : r // 2]], 1))
        first, inner, last = layer.lora_factors
        # the factors: eps * right^T, eps * I, eps * Q right (right is determined up to column signs)
        got_right = first.T / eps
        torch.testing.assert_close(got_right.T @ got_right, torch.eye(r, dtype=G.dtype))
        assert principal_angles(got_right, right).max() < 1e-6
        torch.testing.assert_close(last / eps, Q @ got_right)
        torch.testing.assert_close(inner, eps * torch.eye(r, dtype=G.dtype))
        # Delta W(0) = eps^L left right^T, and span(right) holds V_G's top half
        torch.testing.assert_close(layer.delta_matrix(), eps**depth * (Q @ got_right) @ got_right.T)
        assert principal_angles(got_right, Vh[: r // 2].T).max() < 1e-6
        if m <= n:  # Q Q^T = I: span(left) holds U_G's top half
            assert principal_angles(last, U[:, : r // 2]).max() < 1e-6
        assert layer.compressed


def test_param_groups_carry_gamma_for_the_outer_factors_of_compressed_layers():
    model = tlr.adapt(
        toy(), tlr.DeepLoRAConfig(r=2, depth=3, gamma=0.05, target_modules=TARGETS, modules_to_save=["head"])
    )
    tlr.init_compressed(model, inputs(), loss_fn=lambda m, b: m(*b).sum())
    groups = {g["name"]: g for g in tlr.adapter_param_groups(model, lr=0.1, weight_decay=0.01)}
    assert groups["adapter_outer"]["lr"] == pytest.approx(0.005)
    assert groups["adapter"]["lr"] == 0.1 and groups["modules_to_save"]["lr"] == 0.1
    n_layers = len(TARGETS)
    assert (
        len(groups["adapter_outer"]["params"]) == 2 * n_layers
        and len(groups["adapter"]["params"]) == n_layers
    )
    assert all(g["weight_decay"] == 0.01 for g in groups.values())
    torch.optim.AdamW(list(groups.values()))  # accepted by torch optimizers


@pytest.mark.parametrize(
    "config",
    [CONFIGS[0], CONFIGS[2], tlr.LoRAConfig(r=2, init="pissa", target_modules=TARGETS)],
    ids=["lora", "deep", "pissa"],
)
def test_save_then_load_into_a_fresh_base_reproduces_the_outputs(tmp_path, config):
    model = tlr.adapt(toy(), copy.deepcopy(config))
    randomize(model)
    if config.modules_to_save:
        with torch.no_grad():
            model.head.weight.add_(1.0)
    x = inputs()
    y = model(*x)
    tlr.save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "torchlowrank_adapter.json").read_text())
    assert meta["targets"] == TARGETS
    fresh = tlr.load_adapter(toy(), tmp_path / "ad")
    torch.testing.assert_close(fresh(*x), y, rtol=0, atol=1e-12)
    again = tlr.adapt(toy(), copy.deepcopy(config))  # loading into an adapted model of the same kind
    tlr.load_adapter(again, tmp_path / "ad")
    torch.testing.assert_close(again(*x), y, rtol=0, atol=1e-12)


def test_corrupted_or_truncated_adapter_files_raise_and_leave_the_model_unchanged(tmp_path):
    model = tlr.adapt(toy(), CONFIGS[0])
    randomize(model)
    tlr.save_adapter(model, tmp_path / "ad")
    weights = tmp_path / "ad" / WEIGHTS_NAME
    blob = weights.read_bytes()
    for bad in (blob[: len(blob) // 2], blob[:-1] + bytes([blob[-1] ^ 1])):
        weights.write_bytes(bad)
        fresh = toy()
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(ValueError, match="corrupted"):
            tlr.load_adapter(fresh, tmp_path / "ad")
        assert getattr(fresh, "tlr_adapter", None) is None and not adapter_layers(fresh)
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())
    weights.write_bytes(blob)
    (tmp_path / "ad" / "torchlowrank_adapter.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        tlr.load_adapter(toy(), tmp_path / "ad")
    with pytest.raises(FileNotFoundError):
        tlr.load_adapter(toy(), tmp_path / "missing")


def test_loading_into_a_model_with_other_shapes_names_the_first_mismatching_key(tmp_path):
    model = tlr.adapt(toy(), CONFIGS[0])
    tlr.save_adapter(model, tmp_path / "ad")
    other = toy()
    other.fc2 = nn.Linear(16, 10 + 1, dtype=torch.float64)
    other.head = nn.Linear(11, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"fc2\.lora_factors\.1"):
        tlr.load_adapter(other, tmp_path / "ad")
    assert not adapter_layers(other)
    with pytest.raises(ValueError, match="DeepLoRAConfig"):
        tlr.load_adapter(tlr.adapt(toy(), CONFIGS[2]), tmp_path / "ad")


def test_bad_inputs_raise_value_errors_that_say_what_to_do():
    with pytest.raises(ValueError, match="fc1"):  # lists the candidates
        tlr.adapt(toy(), tlr.LoRAConfig(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="too large"):
        tlr.adapt(toy(), tlr.LoRAConfig(r=11, target_modules=["fc2"]))
    model = toy()
    with pytest.raises(ValueError):
        tlr.adapt(model, tlr.LoRAConfig(r=9, target_modules=TARGETS))  # too large for conv/fc2 ... (8 x 27)
    assert not adapter_layers(model) and all(p.requires_grad for p in model.parameters())  # untouched
    with pytest.raises(ValueError, match="even r"):
        tlr.DeepLoRAConfig(r=3, compress=True)
    with pytest.raises(ValueError, match="depth"):
        tlr.DeepLoRAConfig(depth=1)
    with pytest.raises(ValueError, match="init"):
        tlr.LoRAConfig(init="nope")
    with pytest.raises(ValueError, match="dropout"):
        tlr.LoRAConfig(dropout=1.5)
    with pytest.raises(ValueError, match="modules_to_save"):
        tlr.adapt(toy(), tlr.LoRAConfig(target_modules=TARGETS, modules_to_save=["nope"]))
    adapted = tlr.adapt(toy(), tlr.LoRAConfig(r=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match="merge"):
        tlr.adapt(adapted, tlr.LoRAConfig(r=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match="adapt"):
        tlr.merge(toy())
    with pytest.raises(ValueError, match="compress"):
        tlr.init_compressed(tlr.adapt(toy(), CONFIGS[2]), inputs(), loss_fn=lambda m, b: m(*b).sum())


def test_dropout_is_applied_only_in_training_mode():
    model = tlr.adapt(toy(), tlr.LoRAConfig(r=2, dropout=0.5, target_modules=["fc1", "fc2"]))
    randomize(model)
    x = inputs()
    model.eval()
    torch.testing.assert_close(model(*x), dense_reference_partial(model, x))
    model.train()
    assert not torch.allclose(model(*x), model(*x))


def dense_reference_partial(model, x):
    ids, img = x
    e = model.emb(ids).mean(1)
    c = model.conv(img).mean((2, 3))
    h = torch.tanh(F.linear(torch.cat([e, c], 1), model.fc1.dense_weight(), model.fc1.base_layer.bias))
    h = torch.tanh(model.c1d(h))
    return model.head(torch.tanh(F.linear(h, model.fc2.dense_weight(), model.fc2.base_layer.bias)))


def test_export_peft_on_every_layer_type_is_served_by_peft(tmp_path):
    peft = pytest.importorskip("peft")
    for config in (CONFIGS[0], CONFIGS[3], tlr.LoRAConfig(r=2, init="pissa", target_modules=TARGETS)):
        base = toy()
        model = tlr.adapt(copy.deepcopy(base), copy.deepcopy(config))
        randomize(model)
        x = inputs()
        y = model(*x)
        tlr.export_peft(model, tmp_path / "peft")
        served = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
        torch.testing.assert_close(served(*x), y, rtol=0, atol=1e-10)
