"""Adapters on the models people use (issue #8): the tiny GPT-2 (HF Conv1D, fused c_attn, wte tied
to lm_head), Llama and ViT fixtures, nn.MultiheadAttention, sparse / meta / half-precision models.
Each test states a property that broke before: merge keeps the function of a tied embedding, a
load refuses a different config, export_peft refuses what PEFT cannot represent, half-precision
Deep LoRA trains every factor, unsupported targets are named, a failed adapt changes nothing, PEFT
folders load both ways, and impossible config values are refused."""

from __future__ import annotations

import copy
import os
import stat

import pytest
import torch
from torch import nn

import hf_models
import torchlowrank as tlr
from torchlowrank.adapters import EmbeddingAdapter, adapter_layers, resize_token_embeddings, unadapt

pytestmark = pytest.mark.filterwarnings("ignore:.*(fan_in_fan_out|tie_word_embeddings|tied).*:UserWarning")


def randomize(model, std=0.1, seed=3):
    """Make every adapter factor non-zero, so an adapter that is ignored or lost shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for W in layer.lora_factors:
                W.copy_(torch.randn(W.shape, generator=g, dtype=torch.float64).to(W.dtype) * std)


def snapshot(model):
    """Everything a failed call must leave as it was: module types, tensors, requires_grad flags."""
    return (
        {n: type(m) for n, m in model.named_modules()},
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
    )


def assert_same(model, snap):
    types, tensors, flags = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert set(now) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(torch.nan_to_num(now[k], nan=7.0), torch.nan_to_num(v, nan=7.0)), k
    assert {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)} == flags
    assert not hasattr(model, "tlr_adapter")


HF_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "vit": ["q_proj", "v_proj", "fc1", "projection"],
}  # projection: the Conv2d patch embedding


# -- standing round trips on the three tiny HF models ------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "pissa", "deep"])
def test_merge_unadapt_save_load_and_peft_round_trip_on_tiny_hf_models(tiny_hf_model, tmp_path, kind):
    peft = pytest.importorskip("peft")
    name, base, x = tiny_hf_model
    targets = HF_TARGETS[name]
    config = {
        "lora": tlr.LoRAConfig(r=4, alpha=8, target_modules=targets),
        "pissa": tlr.LoRAConfig(r=4, alpha=8, init="pissa", target_modules=targets),
        "deep": tlr.DeepLoRAConfig(r=4, depth=3, compress=False, target_modules=targets),
    }[kind]
    model = tlr.adapt(copy.deepcopy(base), config)
    assert len(adapter_layers(model)) >= 6
    randomize(model, std=0.2)
    y0, y = hf_models.outputs(base, x), hf_models.outputs(model, x)
    assert (y - y0).abs().max() > 1e-2  # the adapter changes the function
    tlr.save_adapter(model, tmp_path / "ours")
    tlr.export_peft(model, tmp_path / "peft")
    fresh = tlr.load_adapter(hf_models.build(name), tmp_path / "ours")
    torch.testing.assert_close(hf_models.outputs(fresh, x), y, rtol=0, atol=0)  # save/load is exact
    served = peft.PeftModel.from_pretrained(hf_models.build(name), tmp_path / "peft").eval()
    torch.testing.assert_close(hf_models.outputs(served, x), y, rtol=0, atol=1e-5)
    back = tlr.load_adapter(hf_models.build(name), tmp_path / "peft")  # and back from the PEFT folder
    torch.testing.assert_close(hf_models.outputs(back, x), y, rtol=0, atol=1e-5)
    keys = set(base.state_dict())
    tlr.merge(fresh)
    assert set(fresh.state_dict()) == keys
    torch.testing.assert_close(hf_models.outputs(fresh, x), y, rtol=0, atol=1e-5)
    unadapt(model)  # removes the adapter without folding it in; PiSSA leaves the residual base
    if kind == "pissa":
        assert (hf_models.outputs(model, x) - y0).abs().max() > 1e-3
    else:
        torch.testing.assert_close(hf_models.outputs(model, x), y0, rtol=0, atol=0)


def test_merge_restores_the_frozen_flags_of_every_parameter_including_tied_aliases(tiny_gpt2):
    model = tiny_gpt2
    model.transformer.wpe.weight.requires_grad_(False)  # the user froze some parameters
    model.transformer.h[0].ln_1.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    with pytest.warns(UserWarning, match="shares its weight with lm_head.weight"):
        tlr.adapt(model, tlr.LoRAConfig(r=2, target_modules=["wte", "c_attn"]))
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_factors" not in n)
    with pytest.warns(UserWarning, match="untied"):
        tlr.merge(model)
    assert {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)} == before


# -- 2: tied embeddings ----------------------------------------------------------------------------------
def test_merge_of_a_tied_embedding_unties_it_with_a_warning_and_keeps_the_outputs(tiny_gpt2):
    base = tiny_gpt2
    x = hf_models.example_inputs("gpt2")
    w_orig = base.transformer.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match="tied weights"):
        model = tlr.adapt(copy.deepcopy(base), tlr.LoRAConfig(r=4, target_modules=["wte", "c_attn"]))
    randomize(model)
    y = hf_models.outputs(model, x)
    with pytest.warns(UserWarning, match="merge untied transformer.wte from lm_head.weight"):
        tlr.merge(model)
    torch.testing.assert_close(hf_models.outputs(model, x), y, rtol=0, atol=1e-5)
    assert model.lm_head.weight is not model.transformer.wte.weight
    torch.testing.assert_close(model.lm_head.weight, w_orig, rtol=0, atol=0)  # the head kept W0
    assert model.config.tie_word_embeddings is False  # so save_pretrained / from_pretrained keep them apart


def test_compressed_init_of_a_tied_embedding_uses_the_gradient_through_that_layer_only(tiny_gpt2):
    base = tiny_gpt2
    ids = hf_models.example_inputs("gpt2")["input_ids"]
    model = tlr.adapt(copy.deepcopy(base), tlr.DeepLoRAConfig(r=4, target_modules=["wte", "c_attn"]))
    G = tlr.init_compressed(model, {"input_ids": ids, "labels": ids})
    assert model.lm_head.weight is model.transformer.wte.base_layer.weight  # the tie is intact afterwards
    ref = copy.deepcopy(base)  # the adapter changes only wte's use of the weight: untie the head by hand
    ref.lm_head.weight = nn.Parameter(ref.lm_head.weight.detach().clone())
    ref(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(G["transformer.wte"], ref.transformer.wte.weight.grad.T, rtol=0, atol=1e-7)


def test_tie_weights_on_an_adapted_head_sets_the_base_layers_weight(tiny_gpt2):
    with pytest.warns(UserWarning, match="tied weights"):
        model = tlr.adapt(tiny_gpt2, tlr.LoRAConfig(r=2, target_modules=["lm_head"]))
    model.tie_weights()  # Hugging Face assigns lm_head.weight = wte.weight
    assert model.lm_head.base_layer.weight is model.transformer.wte.weight
    assert "weight" not in model.lm_head._parameters


def test_pissa_on_a_tied_embedding_is_refused_and_the_model_is_unchanged(tiny_gpt2):
    snap = snapshot(tiny_gpt2)
    with pytest.raises(ValueError, match=r"transformer\.wte.*pissa.*lm_head\.weight"):
        tlr.adapt(tiny_gpt2, tlr.LoRAConfig(r=4, init="pissa", target_modules=["c_attn", "wte"]))
    assert_same(tiny_gpt2, snap)


# -- 3: load_adapter compares the whole config ------------------------------------------------------------
@pytest.mark.parametrize(
    "saved, live",
    [
        (dict(r=4, alpha=16), dict(r=4, alpha=2)),
        (dict(r=4, init="pissa"), dict(r=4)),
        (dict(r=4, use_rslora=True, alpha=8), dict(r=4, alpha=8)),
    ],
    ids=["alpha16-vs-2", "pissa-vs-default", "rslora"],
)
def test_load_adapter_into_a_model_adapted_with_another_config_raises_and_changes_nothing(
    tiny_llama, tmp_path, saved, live
):
    x = hf_models.example_inputs("llama")
    src = tlr.adapt(copy.deepcopy(tiny_llama), tlr.LoRAConfig(target_modules=["q_proj", "v_proj"], **saved))
    randomize(src)
    tlr.save_adapter(src, tmp_path / "a")
    model = tlr.adapt(copy.deepcopy(tiny_llama), tlr.LoRAConfig(target_modules=["q_proj", "v_proj"], **live))
    snap = snapshot(model)[1]
    with pytest.raises(ValueError, match="differs from the file"):
        tlr.load_adapter(model, tmp_path / "a")
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    # a fresh base adopts the file's config and reproduces the saved model
    fresh = tlr.load_adapter(copy.deepcopy(tiny_llama), tmp_path / "a")
    torch.testing.assert_close(hf_models.outputs(fresh, x), hf_models.outputs(src, x), rtol=0, atol=1e-6)


def test_load_adapter_into_a_model_with_the_same_config_overwrites_its_factors(tiny_llama, tmp_path):
    cfg = tlr.DeepLoRAConfig(r=4, depth=3, compress=False, target_modules=["q_proj"])
    src = tlr.adapt(copy.deepcopy(tiny_llama), copy.deepcopy(cfg))
    randomize(src)
    tlr.save_adapter(src, tmp_path / "a")
    model = tlr.adapt(copy.deepcopy(tiny_llama), copy.deepcopy(cfg))
    x = hf_models.example_inputs("llama")
    tlr.load_adapter(model, tmp_path / "a")
    torch.testing.assert_close(hf_models.outputs(model, x), hf_models.outputs(src, x), rtol=0, atol=0)
    other = tlr.adapt(
        copy.deepcopy(tiny_llama),
        tlr.DeepLoRAConfig(r=4, depth=3, compress=False, init_scale=1e-2, target_modules=["q_proj"]),
    )
    with pytest.raises(ValueError, match="init_scale"):
        tlr.load_adapter(other, tmp_path / "a")


# -- 5: export_peft refuses Conv2d options PEFT cannot represent --------------------------------------------
class ConvNet(nn.Module):
    def __init__(self, **conv):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, **conv)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(
    "conv, ok",
    [
        (dict(padding=1), True),
        (dict(stride=2, padding=2), True),
        (dict(padding="same"), True),
        (dict(padding=1, padding_mode="reflect"), False),
        (dict(padding=1, padding_mode="circular"), False),
        (dict(dilation=2), False),
    ],
    ids=["pad", "stride", "same", "reflect", "circular", "dilation"],
)
def test_export_peft_of_conv2d_loads_in_peft_with_equal_outputs_or_is_refused(tmp_path, conv, ok):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = ConvNet(**conv)
    model = tlr.adapt(copy.deepcopy(base), tlr.LoRAConfig(r=2, target_modules=["conv"]))
    randomize(model)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(y, tlr.merge(copy.deepcopy(model))(x), rtol=0, atol=1e-5)  # ours is right
    if not ok:
        with pytest.raises(ValueError, match="PEFT's LoRA Conv2d"):
            tlr.export_peft(model, tmp_path / "peft")
        assert not (tmp_path / "peft").exists()
        return
    tlr.export_peft(model, tmp_path / "peft")
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(served(x), y, rtol=0, atol=1e-5)


# -- 6: half precision -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "config",
    [
        tlr.DeepLoRAConfig(r=4, depth=3, compress=False, target_modules="all-linear"),
        tlr.DeepLoRAConfig(r=4, depth=4, compress=False, target_modules="all-linear"),
        tlr.DeepLoRAConfig(r=4, depth=3, compress=True, target_modules="all-linear"),
        tlr.LoRAConfig(r=4, target_modules="all-linear"),
    ],
    ids=["deep3", "deep4", "deep3-compressed", "lora"],
)
def test_adapters_on_a_half_precision_llama_give_every_factor_a_gradient(tiny_llama, dtype, config):
    model = tlr.adapt(tiny_llama.to(dtype), copy.deepcopy(config))
    ids = hf_models.example_inputs("llama")["input_ids"]
    if isinstance(config, tlr.LoRAConfig):
        randomize(model, std=1e-3)  # B = 0 at init gives A no gradient by design; make B small instead
    elif config.compress:
        tlr.init_compressed(model, {"input_ids": ids, "labels": ids})
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == dtype  # the model still computes in half precision
    out.loss.backward()
    factors = [W for _, layer in adapter_layers(model) for W in layer.lora_factors]
    assert len(factors) == 14 * config.depth
    assert all(W.dtype == torch.float32 for W in factors)  # PEFT's autocast_adapter_dtype
    assert sum(bool(W.grad is not None and W.grad.abs().sum() > 0) for W in factors) == len(factors)


def test_autocast_adapter_dtype_false_keeps_the_base_dtype(tiny_llama):
    model = tlr.adapt(
        tiny_llama.half(), tlr.LoRAConfig(r=2, target_modules=["q_proj"], autocast_adapter_dtype=False)
    )
    assert all(W.dtype == torch.float16 for _, layer in adapter_layers(model) for W in layer.lora_factors)


# -- 8: unsupported targets are named, not dropped -------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 8)
        self.gconv = nn.Conv2d(4, 4, 1, groups=2)

    def forward(self, x):
        return self.out(self.norm(self.attn(x)))


def test_targets_naming_unsupported_layers_raise_naming_each_and_why():
    model = Block()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"attn \(Sequential.*norm \(LayerNorm is not a supported") as e:
        tlr.adapt(model, tlr.LoRAConfig(r=2, target_modules=["attn", "norm", "out"]))
    assert "attn.0" in str(e.value)  # suggests the supported layer inside the container
    with pytest.raises(ValueError, match=r"gconv \(grouped convolutions \(groups=2\)"):
        tlr.adapt(model, tlr.LoRAConfig(r=1, target_modules=["gconv"]))
    with pytest.raises(ValueError, match=r"norm \(LayerNorm"):  # was "matched nothing"
        tlr.adapt(model, tlr.LoRAConfig(r=2, target_modules=["norm"]))
    assert_same(model, snap)
    tlr.adapt(model, tlr.LoRAConfig(r=2, target_modules=["attn.0", "out"], exclude_modules=None))
    assert [n for n, _ in adapter_layers(model)] == ["attn.0", "out"]


def test_a_gpt2_container_as_target_is_refused_with_the_layers_to_name_instead(tiny_gpt2):
    with pytest.raises(
        ValueError, match=r"transformer\.h\.0\.attn \(GPT2Attention.*transformer\.h\.0\.attn\.c_attn"
    ):
        tlr.adapt(tiny_gpt2, tlr.LoRAConfig(r=2, target_modules=["attn"]))
    with pytest.raises(ValueError, match="matched nothing"):
        tlr.adapt(tiny_gpt2, tlr.LoRAConfig(r=2, target_modules=["no_such_layer"]))


# -- 10: weight / bias of the base layer ----------------------------------------------------------------
class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.att(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("train", [True, False])
def test_multihead_attention_with_an_adapted_out_proj_uses_the_adapter_and_merges(train, tmp_path):
    torch.manual_seed(0)
    base = MHANet()
    model = tlr.adapt(copy.deepcopy(base), tlr.LoRAConfig(r=2, target_modules=["out_proj"]))
    model.train(train)
    randomize(model)
    x = torch.randn(2, 5, 8)
    y = model(x)
    layer = model.att.out_proj
    # MHA reads out_proj.weight / .bias itself: the reference applies W0 + Delta W by hand
    att = base.att
    q, k, v = (x @ att.in_proj_weight.T + att.in_proj_bias).chunk(3, -1)

    def heads(t):
        return t.reshape(2, 5, 2, 4).transpose(1, 2)

    o = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 2.0, -1) @ heads(v)
    o = o.transpose(1, 2).reshape(2, 5, 8)
    ref = o @ (att.out_proj.weight + 1.0 * layer.lora_B @ layer.lora_A).T + att.out_proj.bias
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)
    y.sum().backward()
    assert all(W.grad is not None and W.grad.abs().sum() > 0 for W in layer.lora_factors)
    assert layer.bias is layer.base_layer.bias
    with pytest.raises(ValueError, match="MultiheadAttention"):  # PEFT would silently ignore this adapter
        tlr.export_peft(model, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(tlr.merge(model)(x), y.detach(), rtol=0, atol=1e-5)


def test_adapters_expose_the_base_weight_and_bias(tiny_gpt2):
    model = tlr.adapt(tiny_gpt2, tlr.LoRAConfig(r=2, target_modules=["c_attn", "wte"]))
    wte, c_attn = model.transformer.wte, model.transformer.h[0].attn.c_attn
    assert wte.weight is wte.base_layer.weight and wte.bias is None
    assert c_attn.weight is c_attn.base_layer.weight and c_attn.bias is c_attn.base_layer.bias


def test_resize_token_embeddings_keeps_the_adapter_on_tied_and_untied_models(tiny_gpt2, tiny_llama):
    for name, base, targets, vocab in [
        ("gpt2", tiny_gpt2, ["wte", "c_attn"], 211),
        ("llama", tiny_llama, ["embed_tokens", "lm_head", "q_proj"], 197),
    ]:
        model = tlr.adapt(copy.deepcopy(base), tlr.LoRAConfig(r=2, target_modules=targets))
        randomize(model)
        x = hf_models.example_inputs(name)
        y = hf_models.outputs(model, x)
        with pytest.raises(TypeError):  # Hugging Face's own method refuses wrappers (as for PEFT's)
            model.resize_token_embeddings(vocab + 9)
        emb = resize_token_embeddings(model, vocab + 9)
        assert isinstance(emb, EmbeddingAdapter) and emb.weight.shape[0] == vocab + 9
        y2 = hf_models.outputs(model, x)
        assert y2.shape[-1] == vocab + 9
        torch.testing.assert_close(y2[..., :vocab], y, rtol=0, atol=1e-6)  # old tokens: same function
        if name == "gpt2":
            assert model.lm_head.weight is model.transformer.wte.base_layer.weight  # still tied
        tlr.merge(model)
        torch.testing.assert_close(hf_models.outputs(model, x)[..., :vocab], y, rtol=0, atol=1e-5)


def test_an_adapted_layer_replaced_behind_the_librarys_back_is_reported(tiny_llama, tmp_path):
    model = tlr.adapt(tiny_llama, tlr.LoRAConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    model.set_input_embeddings(nn.Embedding(197, 32))
    with pytest.raises(ValueError, match="embed_tokens were replaced"):
        tlr.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="replaced"):
        tlr.merge(model)


# -- 11: a failed adapt changes nothing -------------------------------------------------------------------
def test_a_failed_pissa_adapt_names_the_layer_and_leaves_the_model_unchanged(tiny_llama):
    model = tiny_llama
    model.model.embed_tokens.weight.requires_grad_(False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*NaN"):
        tlr.adapt(model, tlr.LoRAConfig(r=4, init="pissa", target_modules="all-linear"))
    assert_same(model, snap)  # the earlier layers' weights were not replaced by residuals
    with pytest.raises(ValueError, match=r"r=40 is too large for model\.layers\.0\.self_attn\.q_proj"):
        tlr.adapt(model, tlr.LoRAConfig(r=40, target_modules="all-linear"))
    assert_same(model, snap)
    tlr.adapt(
        model, tlr.LoRAConfig(r=4, target_modules="all-linear", exclude_modules=["down_proj"])
    )  # still adaptable


# -- 12: sparse embeddings, meta models, init_compressed -------------------------------------------------
def test_an_adapter_on_a_sparse_embedding_trains_like_on_a_dense_one():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Embedding(30, 6), nn.Linear(6, 2))
    sparse = copy.deepcopy(dense)
    sparse[0].sparse = True
    ids = torch.randint(0, 30, (4, 5))
    grads = []
    for base in (dense, sparse):
        model = tlr.adapt(base, tlr.LoRAConfig(r=3, target_modules=["0"]))
        randomize(model)
        model(ids).square().sum().backward()
        grads.append([W.grad.clone() for W in model[0].lora_factors])
    for a, b in zip(*grads):
        assert not b.is_sparse
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_meta_model_adapts_and_pissa_on_meta_asks_for_real_weights(tiny_llama, tmp_path):
    model = tiny_llama.to("meta")
    with pytest.raises(ValueError, match="meta device"):
        tlr.adapt(model, tlr.LoRAConfig(r=2, init="pissa", target_modules=["q_proj"]))
    assert not hasattr(model, "tlr_adapter")
    for config in (
        tlr.LoRAConfig(r=2, target_modules=["q_proj", "embed_tokens"]),
        tlr.DeepLoRAConfig(r=2, depth=3, target_modules=["q_proj"]),
    ):
        m = tlr.adapt(copy.deepcopy(model), config)
        factors = [W for _, layer in adapter_layers(m) for W in layer.lora_factors]
        assert factors and all(W.is_meta and W.requires_grad for W in factors)
        assert m.model.layers[0].self_attn.q_proj.lora_A.shape == (2, 32)
        with pytest.raises(ValueError, match="meta device"):  # no silent save of tensors without values
            tlr.save_adapter(m, tmp_path / "a")
        with pytest.raises(ValueError, match="meta device"):
            tlr.export_peft(m, tmp_path / "p")
    src = tlr.adapt(hf_models.tiny_llama(), tlr.LoRAConfig(r=2, target_modules=["q_proj"]))
    tlr.save_adapter(src, tmp_path / "real")
    with pytest.raises(ValueError, match="meta device"):  # copying into meta tensors would do nothing
        tlr.load_adapter(copy.deepcopy(model), tmp_path / "real")


def test_init_compressed_with_a_loss_without_a_graph_raises_a_clear_value_error(tiny_llama):
    model = tlr.adapt(tiny_llama, tlr.DeepLoRAConfig(r=2, depth=3, target_modules=["q_proj"]))
    ids = hf_models.example_inputs("llama")["input_ids"]
    with pytest.raises(ValueError, match="no autograd graph"):
        tlr.init_compressed(model, ids, loss_fn=lambda m, b: m(input_ids=b, labels=b).loss.detach())
    with pytest.raises(ValueError, match="no autograd graph"):
        tlr.init_compressed(model, ids, loss_fn=lambda m, b: torch.tensor(1.0))
    with (
        torch.no_grad()
    ):  # a caller's no_grad does not break the init: the loss is computed with grad enabled
        grads = tlr.init_compressed(model, ids, loss_fn=lambda m, b: m(input_ids=b, labels=b).loss)
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert all(layer.compressed for _, layer in adapter_layers(model))


# -- 14: file modes (atomic writes must not leave 0600 files) --------------------------------------------
def test_adapter_and_peft_files_get_the_usual_mode_under_umask_022(tmp_path):
    torch.manual_seed(0)
    model = tlr.adapt(
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), tlr.LoRAConfig(r=2, target_modules=["0"])
    )
    old = os.umask(0o022)
    try:
        tlr.save_adapter(model, tmp_path / "ours")
        tlr.export_peft(model, tmp_path / "peft")
    finally:
        os.umask(old)
    files = sorted((tmp_path / "ours").iterdir()) + sorted((tmp_path / "peft").iterdir())
    assert len(files) == 4
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o644" for f in files}


# -- 15: PEFT folders load both ways ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, peft_kwargs",
    [
        (
            "vit",
            dict(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj", "projection"],
                modules_to_save=["classifier"],
            ),
        ),
        ("gpt2", dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_fc", "wte"])),
        ("llama", dict(r=2, lora_alpha=4, target_modules="all-linear")),
        (
            "llama",
            dict(
                r=2,
                lora_alpha=4,
                target_modules="all-linear",
                rank_pattern={"q_proj": 3, r"layers\.0\.mlp\.down_proj": 1},
                alpha_pattern={"v_proj": 8},
            ),
        ),
    ],
    ids=[
        "vit-conv-saved-head",
        "gpt2-conv1d-embedding-rslora",
        "llama-all-linear",
        "llama-rank-alpha-patterns",
    ],
)
def test_load_adapter_reads_a_folder_written_by_peft_and_matches_peft(tmp_path, name, peft_kwargs):
    peft = pytest.importorskip("peft")
    base = hf_models.build(name)
    x = hf_models.example_inputs(name)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**peft_kwargs))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if "modules_to_save" in peft_kwargs:
            pm.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    y = hf_models.outputs(pm, x)
    ours = tlr.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(hf_models.outputs(ours, x), y, rtol=0, atol=1e-5)
    assert (y - hf_models.outputs(base, x)).abs().max() > 1e-2
    assert ours.tlr_adapter.config.use_rslora == peft_kwargs.get("use_rslora", False)
    if "rank_pattern" in peft_kwargs:  # per-layer ranks and alphas as peft made them
        ranks = {n: layer.r for n, layer in tlr.adapters.adapter_layers(ours)}
        assert {k for n, k in ranks.items() if n.endswith("q_proj")} == {3}
        assert ranks["model.layers.0.mlp.down_proj"] == 1 and ranks["model.layers.1.mlp.down_proj"] == 2
    tlr.save_adapter(ours, tmp_path / "ours")  # ... and on to our own format
    again = tlr.load_adapter(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(hf_models.outputs(again, x), hf_models.outputs(ours, x), rtol=0, atol=0)


def test_rank_and_alpha_patterns_follow_peft_first_match_at_a_name_component():
    cfg = tlr.LoRAConfig(
        r=4, lora_alpha=8, rank_pattern={r"layer\.1\.query": 8, "query": 2}, alpha_pattern={"key": 2}
    )
    assert cfg.rank_of("encoder.layer.0.attention.query") == 2
    assert cfg.rank_of("encoder.layer.1.query") == 8  # the first matching key wins
    assert cfg.rank_of("encoder.layer.0.myquery") == 4  # matches whole dotted components only
    assert cfg.scaling_of("encoder.layer.0.query") == 8 / 2  # alpha over the layer's own rank
    assert cfg.scaling_of("encoder.layer.0.key") == 2 / 4
    assert tlr.adapters.config_from_dict(cfg.to_dict()) == cfg


def test_a_lora_with_rank_and_alpha_patterns_exports_to_peft_and_loads_back_with_the_same_outputs(tmp_path):
    pytest.importorskip("peft")
    base = hf_models.build("llama").double().eval()
    x = hf_models.example_inputs("llama")
    cfg = tlr.LoRAConfig(
        r=2, alpha=4, rank_pattern={"q_proj": 3}, alpha_pattern={"v_proj": 8}, target_modules="all-linear"
    )
    model = tlr.adapt(copy.deepcopy(base), cfg)
    hf_models.perturb_trainable(model)
    model.eval()
    assert model.model.layers[0].self_attn.q_proj.r == 3 and model.model.layers[0].self_attn.k_proj.r == 2
    y = hf_models.outputs(model, x)
    tlr.export_peft(model, tmp_path / "peft")
    torch.testing.assert_close(
        hf_models.outputs(hf_models.served_by_peft(base, tmp_path / "peft"), x), y, rtol=0, atol=1e-12
    )
    back = tlr.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(hf_models.outputs(back, x), y, rtol=0, atol=1e-12)


def test_peft_folders_with_what_a_plain_lora_cannot_represent_are_refused(tiny_llama, tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(
        copy.deepcopy(tiny_llama), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    )
    pm.save_pretrained(tmp_path / "dora")
    snap = snapshot(tiny_llama)
    with pytest.raises(ValueError, match="DoRA"):
        tlr.load_adapter(tiny_llama, tmp_path / "dora")
    assert_same(tiny_llama, snap)


# -- 17: values that cannot be right ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: tlr.LoRAConfig(alpha=0), "alpha must be a positive number"),
        (lambda: tlr.LoRAConfig(alpha=-4), "alpha must be a positive number"),
        (lambda: tlr.LoRAConfig(lora_alpha=float("nan")), "alpha"),
        (lambda: tlr.LoRAConfig(r=0), "positive int"),
        (lambda: tlr.LoRAConfig(r=-2), "positive int"),
        (lambda: tlr.LoRAConfig(r=2.0), "positive int"),
        (lambda: tlr.LoRAConfig(dropout=1.0), r"\[0, 1\)"),
        (lambda: tlr.LoRAConfig(dropout=-0.1), r"\[0, 1\)"),
        (lambda: tlr.LoRAConfig(use_rslora="yes"), "True or False"),
        (lambda: tlr.LoRAConfig(init="svd"), "init must be one of"),
        (lambda: tlr.LoRAConfig(rank_pattern={"q_proj": 0}), "positive int"),
        (lambda: tlr.LoRAConfig(alpha_pattern={"q_proj": -1.0}), "positive number"),
        (lambda: tlr.LoRAConfig(rank_pattern={"(": 2}), "not a regular expression"),
        (lambda: tlr.LoRAConfig(rank_pattern=["q_proj"]), "must be a dict"),
        (lambda: tlr.DeepLoRAConfig(compress="yes"), "compress must be True or False"),
        (lambda: tlr.DeepLoRAConfig(compress=1), "compress must be True or False"),
        (lambda: tlr.DeepLoRAConfig(r=0), "positive int"),
        (lambda: tlr.DeepLoRAConfig(depth=1), "depth must be an int >= 2"),
        (lambda: tlr.DeepLoRAConfig(init_scale=0.0), "init_scale must be a positive number"),
        (lambda: tlr.DeepLoRAConfig(init_scale=-1e-3), "init_scale must be a positive number"),
        (lambda: tlr.DeepLoRAConfig(init_scale=True), "init_scale must be a positive number"),
        (lambda: tlr.DeepLoRAConfig(gamma=-0.1), r"gamma must be in \[0, 1\]"),
        (lambda: tlr.DeepLoRAConfig(gamma=float("nan")), r"gamma must be in \[0, 1\]"),
        (lambda: tlr.DeepLoRAConfig(autocast_adapter_dtype=None), "True or False"),
    ],
)
def test_config_values_that_cannot_be_right_raise_value_errors_that_say_what_to_do(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_peft_folder_on_a_conv_peft_computes_differently_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = ConvNet(padding=1, padding_mode="reflect")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["conv"]))
    pm.save_pretrained(tmp_path / "peft")
    snap = snapshot(base)
    with pytest.raises(ValueError, match="reflect"):
        tlr.load_adapter(base, tmp_path / "peft")
    assert_same(base, snap)


def test_default_embedding_init_follows_peft_first_factor_zero_last_gaussian(tiny_gpt2):
    with pytest.warns(UserWarning, match="tied"):
        model = tlr.adapt(tiny_gpt2, tlr.LoRAConfig(r=4, target_modules=["wte"]))
    wte = model.transformer.wte
    assert torch.count_nonzero(wte.lora_A) == 0 and torch.count_nonzero(wte.lora_B) == wte.lora_B.numel()
