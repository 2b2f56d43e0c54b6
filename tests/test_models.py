import pytest
import torch

import torchlowrank as tlr
from torchlowrank.models import MLP, LeNet5, SmallViT, load_minilm


def test_reference_models_produce_logits_and_train():
    for model, x in [
        (MLP(64, (32,), 10), torch.randn(4, 1, 8, 8)),
        (LeNet5(), torch.randn(4, 1, 28, 28)),
        (SmallViT(dim=32, depth=2, heads=4), torch.randn(4, 1, 28, 28)),
    ]:
        out = model(x)
        assert out.shape == (4, 10)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_vit_has_separate_qkv_layers():
    vit = SmallViT(dim=32, depth=2, heads=2)
    names = {n for n, _ in vit.named_modules()}
    assert {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.1.attn.proj"} <= names


def test_model_argument_errors():
    with pytest.raises(ValueError, match="divisible"):
        SmallViT(dim=30, heads=4)
    with pytest.raises(ValueError, match="28x28"):
        LeNet5()(torch.randn(1, 1, 32, 32))


def test_minilm_loads_offline_as_bert_classifier():
    tok, model = load_minilm(num_labels=3)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert 22_000_000 < tlr.count_parameters(model) < 23_500_000
    batch = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


def test_load_minilm_leaves_the_global_rng_alone():
    pytest.importorskip("transformers")
    from torchlowrank.models import load_minilm

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _, a = load_minilm(seed=5)
    assert torch.equal(torch.rand(3), expected)
    _, b = load_minilm(seed=5)
    assert torch.equal(a.classifier.weight, b.classifier.weight)  # still seeded
