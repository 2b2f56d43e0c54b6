"""Adapters on models that tie one weight to several modules: encoder-decoders (T5, BART: ``shared``,
``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head`` hold one tensor) and decoders with
a tied head (Qwen2, GPT-2), built offline from configs (tests/hf_models.py)."""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import hf_models
import torchlowrank as tlr
from torchlowrank.adapters import adapter_layers

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def randomize(model, std=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for W in layer.lora_factors:
                W.copy_(torch.randn(W.shape, generator=g) * std)


def adapt_quietly(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied-weights warnings are tested elsewhere
        return tlr.adapt(model, config)


def tied_groups(model):
    """Lists of parameter names that are one tensor (tied aliases)."""
    by_id = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return [names for names in by_id.values() if len(names) > 1]


# -- 1: a merged tied embedding survives save_pretrained / from_pretrained ---------------------------------
@pytest.mark.parametrize("name, targets", [
    ("bart", ["embed_tokens"]),
    ("bart", ["encoder.embed_tokens", "q_proj"]),
    ("t5", ["encoder.embed_tokens", "q"]),
    ("t5", ["embed_tokens"]),
    ("t5", ["shared", "q"]),  # shared is never called (see below), but merge must still save it right
    ("qwen2", ["embed_tokens", "q_proj"]),
])
def test_a_merged_tied_embedding_saves_and_reloads_with_hugging_face_to_the_merged_outputs(tmp_path, name,
                                                                                           targets):
    base = hf_models.build(name)
    x = hf_models.example_inputs(name)
    model = adapt_quietly(copy.deepcopy(base), tlr.LoRAConfig(r=4, target_modules=targets))
    randomize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # T5's shared: "never called" (tested below)
        y = hf_models.outputs(model, x)
    assert (y - hf_models.outputs(base, x)).abs().max() > 1e-3  # the adapter does something
    with pytest.warns(UserWarning, match="merge untied"):
        tlr.merge(model)
    torch.testing.assert_close(hf_models.outputs(model, x), y, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    again = type(model).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(hf_models.outputs(again, x), y, rtol=0, atol=1e-5)
    # the module graph and the config agree: nothing is tied any more, and the config says so
    assert tied_groups(model) == []
    assert model.config.tie_word_embeddings is False


def test_merge_of_an_untied_model_leaves_its_config_and_parameters_alone():
    base = hf_models.build("mistral")
    model = tlr.adapt(copy.deepcopy(base), tlr.LoRAConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    randomize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to untie: no warning
        tlr.merge(model)
    assert model.config.tie_word_embeddings is False
    assert len(list(model.parameters())) == len(list(base.parameters()))
