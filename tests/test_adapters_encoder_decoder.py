"""Adapters on models that tie one weight to several modules: encoder-decoders (T5, BART: ``shared``,
``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head`` hold one tensor; Whisper's
``proj_out`` is ``decoder.embed_tokens``) and decoders with a tied head (Qwen2), built offline from
configs (tests/hf_models.py)."""

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
    hf_models.perturb_trainable(model, std, seed)


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
@pytest.mark.parametrize(
    "name, targets",
    [
        ("bart", ["embed_tokens"]),
        ("bart", ["encoder.embed_tokens", "q_proj"]),
        ("t5", ["encoder.embed_tokens", "q"]),
        ("t5", ["embed_tokens"]),
        ("t5", ["shared", "q"]),  # shared is never called (see below), but merge must still save it right
        ("qwen2", ["embed_tokens", "q_proj"]),
        ("whisper", ["embed_tokens", "q_proj"]),
    ],
)
def test_a_merged_tied_embedding_saves_and_reloads_with_hugging_face_to_the_merged_outputs(
    tmp_path, name, targets
):
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


# -- 2: an adapter on a tied alias that the forward never calls --------------------------------------------
@pytest.mark.parametrize(
    "name, alias, called",
    [
        ("t5", "shared", "encoder.embed_tokens"),
        ("bart", "model.shared", "model.encoder.embed_tokens"),
    ],
)
def test_an_adapter_on_a_tied_alias_the_forward_never_calls_warns_naming_the_called_modules(
    name, alias, called
):
    base = hf_models.build(name)
    x = hf_models.example_inputs(name)
    model = adapt_quietly(copy.deepcopy(base), tlr.LoRAConfig(r=4, target_modules=[alias.rpartition(".")[2]]))
    randomize(model)
    with pytest.warns(
        tlr.adapters.AdapterNotCalledWarning,
        match=rf"{alias} carries an adapter but the forward .*"
        rf"never calls it .*{called}",
    ):
        y = hf_models.outputs(model, x)
    torch.testing.assert_close(y, hf_models.outputs(base, x), rtol=0, atol=0)  # the silent no-op it reports
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough: the watch is gone after the first forward
        hf_models.outputs(model, x)
    assert not model._forward_hooks and not model.get_submodule(alias)._forward_pre_hooks


def test_adapting_the_called_aliases_of_a_tied_embedding_does_not_warn_and_trains():
    model = adapt_quietly(hf_models.build("t5"), tlr.LoRAConfig(r=4, target_modules=["embed_tokens"]))
    x = hf_models.example_inputs("t5")
    with warnings.catch_warnings():
        warnings.simplefilter("error", tlr.adapters.AdapterNotCalledWarning)
        model(**x, labels=x["decoder_input_ids"]).loss.backward()
    assert all(layer.lora_B.grad is not None for _, layer in adapter_layers(model))


def test_a_decoding_step_without_the_encoder_does_not_count_as_the_first_forward():
    model = adapt_quietly(hf_models.build("t5"), tlr.LoRAConfig(r=4, target_modules=["encoder.embed_tokens"]))
    x = hf_models.example_inputs("t5")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", tlr.adapters.AdapterNotCalledWarning)
        enc = model.get_encoder()(input_ids=x["input_ids"])
        model(encoder_outputs=enc, decoder_input_ids=x["decoder_input_ids"])  # generate()'s decoding step
        model(**x)  # a full forward: encoder.embed_tokens is called
    assert not model._forward_hooks  # the watch ended once the encoder ran


def test_merge_and_unadapt_remove_the_watch_of_a_model_never_run():
    for undo in (tlr.merge, tlr.adapters.unadapt):
        model = adapt_quietly(hf_models.build("t5"), tlr.LoRAConfig(r=4, target_modules=["shared"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            undo(model)
        assert not model._forward_hooks
        assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name, targets", [("t5", ["q", "v", "wo"]), ("bart", ["q_proj", "v_proj", "fc2"])])
def test_an_encoder_decoder_adapter_round_trips_through_both_formats_and_peft(tmp_path, name, targets):
    pytest.importorskip("peft")
    base = hf_models.build(name)
    x = hf_models.example_inputs(name)
    model = tlr.adapt(copy.deepcopy(base), tlr.DeepLoRAConfig(r=2, compress=False, target_modules=targets))
    randomize(model, std=0.3)
    y = hf_models.outputs(model, x)
    assert (y - hf_models.outputs(base, x)).abs().max() > 1e-3
    tlr.save_adapter(model, tmp_path / "ours")
    tlr.export_peft(model, tmp_path / "peft")
    torch.testing.assert_close(
        hf_models.outputs(tlr.load_adapter(copy.deepcopy(base), tmp_path / "ours"), x), y, rtol=0, atol=1e-5
    )
    served = hf_models.served_by_peft(base, tmp_path / "peft")
    torch.testing.assert_close(hf_models.outputs(served, x), y, rtol=0, atol=1e-5)
