"""Adapters on BatchNorm CNNs (tests/hf_models.py: a ResNet with residual blocks and MobileNetV2 with
depthwise convolutions): the running statistics that training in train mode changes are either saved
with the adapter or reported, and the compressed init leaves them alone."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import hf_models
import torchlowrank as tlr
from torchlowrank.adapters import adapter_layers
from torchlowrank.adapters.io import NormBuffersNotSavedWarning

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# LoRA on the groups=1 convolutions (MobileNetV2's depthwise 3x3 convolutions cannot carry one)
TARGETS = {"resnet": r".*convolution", "mobilenet": r".*(first_conv|expand_1x1|reduce_1x1)\.convolution"}


def buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def batch(name, seed=3):
    x = hf_models.example_inputs(name, batch=8, seed=seed)
    x["labels"] = torch.arange(8) % 5
    return x


def train_steps(model, name, steps=3):
    """A few LoRA steps in train mode: BatchNorm's running statistics move."""
    model.train()
    opt = torch.optim.SGD(tlr.adapter_param_groups(model, lr=0.1), lr=0.1)
    for i in range(steps):
        opt.zero_grad()
        model(**batch(name, seed=10 + i)).loss.backward()
        opt.step()
    return model.eval()


def trained(name, **config):
    base = hf_models.build(name)
    model = tlr.adapt(copy.deepcopy(base), tlr.LoRAConfig(r=2, target_modules=TARGETS[name], **config))
    return base, train_steps(model, name)


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_save_buffers_writes_the_running_statistics_and_a_fresh_base_reproduces_the_outputs(tmp_path, name):
    base, model = trained(name)
    x = hf_models.example_inputs(name)
    y = hf_models.outputs(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormBuffersNotSavedWarning)
        tlr.save_adapter(model, tmp_path / "adapter", save_buffers=True)
    fresh = tlr.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(hf_models.outputs(fresh, x), y, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_saving_an_adapter_without_the_changed_running_statistics_warns_how_to_keep_them(tmp_path, name):
    base, model = trained(name)
    x = hf_models.example_inputs(name)
    y = hf_models.outputs(model, x)
    with pytest.warns(
        NormBuffersNotSavedWarning,
        match=r"normalisation layer.*changed since tlr.adapt.*"
        r"save_buffers=True.*modules_to_save",
    ):
        tlr.save_adapter(model, tmp_path / "adapter")
    with pytest.warns(NormBuffersNotSavedWarning, match=r"export_peft.*modules_to_save"):
        tlr.export_peft(model, tmp_path / "peft")
    # what the warning is about: the statistics are lost
    fresh = tlr.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert (hf_models.outputs(fresh, x) - y).abs().max() > 1e-2


def test_normalisation_layers_in_modules_to_save_keep_their_statistics_in_both_formats(tmp_path):
    pytest.importorskip("peft")
    norms = [n for n, m in hf_models.build("resnet").named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    base, model = trained("resnet", modules_to_save=norms)
    x = hf_models.example_inputs("resnet")
    y = hf_models.outputs(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormBuffersNotSavedWarning)
        tlr.save_adapter(model, tmp_path / "adapter")
        tlr.export_peft(model, tmp_path / "peft")
    torch.testing.assert_close(
        hf_models.outputs(tlr.load_adapter(copy.deepcopy(base), tmp_path / "adapter"), x),
        y,
        rtol=0,
        atol=1e-4,
    )
    served = hf_models.served_by_peft(base, tmp_path / "peft")
    torch.testing.assert_close(hf_models.outputs(served, x), y, rtol=0, atol=1e-4)


def test_a_model_trained_in_eval_mode_saves_without_a_warning(tmp_path):
    base = hf_models.build("resnet")
    model = tlr.adapt(copy.deepcopy(base), tlr.LoRAConfig(r=2, target_modules=TARGETS["resnet"]))
    F.cross_entropy(model(**hf_models.example_inputs("resnet")).logits, torch.tensor([0, 1])).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormBuffersNotSavedWarning)
        tlr.save_adapter(model, tmp_path / "adapter")


def test_loading_statistics_into_a_model_without_those_layers_raises_and_changes_nothing(tmp_path):
    _, model = trained("resnet")
    tlr.save_adapter(model, tmp_path / "adapter", save_buffers=True)
    other = hf_models.tiny_resnet(depths=(1,))  # one stage: no stages.1.* layers
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="first mismatching key"):
        tlr.load_adapter(other, tmp_path / "adapter")
    assert not adapter_layers(other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_init_compressed_in_train_mode_leaves_every_buffer_as_it_was(name):
    model = tlr.adapt(hf_models.build(name).train(), tlr.DeepLoRAConfig(r=2, target_modules=TARGETS[name]))
    before = buffers(model)
    grads = tlr.init_compressed(model, batch(name))
    assert all(g.abs().sum() > 0 for g in grads.values())  # the batch statistics were used (train mode)
    after = buffers(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
