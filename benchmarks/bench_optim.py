"""Optimizers for low-rank training: step time and optimizer-state memory (issues: geometric optimizers, GPU-first).

Part 1 - LowRankAdam vs Adam on the factors of W = A B^T at the same rank, and dense AdamW: an MLP
of ``width`` -> 3 x (width x width) -> 10, one full training step (zero_grad, forward, backward,
step), mean (and median) over interleaved steps (a multiple of 8, so every variant's mean covers
whole augmentation cycles). LowRankAdam with augment_every = 1 (the exact method) and 4 / 8
(S-steps in between), and rank adaptive (tau > 0, one rank decision per step, or every 10). CPU:
width 1024, rank 64, batch 256, float32, one thread. CUDA (the GPU-first issue's setting): width
4096, rank 256, batch 1024, float32 with TF32 matmuls, CUDA-event timing. Goal: LowRankAdam <= 1.3x
factorized Adam's step at a fixed rank, <= 1.5x rank adaptive.

Part 2 - GaLoreAdamW vs the galore-torch package (and dense AdamW): MLP 784 -> 4 x (1024 x 1024)
-> 10, batch 256, rank 128, update gap 200, scale 0.25; the candidates' steps are interleaved one by
one for ``steps`` steps (refreshes at step 0 and 200 included), reporting the mean step (what a run
pays, refreshes included) and the median step. Goal: the package's memory and a lower mean step.

Part 3 (CUDA only; ``--quick`` runs a tiny configuration on any device as a smoke test) - a
368M-parameter Llama from a config (hidden 1024, 24 layers, MLP 2816, vocabulary 32000), bf16
autocast, batch 8 x 512: AdamW, GaLoreAdamW (ours and the package), every projection factorized at
rank 256 with AdamW (A B^T) and with LowRankAdam (fixed and rank adaptive), and AdamW + Q3R.
Step time (CUDA events, mean and median), peak memory, optimizer-state bytes.

Memory is the exact number of bytes in optimizer state tensors (not process memory); for the
package that includes the projector matrices it keeps outside its state tensors.
"""

from __future__ import annotations

import statistics
import time

import torch
from timing import interleaved_step_times
from torch import nn

import torchlowrank as tlr
from torchlowrank.reproducibility import environment_info, one_thread
from torchlowrank.results import Result, Table


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix"):  # galore-torch's GaLoreProjector
                P = v.ortho_matrix
                mats = P if isinstance(P, list) else [P]
                total += sum(t.numel() * t.element_size() for t in mats if t is not None)
    return total


def _mlp(kind: str, widths: list[int], rank: int, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        if kind == "lowrank":
            layers.append(tlr.LowRankLinear(a, b, rank, device=device))
        elif kind == "factorized":
            layers.append(tlr.FactorizedLinear(a, b, rank, device=device))
        else:
            layers.append(nn.Linear(a, b, device=device))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers, nn.Linear(widths[-1], 10, device=device))


def _stepper(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _interleaved(
    fns: dict, steps: int, warmup: int, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    return interleaved_step_times(fns, steps, warmup, device=device)


LOWRANK_ARMS = {  # name -> (layer kind, optimizer factory)
    "dense AdamW": ("dense", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)),
    "factorized Adam (A B^T)": ("factorized", lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)),
    "LowRankAdam": ("lowrank", lambda m: tlr.optim.LowRankAdam(m, lr=1e-3)),
    "LowRankAdam augment_every=4": ("lowrank", lambda m: tlr.optim.LowRankAdam(m, lr=1e-3, augment_every=4)),
    "LowRankAdam augment_every=8": ("lowrank", lambda m: tlr.optim.LowRankAdam(m, lr=1e-3, augment_every=8)),
    "LowRankAdam tau=0.05": ("lowrank", lambda m: tlr.optim.LowRankAdam(m, lr=1e-3, tau=0.05)),
    "LowRankAdam tau=0.05 rank_every=10": (
        "lowrank",
        lambda m: tlr.optim.LowRankAdam(m, lr=1e-3, tau=0.05, rank_every=10),
    ),
}


def part_lowrank(quick: bool, device: torch.device | str = "cpu") -> tuple[Table, dict]:
    cuda = torch.device(device).type == "cuda"
    width, rank, batch = (4096, 256, 1024) if cuda else (1024, 64, 256)
    widths = [width] * 4
    repeats = (8 if quick else 32) * (2 if cuda else 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    models = {k: _mlp(kind, widths, rank, 0, device) for k, (kind, _) in LOWRANK_ARMS.items()}
    opts = {k: make(models[k]) for k, (_, make) in LOWRANK_ARMS.items()}
    times = _interleaved(
        {k: _stepper(models[k], opts[k], x, y) for k in models}, repeats, warmup=8, device=device
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    # the mean is what a run pays: with augment_every = k only every k-th step augments, and the
    # median would show the cheap in-between steps alone
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    base = mean["factorized Adam (A B^T)"]
    rows = []
    for k in models:
        rows.append(
            [
                k,
                mean[k] * 1e3,
                med[k] * 1e3,
                mean[k] / base,
                mean[k] / mean["dense AdamW"],
                state_bytes(opts[k]) / 2**20,
                state_bytes(opts[k]) / state_bytes(opts["dense AdamW"]),
                sum(p.numel() for p in models[k].parameters()),
            ]
        )
    precision = "float32 (TF32 matmuls), CUDA events" if cuda else "float32, one thread"
    table = Table(
        f"Training step, MLP {width} -> 3 x {width}^2 -> 10, rank {rank}, batch {batch}, {precision} "
        f"({repeats} interleaved steps each)",
        [
            "optimizer",
            "mean step (ms)",
            "median step (ms)",
            "mean x factorized Adam",
            "mean x dense AdamW",
            "state (MiB)",
            "state x AdamW",
            "parameters",
        ],
        rows,
    )
    metrics = {
        "lowrank_adam_step_vs_factorized": mean["LowRankAdam"] / base,
        "lowrank_adam_k4_step_vs_factorized": mean["LowRankAdam augment_every=4"] / base,
        "lowrank_adam_k8_step_vs_factorized": mean["LowRankAdam augment_every=8"] / base,
        "lowrank_adam_adaptive_step_vs_factorized": mean["LowRankAdam tau=0.05"] / base,
        "lowrank_adam_adaptive_every10_step_vs_factorized": mean["LowRankAdam tau=0.05 rank_every=10"] / base,
        "lowrank_adam_state_bytes": state_bytes(opts["LowRankAdam"]),
        "factorized_adam_state_bytes": state_bytes(opts["factorized Adam (A B^T)"]),
    }
    return table, metrics


def part_batch_sweep(quick: bool, device: torch.device | str = "cpu") -> tuple[Table, dict]:
    """LowRankAdam / factorized Adam at growing batch sizes, the rest as in :func:`part_lowrank`.

    Why: an augmenting step costs 17 products of a tall (m, r) and a small (r, r) matrix per layer
    (U^T G V; per side K, K^T K, Q1, Q1^T Q1, Q1^T K, U^T Q1 and two for the new basis), i.e.
    34 m r^2 flops for an m x m layer, whatever the batch; forward + backward of the factorized
    layer cost 12 batch m r. The ratio 2.83 r / batch (0.71 at r 64, batch 256) is a floor for
    LowRankAdam's extra time that no implementation removes, and it shrinks as the batch grows."""
    cuda = torch.device(device).type == "cuda"
    width, rank, base_batch = (4096, 256, 1024) if cuda else (1024, 64, 256)
    batches = [base_batch] if quick else [base_batch, 4 * base_batch, 16 * base_batch]
    arms = {k: LOWRANK_ARMS[k] for k in ("factorized Adam (A B^T)", "LowRankAdam")}
    rows, metrics = [], {}
    for batch in batches:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, width, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        models = {k: _mlp(kind, [width] * 4, rank, 0, device) for k, (kind, _) in arms.items()}
        opts = {k: make(models[k]) for k, (_, make) in arms.items()}
        times = _interleaved(
            {k: _stepper(models[k], opts[k], x, y) for k in arms}, 8 if quick else 16, warmup=4, device=device
        )
        mean = {k: statistics.fmean(v) for k, v in times.items()}
        ratio = mean["LowRankAdam"] / mean["factorized Adam (A B^T)"]
        floor = 1 + 2.83 * rank / batch  # the docstring's flop count (the small head ignored)
        rows.append([batch, mean["factorized Adam (A B^T)"] * 1e3, mean["LowRankAdam"] * 1e3, ratio, floor])
        metrics[f"lowrank_adam_vs_factorized_batch{batch}"] = ratio
    table = Table(
        f"LowRankAdam vs factorized Adam by batch size, MLP {width} -> 3 x {width}^2 -> 10, rank {rank}",
        ["batch", "factorized Adam step (ms)", "LowRankAdam step (ms)", "ratio", "FLOP floor of the ratio"],
        rows,
    )
    return table, metrics


def part_galore(quick: bool) -> tuple[Table, dict]:
    import warnings

    import galore_torch

    widths = [784] + [1024] * 4
    batch, rank, scale = 256, 128, 0.25
    gap = 20 if quick else 200
    steps = 45 if quick else 201  # refreshes at 0, gap, 2 gap, ... all inside the averaged steps
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
    models = {
        k: _mlp("dense", widths, rank, 0) for k in ("AdamW", "galore-torch GaLoreAdamW", "tlr GaLoreAdamW")
    }

    def split(model):
        mats = [p for n, p in model.named_parameters() if p.ndim == 2 and min(p.shape) > rank]
        rest = [p for p in model.parameters() if all(p is not q for q in mats)]
        return mats, rest

    mats, rest = split(models["galore-torch GaLoreAdamW"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pkg = galore_torch.GaLoreAdamW(
            [
                {"params": rest},
                {"params": mats, "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": "std"},
            ],
            lr=1e-3,
            no_deprecation_warning=True,
        )
    mats2, rest2 = split(models["tlr GaLoreAdamW"])
    ours = tlr.optim.GaLoreAdamW(
        [{"params": rest2, "rank": None}, {"params": mats2}], lr=1e-3, rank=rank, update_gap=gap, scale=scale
    )
    opts = {
        "AdamW": torch.optim.AdamW(models["AdamW"].parameters(), lr=1e-3),
        "galore-torch GaLoreAdamW": pkg,
        "tlr GaLoreAdamW": ours,
    }
    times = _interleaved({k: _stepper(models[k], opts[k], x, y) for k in models}, steps, warmup=0)
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    refresh = {k: max(v) for k, v in times.items()}
    rows = [
        [
            k,
            mean[k] * 1e3,
            med[k] * 1e3,
            refresh[k] * 1e3,
            mean[k] / mean["AdamW"],
            med[k] / med["AdamW"],
            state_bytes(opts[k]) / 2**20,
            state_bytes(opts[k]) / state_bytes(opts["AdamW"]),
        ]
        for k in models
    ]
    table = Table(
        f"GaLore, MLP 784 -> 4 x 1024^2 -> 10, batch {batch}, rank {rank}, update gap {gap}, scale {scale}, "
        f"{steps} interleaved steps (refreshes included), float32, one thread",
        [
            "optimizer",
            "mean step (ms)",
            "median step (ms)",
            "slowest step (ms)",
            "mean x AdamW",
            "median x AdamW",
            "state (MiB)",
            "state x AdamW",
        ],
        rows,
    )
    metrics = {
        "galore_mean_step_ours_vs_package": mean["tlr GaLoreAdamW"] / mean["galore-torch GaLoreAdamW"],
        "galore_median_step_ours_vs_package": med["tlr GaLoreAdamW"] / med["galore-torch GaLoreAdamW"],
        "galore_state_bytes_ours": state_bytes(ours),
        "galore_state_bytes_package": state_bytes(pkg),
    }
    return table, metrics


PROJECTIONS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def _llama(size: str, kind: str, rank: int, device: torch.device | str) -> nn.Module:
    """A Llama from a config, every projection dense, A B^T (``"factorized"``) or U S V^T
    (``"lowrank"``), built at its default initialisation (no SVD of a dense weight)."""
    import re

    from transformers import LlamaConfig, LlamaForCausalLM

    if size == "368M":
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
    else:  # a smoke-test size
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    if kind != "dense":
        make = tlr.FactorizedLinear if kind == "factorized" else tlr.LowRankLinear
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and re.fullmatch(PROJECTIONS, name):
                parent, _, child = name.rpartition(".")
                setattr(
                    model.get_submodule(parent),
                    child,
                    make(module.in_features, module.out_features, rank, bias=False, device=device),
                )
    return model


def _galore_package(model: nn.Module, rank: int, gap: int):
    import warnings

    import galore_torch

    mats = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    rest = [p for p in model.parameters() if all(p is not q for q in mats)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return galore_torch.GaLoreAdamW(
            [
                {"params": rest},
                {"params": mats, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"},
            ],
            lr=1e-3,
            no_deprecation_warning=True,
        )


def _galore_ours(model: nn.Module, rank: int, gap: int):
    mats = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    rest = [p for p in model.parameters() if all(p is not q for q in mats)]
    return tlr.optim.GaLoreAdamW(
        [{"params": rest, "rank": None}, {"params": mats}], lr=1e-3, rank=rank, update_gap=gap, scale=0.25
    )


class _WithQ3R(torch.optim.Optimizer):
    """AdamW with Q3R's gradient added before each step (the regularizer's own step)."""

    def __init__(self, model: nn.Module) -> None:
        self.inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.reg = tlr.Q3R(model, 0.1, 0.1, period=5, targets=PROJECTIONS)
        self.param_groups, self.state = self.inner.param_groups, self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        self.reg.step()
        return self.inner.step()


LLAMA_ARMS = {  # name -> (layer kind, optimizer factory(model, rank, gap))
    "AdamW (dense)": ("dense", lambda m, r, gap: torch.optim.AdamW(m.parameters(), lr=1e-3)),
    "GaLoreAdamW (tlr)": ("dense", lambda m, r, gap: _galore_ours(m, r, gap)),
    "GaLoreAdamW (galore-torch)": ("dense", lambda m, r, gap: _galore_package(m, r, gap)),
    "AdamW + Q3R": ("dense", lambda m, r, gap: _WithQ3R(m)),
    "factorized AdamW (A B^T)": ("factorized", lambda m, r, gap: torch.optim.AdamW(m.parameters(), lr=1e-3)),
    "LowRankAdam": ("lowrank", lambda m, r, gap: tlr.optim.LowRankAdam(m, lr=1e-3)),
    "LowRankAdam tau=0.05 rank_every=10": (
        "lowrank",
        lambda m, r, gap: tlr.optim.LowRankAdam(m, lr=1e-3, tau=0.05, max_rank=r, rank_every=10),
    ),
}


def part_llama(quick: bool, device: torch.device | str) -> tuple[Table, dict]:
    cuda = torch.device(device).type == "cuda"
    size, rank, batch, seq, gap = ("368M", 256, 8, 512, 200) if cuda and not quick else ("tiny", 8, 2, 32, 4)
    repeats = 4 if quick else 24
    g = torch.Generator().manual_seed(0)
    rows, metrics, means = [], {}, {}
    models = {k: _llama(size, kind, rank, device) for k, (kind, _) in LLAMA_ARMS.items()}
    vocab = models["AdamW (dense)"].config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    opts = {k: make(models[k], rank, gap) for k, (_, make) in LLAMA_ARMS.items()}

    def stepper(name):
        model, opt = models[name], opts[name]

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()

        return step

    fns = {k: stepper(k) for k in models}
    peaks = {}
    for k, fn in fns.items():  # peak memory of one step above what is resident (weights, state of all arms)
        fn()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peaks[k] = (torch.cuda.max_memory_allocated() - base) / 2**30
    times = _interleaved(fns, repeats, warmup=2, device=device)
    for k in models:
        means[k] = statistics.fmean(times[k])
        rows.append(
            [
                k,
                means[k] * 1e3,
                statistics.median(times[k]) * 1e3,
                0.0,
                0.0,
                peaks.get(k, float("nan")),
                state_bytes(opts[k]) / 2**30,
                sum(p.numel() for p in models[k].parameters()) / 1e6,
            ]
        )
    for row in rows:
        row[3] = means[row[0]] / means["factorized AdamW (A B^T)"]
        row[4] = means[row[0]] / means["AdamW (dense)"]
    precision = "bf16 autocast, CUDA events" if cuda else "float32 (smoke test)"
    table = Table(
        f"Llama {size} from a config, projections at rank {rank}, batch {batch} x {seq}, {precision} "
        f"({repeats} interleaved steps each)",
        [
            "optimizer",
            "mean step (ms)",
            "median step (ms)",
            "mean x factorized AdamW",
            "mean x dense AdamW",
            "peak step memory (GiB)",
            "state (GiB)",
            "parameters (M)",
        ],
        rows,
    )
    metrics = {
        "llama_lowrank_adam_vs_factorized": means["LowRankAdam"] / means["factorized AdamW (A B^T)"],
        "llama_factorized_vs_dense": means["factorized AdamW (A B^T)"] / means["AdamW (dense)"],
        "llama_q3r_overhead": means["AdamW + Q3R"] / means["AdamW (dense)"] - 1,
    }
    return table, metrics


def run(quick: bool = False) -> Result:
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tables, metrics = [], {}
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True  # the setting; restored below
        try:
            for part in (part_lowrank, part_batch_sweep, part_llama):
                t, m = part(quick, device)
                tables.append(t)
                metrics.update(m)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    with one_thread():
        if device.type == "cpu":
            for part in (part_lowrank, part_batch_sweep):
                t, m = part(quick, device)
                tables.append(t)
                metrics.update(m)
        t, m = part_galore(quick)
        tables.append(t)
        metrics.update(m)
        if quick and device.type == "cpu":
            t, m = part_llama(quick, device)
            tables.append(t)
            metrics.update(m)
    return Result(
        name="optim",
        config={
            "quick": quick,
            "device": device.type,
            "threads": 1 if device.type == "cpu" else None,
            "command": "python benchmarks/run.py optim" + (" --quick" if quick else ""),
        },
        metrics=metrics,
        tables=tables,
        notes=(
            "Ratios are between candidates measured interleaved in the same run; absolute times only "
            "compare on the same machine. CPU: one thread. CUDA: CUDA-event timing, TF32 matmuls for "
            "float32. Memory: exact bytes of optimizer state tensors; peak step memory above what is "
            "resident (CUDA only)."
        ),
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )
