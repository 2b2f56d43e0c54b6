"""Checkpoint inspection: loaders on real files, PEFT adapters as B @ A updates, checkpoint differences."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import torchlowrank as tlr
from conftest import randomize_trainable
from torchlowrank.diagnostics import compare_weights, load_weights, weights_spectrum


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.weight": torch.randn(12, 8, generator=g),
        "enc.bias": torch.randn(12, generator=g),
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "steps": torch.tensor(7),
    }


def test_safetensors_and_torch_checkpoints_load_the_same_tensors(tmp_path):
    sd = _state()
    save_file(sd, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.ckpt")
    torch.save({"model": sd, "optimizer": {"lr": 0.1}}, tmp_path / "model.pt")
    for name in ("w.safetensors", "plain.pt", "wrapped.ckpt", "model.pt"):
        got = load_weights(tmp_path / name)
        assert set(got) == set(sd), name
        assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_model_folder_is_read_through_its_weights_file(tmp_path):
    save_file(_state(), tmp_path / "model.safetensors")
    assert set(load_weights(tmp_path)) == set(_state())


def test_missing_and_corrupted_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_weights(tmp_path / "absent.safetensors")
    save_file(_state(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted"):
        load_weights(tmp_path / "cut.safetensors")
    torch.save(_state(), tmp_path / "w.pt")
    raw = bytearray((tmp_path / "w.pt").read_bytes())
    (tmp_path / "cut.pt").write_bytes(bytes(raw[: len(raw) // 3]))
    with pytest.raises(ValueError, match="corrupted"):
        load_weights(tmp_path / "cut.pt")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupted"):
        load_weights(tmp_path / "junk.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_weights(tmp_path / "empty")


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_folder_gives_scaled_b_times_a(tmp_path, use_rslora):
    g = torch.Generator().manual_seed(0)
    r, alpha = 4, 16
    A = torch.randn(r, 10, generator=g)
    B = torch.randn(6, r, generator=g)
    save_file(
        {"base_model.model.layer.0.q.lora_A.weight": A, "base_model.model.layer.0.q.lora_B.weight": B},
        tmp_path / "adapter_model.safetensors",
    )
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": alpha,
                "use_rslora": use_rslora,
                "target_modules": ["q"],
            }
        )
    )
    deltas = load_weights(tmp_path)
    scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert list(deltas) == ["layer.0.q"]
    assert torch.allclose(deltas["layer.0.q"], scaling * B @ A, atol=1e-5)
    (row,) = weights_spectrum(deltas)
    assert row.numerical_rank <= r and row.shape == (6, 10)


def test_peft_export_round_trip(tmp_path):
    peft = pytest.importorskip("peft")
    from torch import nn

    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["0", "2"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    model.save_pretrained(tmp_path)
    deltas = load_weights(tmp_path)
    for name in ("0", "2"):
        lin = model.base_model.model.get_submodule(name)
        expected = lin.get_delta_weight("default")
        assert torch.allclose(deltas[name], expected, atol=1e-5)


def test_compare_weights_reports_differences_and_mismatches(tmp_path):
    a = _state(0)
    b = {k: v.clone() for k, v in a.items()}
    u, v = torch.randn(12, 1), torch.randn(1, 8)
    b["enc.weight"] += u @ v  # a rank-one fine-tuning update
    b["conv.weight"] = torch.randn(5, 3, 3, 3)
    b["extra.weight"] = torch.randn(2, 2)
    save_file(a, tmp_path / "a.safetensors")
    torch.save(b, tmp_path / "b.pt")
    diff = compare_weights(tmp_path / "a.safetensors", tmp_path / "b.pt")
    assert list(diff) == ["enc.weight"]
    assert torch.allclose(diff["enc.weight"], u @ v, atol=1e-5)
    assert diff.shape_mismatches == {"conv.weight": ((4, 3, 3, 3), (5, 3, 3, 3))}
    assert diff.only_b == ["extra.weight"] and diff.only_a == []
    (row,) = weights_spectrum(diff)
    assert row.numerical_rank == 1 and row.stable_rank == pytest.approx(1.0, abs=1e-4)
    assert "shape mismatches" in diff.summary()


def test_weights_spectrum_skips_vectors_and_reshapes_kernels():
    table = weights_spectrum(_state())
    assert [r.name for r in table] == ["enc.weight", "conv.weight"]
    assert table[1].full_rank == 4


def _peft_model(model, **lora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    return peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))


def test_peft_embedding_adapters_are_read_as_their_delta_weight(tmp_path, tiny_gpt2):
    pm = _peft_model(tiny_gpt2, r=4, lora_alpha=8, target_modules=["wte", "c_attn"])
    pm.save_pretrained(tmp_path)
    deltas = load_weights(tmp_path)
    wte = pm.base_model.model.transformer.wte
    torch.testing.assert_close(deltas["transformer.wte"], wte.get_delta_weight("default").float())
    assert deltas["transformer.wte"].shape == (211, 32)  # like the embedding's weight
    c_attn = pm.base_model.model.transformer.h[0].attn.c_attn
    torch.testing.assert_close(
        deltas["transformer.h.0.attn.c_attn"], c_attn.get_delta_weight("default").T.float()
    )


def test_dora_adapters_need_the_base_weights_and_then_give_the_true_update(tmp_path, tiny_llama):
    from torchlowrank.diagnostics.inspect import load_peft_adapter

    base = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    pm = _peft_model(tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "magnitude" in n:
                p.mul_(1.3)  # a trained magnitude differs from ||W0 + BA||
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="DoRA.*base weights"):
        load_weights(tmp_path)
    deltas = load_peft_adapter(tmp_path, base=base)
    merged = pm.merge_and_unload().state_dict()
    key = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(
        deltas[key], merged[key + ".weight"] - base[key + ".weight"], atol=1e-5, rtol=1e-4
    )


def test_torchlowrank_adapter_folders_are_read_as_their_updates(tmp_path):
    from torch import nn

    import torchlowrank as tlr

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    tlr.adapt(model, tlr.LoRAConfig(r=2, alpha=6, target_modules=["0", "2"]))
    randomize_trainable(model)  # a non-zero adapter
    x = torch.randn(3, 8)
    tlr.save_adapter(model, tmp_path / "ad")
    deltas = load_weights(tmp_path / "ad")
    adapted = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tlr.merge(model)
    assert set(deltas) == {"0", "2"}
    torch.testing.assert_close(
        model[0].weight.detach(), before["0.base_layer.weight"] + deltas["0"], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=1e-4)


def test_geolora_adapter_folders_are_read_as_their_updates_at_the_trained_ranks(tmp_path):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    tlr.adapt(model, tlr.GeoLoRAConfig(r=3, lora_alpha=6, tau=0.3, target_modules=["0", "2"]))
    with torch.no_grad():  # a non-zero update, one layer at another rank than it started with
        model[0].lora_unit.S.copy_(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
        model[2].lora_unit.set_factors(
            model[2].lora_unit.U[:, :2],
            torch.tensor([0.7, -0.3], dtype=torch.float64),
            model[2].lora_unit.V[:, :2],
        )
    tlr.save_adapter(model, tmp_path / "geo")
    deltas = load_weights(tmp_path / "geo")
    assert set(deltas) == {"0", "2"}
    for name in ("0", "2"):
        torch.testing.assert_close(
            deltas[name].double(), model.get_submodule(name).delta_matrix().detach(), atol=1e-6, rtol=0
        )
    assert torch.linalg.matrix_rank(deltas["2"]) == 2
    # a LoRA adapter with per-layer ranks / alphas (rank_pattern) scales each layer by its own alpha / r
    lora = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    tlr.adapt(
        lora,
        tlr.LoRAConfig(
            r=2, alpha=4, rank_pattern={"2": 3}, alpha_pattern={"2": 1.5}, target_modules=["0", "2"]
        ),
    )
    randomize_trainable(lora)
    tlr.save_adapter(lora, tmp_path / "lora")
    deltas = load_weights(tmp_path / "lora")
    for name in ("0", "2"):
        torch.testing.assert_close(
            deltas[name], lora.get_submodule(name).delta_matrix().detach(), atol=1e-6, rtol=0
        )


def test_sharded_hugging_face_folders_load_every_shard(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    tensors = load_weights(tmp_path)
    ref = tiny_llama.state_dict()
    assert set(tensors) == {
        k for k in ref if k != "lm_head.weight" or not tiny_llama.config.tie_word_embeddings
    }
    for k, v in tensors.items():
        assert torch.equal(v, ref[k])
    (tmp_path / next(p.name for p in tmp_path.glob("model-0000*.safetensors"))).unlink()
    with pytest.raises(FileNotFoundError, match="shard"):
        load_weights(tmp_path)


def test_broken_peft_folders_give_the_same_clear_errors_to_inspect_and_to_load_adapter(tmp_path):
    from torch import nn

    def folder(name, config, weights):
        d = tmp_path / name
        d.mkdir()
        if config is not None:
            (d / "adapter_config.json").write_text(config)
        if weights is not None:
            (d / "adapter_model.safetensors").write_bytes(weights)
        return d

    save_file(
        {
            "base_model.model.0.lora_A.weight": torch.randn(2, 8),
            "base_model.model.0.lora_B.weight": torch.randn(3, 2),
        },
        tmp_path / "good.safetensors",
    )
    good = (tmp_path / "good.safetensors").read_bytes()
    config = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0"]})
    cases = [
        (folder("junk_config", "{not json", good), ValueError, "not a valid PEFT adapter config"),
        (folder("list_config", "[1, 2]", good), ValueError, "not a valid PEFT adapter config"),
        (folder("no_weights", config, None), FileNotFoundError, "no adapter_model.safetensors"),
        (folder("cut_weights", config, good[: len(good) // 2]), ValueError, "corrupted"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            load_weights(path)
        model = nn.Sequential(nn.Linear(8, 3))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(error, match=message):
            tlr.load_adapter(model, path)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
