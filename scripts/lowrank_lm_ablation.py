"""Why LowRankAdam trails factorized AdamW on the LM (issue 19): one-variable-at-a-time ablation.

The long run (``scripts/lowrank_lm_long.py``, 1000 steps, budget 25 %) put LowRankAdam 0.074 nats/byte
behind factorized AdamW. In the registered arms each method's one optimizer also trains every
parameter outside the projections (token embedding, RMSNorm weights, untied head) at the method's
rate: LowRankAdam at its best rate (1e-2 - 2e-2), where dense AdamW is at its worst (1e-2: 1.890).
The parts below change one thing at a time against the long run's fine-searched arms (same config,
seeds, batches and initialisation; those baselines reproduce bit for bit from the current code):

1. ``split-LowRankAdam``: LowRankAdam on the projections only; the other parameters get their own AdamW
   (weight decay 0) at 3e-3, the rate factorized AdamW chose (``LMConfig.other_lr``);
2. ``split-factorized``: the same extra knob for factorized AdamW: its factors at the searched rate, the
   other parameters at 1e-3 (dense AdamW's best);
3. ``split-seeds``: seeds 1 and 2 of the split arms that beat their default arm on seed 0, at the rates
   parts 1-2 chose (skipped when neither did);
4. ``bratio1``, ``bratio10``, ``elementwise``: LowRankAdam with ``basis_lr_ratio`` 1 or 10 (default 3), or
   ``second_moment="elementwise"`` (default "unit"), each on top of the better LowRankAdam of parts
   1-3 (``variant_base``: the split if its mean final validation loss over the seeds it ran is below
   the default's on the same seeds, else the default);
5. ``betas``: factorized AdamW with betas (0.9, 0.95), on top of the better factorized AdamW of parts
   1-3 (the same rule); the betas go to the AdamW at the searched rate.
6. ``split-hi-factorized``: parts 1-2 made both methods worse; LowRankAdam trains its other parameters
   at its own rate (2e-2), factorized AdamW at 3e-3. The same knob the other way, for factorized
   AdamW: its other parameters at 1e-2, its factors searched.
7. ``split-hi-LowRankAdam``: the same for LowRankAdam (other parameters at 1e-2, factors searched):
   its factors' rate no longer tied to its other parameters' rate.
8. ``betas-LowRankAdam``: LowRankAdam with the betas (0.9, 0.95) that part 5 gave factorized AdamW (the
   same knob for both), on the default LowRankAdam by the rule of part 4.

``seeds-<part>`` reruns a searched part's arm on seeds 1 and 2 at the rate it chose on seed 0 (for the
parts that matter, chosen by hand after reading the seed-0 results: see docs/lowrank-lm.md).

Every searched part searches the rate at the searched optimizer on seed 0 by the same rule as the long
run's ``fine`` step: the ladder ``FINE_LADDER`` (1, 2, 3, 5 per decade), starting at a centre rate and
its two neighbours, stepping outward (``next_lr``) while the best is at an end; validation split only.
The centre is the rate the long run's fine search chose for that method (parts 1, 2) or the rate the
base configuration chose (parts 4, 5, 8; parts 6, 7: the default's). Each part is its own study,
``lowrank-lm-ablation-<part>``, written as soon as it ends.

    PYTHONPATH=src python scripts/lowrank_lm_ablation.py [part ...]   (default: every part, in order)
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from torchlowrank.experiments import lowrank_lm
from torchlowrank.report import write_report

OUT = "docs/results/lowrank-lm"
COMMAND = "PYTHONPATH=src python scripts/lowrank_lm_ablation.py"
LONG = dataclasses.replace(lowrank_lm.LMConfig(), steps=1000, warmup=50, eval_every=50)
FRACTION = 0.25
FINE_LADDER = tuple(round(m * 10.0**e, 12) for e in range(-4, -1) for m in (1, 2, 3, 5)) + (1e-1, 2e-1, 3e-1)
FA, LRA = "factorized AdamW", "LowRankAdam"
SPLIT = {LRA: 3e-3, FA: 1e-3}  # the others' fixed AdamW rate in the split arms
BASELINE = {m: f"lowrank-lm-long-fine-{lowrank_lm.arm_key(m, FRACTION)}" for m in (FA, LRA)}
SPLIT_PART = {LRA: "split-LowRankAdam", FA: "split-factorized"}
VARIANTS = {  # part -> (method, optimizer keyword arguments)
    "bratio1": (LRA, {"basis_lr_ratio": 1.0}),
    "bratio10": (LRA, {"basis_lr_ratio": 10.0}),
    "elementwise": (LRA, {"second_moment": "elementwise"}),
    "betas": (FA, {"betas": (0.9, 0.95)}),
    "betas-LowRankAdam": (LRA, {"betas": (0.9, 0.95)}),  # part 8: the same betas for LowRankAdam
}
# parts 1-2 lowered the other parameters' rate and both methods got worse: LowRankAdam trains them at
# its own high rate (2e-2) by default, factorized AdamW at its 3e-3. The same knob the other way, for
# factorized AdamW: its other parameters at 1e-2, its factors searched (part 6); and the same for
# LowRankAdam (part 7: its factors' rate decoupled from its other parameters' 1e-2)
SPLIT_HI = {"split-hi-factorized": (FA, 1e-2), "split-hi-LowRankAdam": (LRA, 1e-2)}
PARTS = ["split-LowRankAdam", "split-factorized", "split-seeds", *VARIANTS, *SPLIT_HI]


def report(name: str) -> dict:
    return json.loads(Path(OUT, f"{name}.json").read_text())


def chosen_runs(name: str, method: str) -> list[dict]:
    return [r for r in report(name)["history"]["runs"] if r["method"] == method]


def start_around(lr: float) -> tuple[float, ...]:
    i = FINE_LADDER.index(lr)
    return FINE_LADDER[i - 1 : i + 2]


def split_helped() -> tuple[str, ...]:
    """The methods whose split arm beat their default arm on seed 0 (final validation loss at the chosen
    rates): only those get seeds 1 and 2 (part split-seeds)."""
    return tuple(
        m
        for m in (FA, LRA)
        if chosen_runs(f"lowrank-lm-ablation-{SPLIT_PART[m]}", m)[0]["final_val"]
        < chosen_runs(BASELINE[m], m)[0]["final_val"]
    )


def split_runs(method: str) -> list[dict]:
    """The split arm's chosen runs: seed 0 from its search part, seeds 1-2 from split-seeds where it ran."""
    seeds = Path(OUT, "lowrank-lm-ablation-split-seeds.json")
    more = chosen_runs(seeds.stem, method) if seeds.exists() else []
    return chosen_runs(f"lowrank-lm-ablation-{SPLIT_PART[method]}", method) + more


