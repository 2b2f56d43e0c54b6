"""Adapters on a real Hugging Face model (MiniLM, BertForSequenceClassification): merge, save/load
into a fresh base and PEFT export all reproduce the adapted outputs (1e-5); a few HF Trainer steps
train only the adapter and the head, and the saved adapter reloads."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import torchlowrank as tlr
from torchlowrank.adapters import adapter_layers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEXTS = ["a gripping, beautifully acted film", "dull and far too long", "not bad at all", "a mess"]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    from torchlowrank.models import load_minilm

    tokenizer, model = load_minilm(num_labels=2, seed=0)
    model.eval()
    batch = dict(tokenizer(TEXTS, return_tensors="pt", padding=True, truncation=True, max_length=16))
    return tokenizer, model, batch


def nonzero(model, std=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for W in layer.lora_factors:
                W.add_(torch.randn(W.shape, generator=g) * std)
        model.classifier.weight.add_(0.1)


@pytest.mark.parametrize("kind", ["lora", "deep-compressed"])
def test_merge_save_load_and_peft_export_reproduce_the_adapted_model(minilm, tmp_path, kind):
    peft = pytest.importorskip("peft")
    _, base, batch = minilm
    model = copy.deepcopy(base)
    if kind == "lora":
        tlr.adapt(model, tlr.LoRAConfig(r=4, lora_alpha=8, modules_to_save=["classifier"]))
    else:
        tlr.adapt(model, tlr.DeepLoRAConfig(r=4, depth=3, modules_to_save=["classifier"]))
        tlr.init_compressed(model, {**batch, "labels": torch.tensor([1, 0, 1, 0])})
    nonzero(model)
    with torch.no_grad():
        y = model(**batch).logits
        assert (y - base(**batch).logits).abs().max() > 1e-3  # the adapter does something
    tlr.save_adapter(model, tmp_path / "ours")
    tlr.export_peft(model, tmp_path / "peft")
    with torch.no_grad():
        fresh = tlr.load_adapter(copy.deepcopy(base), tmp_path / "ours")
        torch.testing.assert_close(fresh(**batch).logits, y, rtol=0, atol=1e-5)
        served = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
        torch.testing.assert_close(served(**batch).logits, y, rtol=0, atol=1e-5)
        keys = set(base.state_dict())
        tlr.merge(model)
        assert set(model.state_dict()) == keys
        assert type(model.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
        torch.testing.assert_close(model(**batch).logits, y, rtol=0, atol=1e-5)


def test_hf_trainer_trains_only_the_adapter_and_the_head_and_the_adapter_reloads(minilm, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer, base, batch = minilm
    model = tlr.adapt(copy.deepcopy(base), tlr.LoRAConfig(r=4, modules_to_save=["classifier"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    enc = tokenizer(TEXTS * 4, truncation=True, max_length=16)
    data = [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": i % 2}
        for i in range(len(enc["input_ids"]))
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    opt = torch.optim.AdamW(tlr.adapter_param_groups(model, lr=1e-2))
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=transformers.DataCollatorWithPadding(tokenizer),
        optimizers=(opt, None),
    )
    trainer.train()
    model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(layer.lora_B.abs().sum() > 0 for _, layer in adapter_layers(model))  # B left zero: it trained
    tlr.save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        y = model(**batch).logits
        again = tlr.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
        torch.testing.assert_close(again(**batch).logits, y, rtol=0, atol=1e-5)
