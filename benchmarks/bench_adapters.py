"""Adapters on MiniLM (batch 16, sequence 64): training-step time and peak memory of our LoRA against
PEFT's LoRA (same r, same target layers: every Linear but the head, classifier trained in full),
side by side in one run; compressed Deep LoRA (depth 3) against our LoRA; and the forward pass of
a merged model against the base model.

Timings interleave the variants round by round (each round times every variant once, median over
rounds), so that load from other processes on a shared machine hits all of them alike.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_time, peak_memory_mb  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _batch(vocab: int, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }


def _train_step(model, batch, opt):
    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _forward(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def fwd():
        with torch.no_grad():
            model(**inputs)

    return fwd


def run(quick: bool = False):
    import peft

    import torchlowrank as tlr
    from torchlowrank.models import load_minilm
    from torchlowrank.reproducibility import environment_info
    from torchlowrank.results import Result, Table

    t0 = time.perf_counter()
    r, lr, bs, seq = 8, 1e-3, 16, 64
    rounds = 2 if quick else 7
    _, base = load_minilm(num_labels=2, seed=0)
    base.train()
    batch = _batch(base.config.vocab_size, bs, seq)

    ours = tlr.adapt(copy.deepcopy(base), tlr.LoRAConfig(r=r, modules_to_save=["classifier"]))
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", modules_to_save=["classifier"]),
    )
    deep = tlr.adapt(copy.deepcopy(base), tlr.DeepLoRAConfig(r=r, depth=3, modules_to_save=["classifier"]))
    tlr.init_compressed(deep, batch)
    for m in (ours, theirs, deep):
        m.train()
    n_ours = tlr.count_parameters(ours, trainable_only=True)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    steps = {
        "LoRA (torchlowrank)": _train_step(
            ours, batch, torch.optim.AdamW(tlr.adapter_param_groups(ours, lr))
        ),
        "LoRA (peft 0.21)": _train_step(
            theirs, batch, torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=lr)
        ),
        "Deep LoRA compressed, depth 3 (torchlowrank)": _train_step(
            deep, batch, torch.optim.AdamW(tlr.adapter_param_groups(deep, lr))
        ),
    }
    merged = tlr.merge(copy.deepcopy(ours))
    plain = copy.deepcopy(base)
    merged.eval()
    plain.eval()
    fwds = {
        "base model forward": _forward(plain, batch),
        "merged LoRA model forward": _forward(merged, batch),
    }

    for fn in list(steps.values()) + list(fwds.values()):  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in [*steps, *fwds]}
    for _ in range(rounds):
        for name, fn in [*steps.items(), *fwds.items()]:
            times[name].append(median_time(fn, repeats=1, warmup=0))
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: peak_memory_mb(fn) for k, fn in [*steps.items(), *fwds.items()]}

    lora, peft_name, deep_name = (
        "LoRA (torchlowrank)",
        "LoRA (peft 0.21)",
        "Deep LoRA compressed, depth 3 (torchlowrank)",
    )
    rows = [
        [peft_name, n_theirs, 1e3 * med[peft_name], 1.0, mem[peft_name], "baseline"],
        [lora, n_ours, 1e3 * med[lora], med[lora] / med[peft_name], mem[lora], "vs peft LoRA (goal <= 1.0)"],
        [
            deep_name,
            tlr.count_parameters(deep, trainable_only=True),
            1e3 * med[deep_name],
            med[deep_name] / med[lora],
            mem[deep_name],
            "vs our LoRA (goal <= 1.2)",
        ],
    ]
    fwd_rows = [
        ["base model forward", 1e3 * med["base model forward"], 1.0, mem["base model forward"], "baseline"],
        [
            "merged LoRA model forward",
            1e3 * med["merged LoRA model forward"],
            med["merged LoRA model forward"] / med["base model forward"],
            mem["merged LoRA model forward"],
            "vs base (goal ~1.0)",
        ],
    ]
    spread = {k: f"{1e3 * min(v):.0f}-{1e3 * max(v):.0f}" for k, v in times.items()}
    return Result(
        name="adapters",
        config={
            "model": "MiniLM-L6 (BertForSequenceClassification)",
            "batch": bs,
            "seq": seq,
            "r": r,
            "targets": "all-linear (every Linear but the classifier), classifier trained in full",
            "optimizer": "AdamW",
            "rounds": rounds,
            "threads": torch.get_num_threads(),
        },
        metrics={
            "ratio_lora_vs_peft": med[lora] / med[peft_name],
            "ratio_deep_vs_lora": med[deep_name] / med[lora],
            "ratio_merged_vs_base": med["merged LoRA model forward"] / med["base model forward"],
        },
        tables=[
            Table(
                "Training step (forward + backward + AdamW), median over rounds",
                ["variant", "trainable params", "median step (ms)", "ratio", "peak memory (MiB)", "ratio is"],
                rows,
            ),
            Table(
                "Inference forward (no grad), median over rounds",
                ["variant", "median (ms)", "ratio", "peak memory (MiB)", "ratio is"],
                fwd_rows,
            ),
            Table(
                "Spread of the per-round times (ms, min-max)",
                ["variant", "min-max (ms)"],
                [[k, v] for k, v in spread.items()],
            ),
        ],
        notes=(
            "CPU timings on a machine shared with other processes: absolute numbers are noisy; the variants are "
            "interleaved round by round so the ratios are fairer than the absolute times. Peak memory is the "
            "peak-RSS increase during one call (CPU), which includes allocator effects."
        ),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )
