"""LeNet-5 ablation (issue 19): what explains LowRankAdam's remaining gap to factorized Adam?

lowrank-pretrain's full config restricted to LeNet-5 (Fashion-MNIST, 40,000 training / 2,000
validation / 5,000 test images, 3 epochs of batch 128, budgets 5 % and 20 %, seeds 0-2, the same
dense inits and batch orders), the same learning-rate rule (seed 0 at 3e-3 and 1e-2, one ladder step
outward while the best final validation accuracy is at an end; seeds 1-2 at the chosen rate). One
thing changed per arm:

- ``factorized Adam`` and ``LowRankAdam`` (library defaults): the registered arms, rerun here so
  that every difference is paired within one run;
- ``LowRankAdam elementwise`` / ``elementwise_mean``: one second moment per coefficient of the core
  instead of one per layer (``second_moment``);
- ``factorized Adam, per-tensor v``: Adam on the A B^T factors with ONE second moment per tensor
  (``PerTensorAdamW``, betas and eps as Adam's): does factorized Adam lose what LowRankAdam lacks?
- ``LowRankAdam basis_lr_ratio 1`` / ``10`` (default 3).

Arms run in this order, each arm's search and seeds at both budgets before the next; an arm is not
started once ``TIME_BUDGET_S`` has passed (those are listed as not run). The JSON and Markdown are
rewritten after every arm, into ``docs/results/lowrank-pretrain/lenet-ablation.*``.

    PYTHONPATH=src python scripts/lenet_ablation.py
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from torchlowrank.experiments import lowrank_pretrain as P
from torchlowrank.experiments.per_tensor_adam import PerTensorAdamW
from torchlowrank.progress import progress_bar
from torchlowrank.report import write_report
from torchlowrank.reproducibility import environment_info, git_commit, one_thread
from torchlowrank.results import Result, Table

# ---------------------------------------------------------------------------------------- config

OUT = "docs/results/lowrank-pretrain"
NAME = "lenet-ablation"
COMMAND = "PYTHONPATH=src python scripts/lenet_ablation.py"
ARCH = "lenet5"
BASELINE = "factorized Adam"
DEFAULT = "LowRankAdam"
TIME_BUDGET_S = 1320  # no arm starts after this
VARIANTS = {  # label -> (base arm, optimizer class or None for the base's, optimizer kwargs)
    "LowRankAdam elementwise": ("LowRankAdam", None, {"second_moment": "elementwise"}),
    "factorized Adam, per-tensor v": ("factorized Adam", PerTensorAdamW, {}),
    "LowRankAdam elementwise_mean": ("LowRankAdam", None, {"second_moment": "elementwise_mean"}),
    "LowRankAdam basis_lr_ratio 1": ("LowRankAdam", None, {"basis_lr_ratio": 1.0}),
    "LowRankAdam basis_lr_ratio 10": ("LowRankAdam", None, {"basis_lr_ratio": 10.0}),
}
ARMS = [BASELINE, DEFAULT, *VARIANTS]
REGISTERED = P.Config.make(quick=False, seed=0)
CONFIG = dataclasses.replace(
    REGISTERED,
    name=NAME,
    archs={ARCH: REGISTERED.archs[ARCH]},
    seeds={ARCH: REGISTERED.seeds[ARCH]},
    taus=[],
    methods=tuple(ARMS),
    variants=VARIANTS,
)

# ------------------------------------------------------------------------------------------- run


def run_arm(arm: str, data) -> tuple[list, list, dict]:
    """lowrank-pretrain's search and seeds for one arm at every budget (train_arch with methods=(arm,))."""
    cfg = dataclasses.replace(CONFIG, methods=(arm,))
    bar = progress_bar(total=1, enabled=False)
    with one_thread():
        return P.train_arch(ARCH, cfg, data, bar)


def cell(records, arm, p):
    """The chosen runs of (arm, budget p), ordered by seed."""
    return sorted((r for r in records if (r.method, r.fraction) == (arm, p)), key=lambda r: r.seed)


def paired(records, arm, other, p) -> list[float]:
    """Per seed: test accuracy of ``arm`` minus that of ``other`` (same init and batch order)."""
    return [a.test_accuracy - b.test_accuracy for a, b in zip(cell(records, arm, p), cell(records, other, p))]


def seq(xs) -> str:
    return " / ".join(f"{x:+.3f}" for x in xs)


def mean(xs) -> float | None:
    return statistics.fmean(xs) if xs else None  # None: the other arm has not run yet


def tables(chosen, tuning, tried, done):
    rows = []
    for p in CONFIG.fractions:
        for arm in done:
            rs = cell(chosen, arm, p)
            accs = [r.test_accuracy for r in rs]
            vs_base, vs_default = paired(chosen, arm, BASELINE, p), paired(chosen, arm, DEFAULT, p)
            rows.append(
                [
                    p,
                    arm,
                    rs[0].lr,
                    " / ".join(f"{x:g}" for x in tried[(arm, p)]),
                    P.at_edge(tried[(arm, p)], rs[0].lr),
                    statistics.fmean(r.val_accuracy for r in rs),
                    statistics.fmean(accs),
                    statistics.stdev(accs),
                    " / ".join(f"{a:.4f}" for a in accs),
                    seq(vs_base),
                    mean(vs_base),
                    seq(vs_default),
                    mean(vs_default),
                    statistics.fmean(r.seconds for r in rs),
                ]
            )
    main = Table(
        "LeNet-5, test accuracy at each arm's validation-chosen lr; paired differences per seed 0 / 1 / 2",
        [
            "fraction",
            "arm",
            "lr",
            "lrs tried (seed 0)",
            "lr at grid edge",
            "val accuracy",
            "test accuracy",
            "std",
            "test per seed",
            "− factorized Adam, per seed",
            "− factorized Adam, mean",
            "− LowRankAdam, per seed",
            "− LowRankAdam, mean",
            "train s",
        ],
        rows,
    )
    search = Table(
        "Learning-rate search (seed 0, final validation accuracy)",
        ["fraction", "arm", "lr", "val accuracy"],
        [[r.fraction, r.method, r.lr, r.val_accuracy] for r in tuning],
    )
    return [main, search]


def write(chosen, tuning, tried, done, skipped, commit, t0):
    metrics = {}
    for p in CONFIG.fractions:
        for arm in done:
            key = f"{arm}_{p:g}".replace(" ", "_").replace(",", "")
            metrics[f"accuracy_{key}"] = statistics.fmean(r.test_accuracy for r in cell(chosen, arm, p))
            metrics[f"diff_vs_factorized_{key}"] = statistics.fmean(paired(chosen, arm, BASELINE, p))
    config = {
        "arch": ARCH,
        "arms": ARMS,
        "arms_run": done,
        "arms_not_run_time_budget": skipped,
        "variants": {k: [b, c.__name__ if c else None, kw] for k, (b, c, kw) in VARIANTS.items()},
        "fractions": CONFIG.fractions,
        "seeds": CONFIG.seeds[ARCH],
        "training": CONFIG.archs[ARCH],
        "lr_ladder": list(CONFIG.lr_ladder),
        "lr_start": list(CONFIG.lr_start),
        "min_lr_ratio": CONFIG.min_lr_ratio,
        "n_train": CONFIG.n_train,
        "n_val": CONFIG.n_val,
        "n_test": CONFIG.n_test,
        "time_budget_s": TIME_BUDGET_S,
        "command": COMMAND,
        "git_commit": commit,
    }
    notes = (
        "lowrank-pretrain's full config on LeNet-5 only, same data, inits, batches and learning-rate "
        "rule; one thing changed per arm (see the script's docstring). Paired differences are test "
        "accuracy per seed (same dense init and batch order). Arms listed under "
        "'arms_not_run_time_budget' in the config were not run. Reproduce: `" + COMMAND + "`."
    )
    result = Result(
        name=NAME,
        config=config,
        seeds=CONFIG.seeds[ARCH],
        metrics=metrics,
        tables=tables(chosen, tuning, tried, done),
        history={
            "runs": [dataclasses.asdict(r) for r in chosen],
            "tuning": [dataclasses.asdict(r) for r in tuning],
        },
        notes=notes,
        wall_time_s=time.perf_counter() - t0,
        environment=environment_info(),
    )
    return write_report(result, OUT)


if __name__ == "__main__":
    t0 = time.perf_counter()
    commit = git_commit() or "unknown"
    # the data at torch's default threads, as the registered run loads it (its normalisation over 33 M
    # pixels differs by 1 ulp at one thread, which moves every arm by up to ~0.01: one_thread_side_run.md)
    data = P.load_data(CONFIG)
    torch.set_num_threads(1)
    chosen, tuning, tried, done, skipped = [], [], {}, [], []
    for arm in ARMS:
        if time.perf_counter() - t0 > TIME_BUDGET_S:
            skipped.append(arm)
            continue
        t_arm = time.perf_counter()
        tu, ch, tr = run_arm(arm, data)
        tuning, chosen, done = tuning + tu, chosen + ch, done + [arm]
        tried.update(tr)
        paths = write(chosen, tuning, tried, done, skipped, commit, t0)
        print(
            f"{arm}: {time.perf_counter() - t_arm:.0f} s (total {time.perf_counter() - t0:.0f} s)", flush=True
        )
    paths = write(chosen, tuning, tried, done, skipped, commit, t0)
    print(f"{NAME}: {time.perf_counter() - t0:.0f} s, wrote {sorted(map(str, paths.values()))}", flush=True)
