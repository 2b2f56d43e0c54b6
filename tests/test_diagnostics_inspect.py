"""Checkpoint inspection: loaders on real files, PEFT adapters as B @ A updates, checkpoint differences."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from torchlowrank.diagnostics import compare_weights, load_weights, weights_spectrum


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"enc.weight": torch.randn(12, 8, generator=g), "enc.bias": torch.randn(12, generator=g),
            "conv.weight": torch.randn(4, 3, 3, 3, generator=g), "steps": torch.tensor(7)}


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
    save_file({"base_model.model.layer.0.q.lora_A.weight": A, "base_model.model.layer.0.q.lora_B.weight": B},
              tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": use_rslora, "target_modules": ["q"]}))
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
