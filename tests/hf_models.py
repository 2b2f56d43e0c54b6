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

More architectures (``build(name)``, not in the ``tiny_hf_model`` parametrization):
- encoder-decoders ``t5`` and ``bart``: one embedding weight shared by ``shared``,
  ``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head`` (``shared`` is never called by
  the forward); ``whisper`` (log-mel ``input_features``, ``proj_out`` tied to ``decoder.embed_tokens``);
- grouped-query attention decoders ``qwen2`` (tied head) and ``mistral`` (untied);
- ``distilbert``: a sequence classifier with ``pre_classifier`` and ``classifier`` Linears;
- BatchNorm CNNs ``resnet`` (residual blocks, BatchNorm2d) and ``mobilenet`` (MobileNetV2: depthwise
  convolutions, BatchNorm2d, inverted residuals), both image classifiers with 5 labels.
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
        cfg = GPT2Config(
            vocab_size=211,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    with _seeded(seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=197,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(cfg).eval()


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    with _seeded(seed):
        torch.manual_seed(seed)
        cfg = ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=5,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return ViTForImageClassification(cfg).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    with _seeded(seed):
        torch.manual_seed(seed)
        cfg = T5Config(
            vocab_size=101,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        return T5ForConditionalGeneration(cfg).eval()


def tiny_bart(seed: int = 0):
    from transformers import BartConfig, BartForConditionalGeneration

    with _seeded(seed):
        torch.manual_seed(seed)
        cfg = BartConfig(
            vocab_size=103,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=32,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        )
        return BartForConditionalGeneration(cfg).eval()


def tiny_whisper(seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    with _seeded(seed):
        torch.manual_seed(seed)
        cfg = WhisperConfig(
            vocab_size=103,
            num_mel_bins=8,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_source_positions=16,
            max_target_positions=16,
            dropout=0.0,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
            suppress_tokens=None,
            begin_suppress_tokens=None,
        )
        return WhisperForConditionalGeneration(cfg).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with _seeded(seed):
        torch.manual_seed(seed)
        cfg = Qwen2Config(
            vocab_size=197,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=True,
        )
        return Qwen2ForCausalLM(cfg).eval()


def tiny_mistral(seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    with _seeded(seed):
        torch.manual_seed(seed)
        cfg = MistralConfig(
            vocab_size=197,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=False,
        )
        return MistralForCausalLM(cfg).eval()


def tiny_distilbert(seed: int = 0):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    with _seeded(seed):
        torch.manual_seed(seed)
        cfg = DistilBertConfig(
            vocab_size=197,
            dim=32,
            hidden_dim=64,
            n_layers=2,
            n_heads=4,
            max_position_embeddings=32,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
            num_labels=3,
        )
        return DistilBertForSequenceClassification(cfg).eval()


def tiny_resnet(seed: int = 0, depths=(1, 1)):
    from transformers import ResNetConfig, ResNetForImageClassification

    with _seeded(seed):
        torch.manual_seed(seed)
        cfg = ResNetConfig(
            num_channels=3,
            embedding_size=8,
            hidden_sizes=[8, 16][: len(depths)],
            depths=list(depths),
            layer_type="basic",
            num_labels=5,
        )
        return ResNetForImageClassification(cfg).eval()


def tiny_mobilenet(seed: int = 0):
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    with _seeded(seed):
        torch.manual_seed(seed)
        cfg = MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.25, num_labels=5)
        return MobileNetV2ForImageClassification(cfg).eval()


BUILDERS = {
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "vit": tiny_vit,
    "t5": tiny_t5,
    "bart": tiny_bart,
    "whisper": tiny_whisper,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    "distilbert": tiny_distilbert,
    "resnet": tiny_resnet,
    "mobilenet": tiny_mobilenet,
}
VOCAB = {"gpt2": 211, "t5": 101, "bart": 103, "whisper": 103}
IMAGES = {"vit": 16, "resnet": 32, "mobilenet": 32}


def build(name: str, seed: int = 0):
    return BUILDERS[name](seed)


def example_inputs(name: str, model=None, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """A small input batch for the tiny model ``name`` (token ids, images for the vision models, and
    ``decoder_input_ids`` for the encoder-decoders)."""
    g = torch.Generator().manual_seed(seed)
    if name in IMAGES:
        size = IMAGES[name]
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    vocab = VOCAB.get(name, 197)
    if name == "whisper":  # (batch, mel bins, 2 * max_source_positions) log-mel features
        return {
            "input_features": torch.randn(batch, 8, 32, generator=g),
            "decoder_input_ids": torch.randint(3, vocab, (batch, 6), generator=g),
        }
    if name not in ("t5", "bart"):
        return {"input_ids": torch.randint(0, vocab, (batch, 12), generator=g)}
    # ids from 3 up: the special tokens (pad, bos, eos) stay out of the batch
    return {
        "input_ids": torch.randint(3, vocab, (batch, 12), generator=g),
        "decoder_input_ids": torch.randint(3, vocab, (batch, 6), generator=g),
    }


def outputs(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output tensor (logits)."""
    with torch.no_grad():
        return model(**inputs).logits


def perturb_trainable(model, std: float = 0.3, seed: int = 0) -> None:
    """Add N(0, std^2) noise to every trainable tensor (adapter factors, modules_to_save): an adapter
    moved away from its (often zero) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def served_by_peft(base, folder):
    """PEFT's PeftModel loaded from ``folder`` on a copy of ``base`` (eval mode)."""
    import copy
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own notes on the tiny configs
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
