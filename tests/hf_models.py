"""Tiny, randomly initialised Hugging Face models built offline from configs: shared test fixtures.

Each builder takes a seed and returns a fresh model in eval mode (a few ms to build, < 200k
parameters) with the structure users' models have:
- ``tiny_gpt2``: HF ``Conv1D`` everywhere (fused ``c_attn`` = q|k|v, ``c_proj``, ``c_fc``), ``lm_head``
  tied to ``wte``;
- ``tiny_llama``: separate ``q_proj/k_proj/v_proj/o_proj`` and ``gate_proj/up_proj/down_proj`` Linears,
  untied head;
- ``tiny_vit``: a ViT image classifier with a Conv2d patch embedding and ``query/key/value`` Linears.
``example_inputs(name, model)`` gives a small batch for each. conftest.py exposes them as fixtures
(``tiny_gpt2``, ``tiny_llama``, ``tiny_vit``, and ``tiny_hf_model`` parametrized over all three).
"""
from __future__ import annotations

import torch

HF_MODEL_NAMES = ("gpt2", "llama", "vit")


def _seeded(seed: int):
    # build under a local RNG state so fixtures never disturb the caller's global RNG
    return torch.random.fork_rng(devices=[])


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    with _seeded(seed):
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=211, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    with _seeded(seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=197, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                          tie_word_embeddings=False)
        return LlamaForCausalLM(cfg).eval()


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification
    with _seeded(seed):
        torch.manual_seed(seed)
        cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, num_labels=5,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return ViTForImageClassification(cfg).eval()


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "vit": tiny_vit}


def build(name: str, seed: int = 0):
    return BUILDERS[name](seed)


def example_inputs(name: str, model=None, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """A small input batch for the tiny model ``name`` (token ids, or images for ViT)."""
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    vocab = 211 if name == "gpt2" else 197
    return {"input_ids": torch.randint(0, vocab, (batch, 12), generator=g)}


def outputs(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output tensor (logits)."""
    with torch.no_grad():
        return model(**inputs).logits
