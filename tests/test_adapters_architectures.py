"""Adapters on architectures beyond GPT-2 / Llama / ViT (tests/hf_models.py): PEFT export of
classifier heads whose names PEFT confuses (DistilBERT), and adapter files that record the model they
were made for (ResNet, Mistral / Qwen2)."""

from __future__ import annotations

import copy
import os
import re
import warnings

import pytest
import torch
from torch import nn

import hf_models
import torchlowrank as tlr
from torchlowrank.adapters import adapter_layers

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


randomize = hf_models.perturb_trainable


def served_by_peft(base, folder):
    pytest.importorskip("peft")
    return hf_models.served_by_peft(base, folder)


# -- 4: modules_to_save that PEFT would confuse with an adapted layer -------------------------------------
class PreHeadNet(nn.Module):
    """A user's classifier with ``pre_head`` (adapted) and ``head`` (saved): PEFT's suffix match of
    ``head`` also picks ``pre_head``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.pre_head = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.pre_head(torch.relu(self.body(x)))))


@pytest.mark.parametrize("arch", ["distilbert", "preheadnet"])
def test_export_peft_refuses_a_saved_module_whose_name_peft_matches_to_an_adapted_layer(tmp_path, arch):
    base = hf_models.build("distilbert") if arch == "distilbert" else PreHeadNet()
    saved, clash = ("classifier", "pre_classifier") if arch == "distilbert" else ("head", "pre_head")
    model = tlr.adapt(
        copy.deepcopy(base), tlr.LoRAConfig(r=4, target_modules="all-linear", modules_to_save=[saved])
    )
    assert clash in model.tlr_adapter.targets
    with pytest.raises(
        ValueError,
        match=rf"'{saved}' also picks '{clash}', which carries a LoRA adapter.*"
        + re.escape(f"modules_to_save={sorted([saved, clash])}"),
    ):
        tlr.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()  # nothing written


@pytest.mark.parametrize(
    "targets, saved",
    [
        ("all-linear", ["pre_classifier", "classifier"]),  # the fix the error suggests
        (
            ["q_lin", "v_lin"],
            ["classifier"],
        ),  # pre_classifier is picked by PEFT too, but not adapted: harmless
    ],
)
def test_a_distilbert_classifier_exported_to_peft_loads_there_with_equal_outputs(tmp_path, targets, saved):
    base = hf_models.build("distilbert")
    x = hf_models.example_inputs("distilbert")
    model = tlr.adapt(copy.deepcopy(base), tlr.LoRAConfig(r=4, target_modules=targets, modules_to_save=saved))
    randomize(model)
    y = hf_models.outputs(model, x)
    tlr.export_peft(model, tmp_path / "peft")
    served = served_by_peft(base, tmp_path / "peft")
    torch.testing.assert_close(hf_models.outputs(served, x), y, rtol=0, atol=1e-5)
    again = tlr.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(hf_models.outputs(again, x), y, rtol=0, atol=1e-5)


# -- 6: an adapter file records the model it was made for ---------------------------------------------------
@pytest.mark.parametrize(
    "made_for, loaded_into, difference",
    [
        (
            lambda: hf_models.tiny_resnet(depths=(1, 1)),
            lambda: hf_models.tiny_resnet(depths=(2, 1)),
            r"config depths: \[1, 1\] vs \[2, 1\]",
        ),  # resnet18 -> resnet34
        (hf_models.tiny_mistral, hf_models.tiny_qwen2, r"class \S+MistralForCausalLM vs \S+Qwen2ForCausalLM"),
    ],
)
def test_an_adapter_loaded_into_another_architecture_with_matching_names_and_shapes_warns(
    tmp_path, made_for, loaded_into, difference
):
    base = made_for()
    targets = r".*convolution" if "ResNet" in type(base).__name__ else ["q_proj", "v_proj", "down_proj"]
    model = tlr.adapt(base, tlr.LoRAConfig(r=2, target_modules=targets))
    randomize(model)
    tlr.save_adapter(model, tmp_path / "adapter")
    other = loaded_into()
    with pytest.warns(
        tlr.adapters.AdapterBaseMismatchWarning, match=rf"saved from another model .*{difference}"
    ):
        tlr.load_adapter(other, tmp_path / "adapter")
    assert len(adapter_layers(other)) == len(adapter_layers(model))  # it loads: only a warning


@pytest.mark.parametrize(
    "name, config",
    [
        ("gpt2", tlr.LoRAConfig(r=2, target_modules=["wte", "c_attn"])),
        ("llama", tlr.LoRAConfig(r=2, init="pissa", target_modules=["q_proj", "o_proj"])),
        (
            "t5",
            tlr.DeepLoRAConfig(r=2, compress=False, target_modules=["q", "v"], modules_to_save=["lm_head"]),
        ),
        ("resnet", tlr.LoRAConfig(r=2, target_modules=r".*convolution", modules_to_save=["classifier"])),
    ],
)
def test_an_adapter_loaded_into_its_own_base_model_does_not_warn(tmp_path, name, config):
    base = hf_models.build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied weights
        model = tlr.adapt(copy.deepcopy(base), config)
    randomize(model)
    tlr.save_adapter(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error", tlr.adapters.AdapterBaseMismatchWarning)
        tlr.load_adapter(copy.deepcopy(base), tmp_path / "adapter")  # a fresh base model
        tlr.load_adapter(model, tmp_path / "adapter")  # the adapted model itself