def variant_base(method: str) -> dict:
    """The LMConfig changes of the better configuration of ``method`` after parts 1-3, and its seed-0 rate:
    the split if its mean final validation loss over the seeds it ran is below the default's on the same
    seeds, else the default."""
    split = split_runs(method)
    default = {r["seed"]: r["final_val"] for r in chosen_runs(BASELINE[method], method)}
    split_mean = statistics.fmean(r["final_val"] for r in split)
    default_mean = statistics.fmean(default[r["seed"]] for r in split)
    if split_mean < default_mean:
        return dict(other_lr={method: SPLIT[method]}), split[0]["lr"]
    return {}, chosen_runs(BASELINE[method], method)[0]["lr"]


def part_config(part: str) -> lowrank_lm.LMConfig:
    common = dict(fractions=(FRACTION,), lr_ladder=FINE_LADDER)
    if part in SPLIT_PART.values() or part in SPLIT_HI:
        method, other = SPLIT_HI.get(part) or next((m, SPLIT[m]) for m, p in SPLIT_PART.items() if p == part)
        centre = chosen_runs(BASELINE[method], method)[0]["lr"]
        return dataclasses.replace(
            LONG,
            **common,
            methods=(method,),
            other_lr={method: other},
            lr_start=start_around(centre),
            seeds=(0,),
        )
    if part == "split-seeds":  # the rates chosen on seed 0, rerun on seeds 1 and 2 (no search)
        methods = split_helped()
        fixed = {m: chosen_runs(f"lowrank-lm-ablation-{SPLIT_PART[m]}", m)[0]["lr"] for m in methods}
        return dataclasses.replace(
            LONG,
            **common,
            methods=methods,
            other_lr={m: SPLIT[m] for m in methods},
            fixed_lr=fixed,
            seeds=(1, 2),
        )
    if part.startswith("seeds-"):  # seeds 1 and 2 of a searched part's arm, at the rate it chose on seed 0
        searched = part.removeprefix("seeds-")
        cfg = part_config(searched)
        (method,) = cfg.methods
        lr = chosen_runs(f"lowrank-lm-ablation-{searched}", method)[0]["lr"]
        return dataclasses.replace(cfg, fixed_lr={method: lr}, seeds=(1, 2))
    method, kwargs = VARIANTS[part]
    change, centre = variant_base(method)
    return dataclasses.replace(
        LONG,
        **common,
        **change,
        methods=(method,),
        optimizer_kwargs={method: kwargs},
        lr_start=start_around(centre),
        seeds=(0,),
    )


def run_part(part: str) -> None:
    name = f"lowrank-lm-ablation-{part}"
    if part == "split-seeds" and not split_helped():
        print(
            f"{time.strftime('%H:%M:%S')} {name}: skipped, no split arm beat its default on seed 0",
            flush=True,
        )
        return
    cfg = part_config(part)
    t0 = time.perf_counter()
    print(f"{time.strftime('%H:%M:%S')} {name}: start, {cfg.other_lr} {cfg.optimizer_kwargs}", flush=True)
    result = lowrank_lm.lm_study(name, cfg, quick=False, progress=False)
    # the study names the registered command; this run is reproduced by this script instead
    registered = result.config["command"]
    result.config["command"] = f"{COMMAND} {part}"
    result.notes = result.notes.replace(registered, result.config["command"])
    if cfg.fixed_lr:  # not a quick run: the rates were searched on seed 0 in an earlier part
        searched = (
            f"part {part.removeprefix('seeds-')}"
            if part.startswith("seeds-")
            else "parts split-LowRankAdam, split-factorized"
        )
        result.notes = result.notes.replace(
            "a fixed value per method (quick)", f"the rate chosen on seed 0 in {searched}, not searched again"
        )
        result.tables[1].title = f"Runs at the fixed rates (seed {cfg.seeds[0]}, final validation loss)"
    paths = write_report(result, OUT)
    print(
        f"{time.strftime('%H:%M:%S')} {name}: {time.perf_counter() - t0:.0f} s, wrote {sorted(map(str, paths.values()))}",
        flush=True,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    for p in sys.argv[1:] or PARTS:
        run_part(p)
