"""Fine-tune MiniLM on Rotten Tomatoes with the Hugging Face Trainer and compressed Deep LoRA, then
export a PEFT adapter and check that ``peft`` loads it and gives the same logits.

Offline and on CPU (the model and data come from installed packages). One process or DDP::

    python examples/finetune_minilm_trainer.py --steps 200 --out runs/minilm
    torchrun --nproc_per_node 2 examples/finetune_minilm_trainer.py --steps 4 --out runs/minilm_ddp

Under torchrun the Trainer runs DistributedDataParallel (gloo on CPU): every rank builds the model,
adapts it and calls ``tlr.init_compressed`` on its own share of the first global batch (the
gradients are averaged over ranks and rank 0's factors broadcast) *before* the Trainer wraps the
model. ``--batch-size`` is per process, so the global batch is ``world_size * batch-size``.
Writes ``<out>/result.json`` (accuracy before / after, parameter counts, PEFT check) and
``<out>/peft/`` (the adapter) from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# A script may set its environment: never reach the network, no tokenizer fork warnings.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import torchlowrank as tlr  # noqa: E402
from torchlowrank import distributed  # noqa: E402
from torchlowrank.files import atomic_write_text  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument(
        "--train-size", type=int, default=2000, help="training examples used (from the train split)"
    )
    p.add_argument("--eval-size", type=int, default=500, help="test examples used for accuracy")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (truncated / padded)")
    p.add_argument("--batch-size", type=int, default=16, help="per-process batch size")
    p.add_argument(
        "--lr", type=float, default=2e-2, help="learning rate (Deep LoRA's outer factors: gamma * lr)"
    )
    p.add_argument("--rank", type=int, default=8, help="Deep LoRA width r (even)")
    p.add_argument("--depth", type=int, default=3, help="Deep LoRA depth L")
    p.add_argument(
        "--init-scale",
        type=float,
        default=0.1,
        help="Deep LoRA eps (Delta W(0) = eps^L left right^T); the library's 1e-3 barely moves the "
        "adapters in a few hundred Adam steps (logit change 2.8e-6 after 150 steps at lr 1e-3)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    args = p.parse_args(argv)
    for name in ("steps", "train_size", "eval_size", "max_length", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def tokenize(tokenizer, texts, labels, max_length):
    enc = tokenizer(
        list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
    )
    return [{**{k: v[i] for k, v in enc.items()}, "labels": labels[i]} for i in range(len(texts))]


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


@torch.no_grad()
def evaluate_accuracy(model, rows, batch_size: int = 64) -> float:
    """Accuracy of ``model`` on ``rows`` (every rank computes the same), leaving its train / eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i : i + batch_size])
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / len(rows)


def adapter_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in model.parameters() if p.requires_grad])


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    launched_by_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    targs = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(args.batch_size, 32),
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        use_cpu=True,
        ddp_backend="gloo" if launched_by_torchrun else None,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, args.steps // 10),
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # BertForSequenceClassification takes **kwargs but computes a mean loss without num_items_in_batch;
        # with the default True the Trainer multiplies that loss by world_size (2x gradients under torchrun)
        average_tokens_across_devices=False,
    )
    _ = targs.device  # initialises the process group under torchrun, so init_compressed can all-reduce
    rank, world = distributed.rank(), distributed.world_size()

    data = tlr.data.load_rotten_tomatoes(seed=args.seed)
    if args.train_size > len(data.train_labels) or args.eval_size > len(data.test_labels):
        raise ValueError(
            f"--train-size / --eval-size exceed the data ({len(data.train_labels)} / {len(data.test_labels)})"
        )
    if world * args.batch_size > args.train_size:
        raise ValueError(
            f"the first global batch ({world} x {args.batch_size}) needs --train-size >= "
            f"{world * args.batch_size}"
        )
    tokenizer, model = tlr.models.load_minilm(num_labels=2, seed=args.seed)
    train = tokenize(
        tokenizer, data.train_texts[: args.train_size], data.train_labels[: args.train_size], args.max_length
    )
    test = tokenize(
        tokenizer, data.test_texts[: args.eval_size], data.test_labels[: args.eval_size], args.max_length
    )

    tlr.adapt(
        model,
        tlr.DeepLoRAConfig(
            r=args.rank,
            depth=args.depth,
            init_scale=args.init_scale,
            target_modules=["query", "value", "dense"],
            exclude_modules=["pooler.dense"],
            modules_to_save=["classifier"],
        ),
    )
    # compressed init on every rank, each on its share of the first global batch, before DDP wraps the model
    share = train[rank * args.batch_size : (rank + 1) * args.batch_size]
    model.eval()  # no dropout in the gradient that builds the factors
    tlr.init_compressed(model, collate(share), generator=torch.Generator().manual_seed(args.seed))
    opt = torch.optim.AdamW(tlr.adapter_param_groups(model, args.lr))
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=test,
        data_collator=collate,
        compute_metrics=accuracy,
        optimizers=(opt, None),
    )
    # Not trainer.evaluate() before train(): it marks the model as prepared by Accelerate (without DDP),
    # and train() then skips the DDP wrap, so the ranks would train apart (transformers 5.x, accelerate 1.x).
    before = evaluate_accuracy(model, test)
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    after = trainer.evaluate()["eval_accuracy"]

    # every rank must hold rank 0's adapter: the largest difference to it over all ranks
    mine = adapter_vector(model)
    ref = mine.clone()
    distributed.broadcast_tensors_([ref])
    rank_diff = max(
        distributed.broadcast_object(float((mine - ref).abs().max()), src=r) for r in range(world)
    )

    peft_dir = tlr.export_peft(model, args.out / "peft")  # rank 0 writes, the others wait
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    result = {
        "world_size": world,
        "steps": out.global_step,
        "train_examples": args.train_size,
        "eval_examples": args.eval_size,
        "max_length": args.max_length,
        "batch_size_per_process": args.batch_size,
        "lr": args.lr,
        "rank": args.rank,
        "depth": args.depth,
        "init_scale": args.init_scale,
        "seed": args.seed,
        "accuracy_before": before,
        "accuracy": after,
        "train_loss": out.training_loss,
        "train_seconds": round(train_s, 2),
        "trainable_params": trainable,
        "total_params": total,
        "max_abs_adapter_diff_between_ranks": rank_diff,
        "peft_dir": str(peft_dir),
    }
    # the accuracy of always answering the test set's most common class: a run that does not beat it
    # learned nothing beyond the label prior
    majority = float(
        max(
            data.test_labels[: args.eval_size].float().mean(),
            1 - data.test_labels[: args.eval_size].float().mean(),
        )
    )
    result["majority_class_accuracy"] = majority
    result["status"] = "ok" if after > majority else "no better than the majority class"
    if distributed.is_main_process():
        if after <= majority:
            import warnings

            warnings.warn(
                f"accuracy {after:.3f} is no better than always predicting the majority class ({majority:.3f}): "
                "train longer or with a larger --lr",
                stacklevel=1,
            )
        result["peft_max_abs_logit_diff"], result["adapter_max_abs_logit_effect"] = check_peft(
            model, peft_dir, test, args.seed
        )
        atomic_write_text(args.out / "result.json", json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    distributed.barrier()
    return result


def check_peft(model, peft_dir: Path, test, seed: int) -> float:
    """Load the exported adapter with peft on a fresh MiniLM: (the largest |logit difference| to ours,
    the largest |logit change| from switching our Deep LoRA layers off, i.e. what the adapters do)."""
    import peft

    _, base = tlr.models.load_minilm(num_labels=2, seed=seed + 1)  # another head: the adapter carries ours
    served = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    model.eval()
    batch = collate(test[:32])
    batch.pop("labels")
    layers = [layer for _, layer in tlr.adapters.adapter_layers(model)]
    with torch.no_grad():
        ours = model(**batch).logits
        diff = (served(**batch).logits - ours).abs().max().item()
        for layer in layers:  # the adapters' own effect on the logits, to put diff in scale
            layer.disabled = True
        try:
            effect = (model(**batch).logits - ours).abs().max().item()
        finally:
            for layer in layers:
                layer.disabled = False
    if not diff <= 1e-4:
        import warnings

        warnings.warn(f"the PEFT adapter's logits differ from ours by {diff:.3g}", stacklevel=2)
    return diff, effect


if __name__ == "__main__":
    main()
