"""The long lowrank-lm run (issue 19, item 2): both budgets, 1000 steps, 3 seeds, the registered search.

Two studies, run one after the other in this process, each written as soon as it ends (so that a run
cut short by a deadline still leaves the first budget's report):

1. ``lowrank-lm-long-p25``: dense AdamW, factorized AdamW and LowRankAdam (fixed rank) at 25 %;
2. ``lowrank-lm-long-p50``: factorized AdamW and LowRankAdam at 50 % (dense AdamW does not depend on the
   budget: it is the same runs as in part 1, same seeds, same batches).

Everything else is ``LMConfig()`` (model, batch, lr ladder and its start, seeds), with the training
budget 2.5x the registered one: 1000 steps, warm-up 50 (both 2.5x), evaluation every 50 steps.
LowRankAdam adaptive and GaLoreAdamW are left out for time (2-core shared machine, one thread).

A third, optional step (``fine``, run after both) refines the search of factorized AdamW and LowRankAdam
on a ladder with half steps (``FINE_LADDER``: 1, 2, 3, 5 per decade), the same way for both: for each
(method, budget) of parts 1-2 it starts at the rate chosen there and its two neighbours on the fine
ladder, steps outward with the same rule (``next_lr``) while the best is at an end, and reruns seeds
1-2 at the rate chosen; validation split only, as before. Each (method, budget) is its own study,
``lowrank-lm-long-fine-<arm>``.

    PYTHONPATH=src python scripts/lowrank_lm_long.py [p25] [p50] [fine]
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from torchlowrank.experiments import lowrank_lm
from torchlowrank.report import write_report

OUT = "docs/results/lowrank-lm"
COMMAND = "PYTHONPATH=src python scripts/lowrank_lm_long.py"
LONG = dataclasses.replace(lowrank_lm.LMConfig(), steps=1000, warmup=50, eval_every=50)
PARTS = {
    "p25": dict(fractions=(0.25,), methods=("dense AdamW", "factorized AdamW", "LowRankAdam")),
    "p50": dict(fractions=(0.5,), methods=("factorized AdamW", "LowRankAdam")),
}
FINE_LADDER = tuple(round(m * 10.0**e, 12) for e in range(-4, -1) for m in (1, 2, 3, 5)) + (1e-1, 2e-1, 3e-1)


def fine_parts() -> dict[str, dict]:
    """One refined search per (factorized AdamW | LowRankAdam, budget) of parts p25 and p50, starting at
    the rate that part chose and its two neighbours on FINE_LADDER (read from the written reports)."""
    parts = {}
    for coarse in PARTS:
        runs = json.loads(Path(OUT, f"lowrank-lm-long-{coarse}.json").read_text())["history"]["runs"]
        for method in ("factorized AdamW", "LowRankAdam"):
            (rec,) = [r for r in runs if r["method"] == method and r["seed"] == LONG.seeds[0]]
            i = FINE_LADDER.index(rec["lr"])
            parts[f"fine-{lowrank_lm.arm_key(method, rec['fraction'])}"] = dict(
                fractions=(rec["fraction"],),
                methods=(method,),
                lr_ladder=FINE_LADDER,
                lr_start=FINE_LADDER[i - 1 : i + 2],
            )
    return parts


def main(parts: list[str]) -> None:
    for step in parts:  # "fine" reads the reports of p25 and p50: listed after them, it runs after them
        for part, change in fine_parts().items() if step == "fine" else [(step, PARTS[step])]:
            run_part(part, change)


def run_part(part: str, change: dict) -> None:
    name = f"lowrank-lm-long-{part}"
    t0 = time.perf_counter()
    print(f"{time.strftime('%H:%M:%S')} {name}: start", flush=True)
    result = lowrank_lm.lm_study(name, dataclasses.replace(LONG, **change), quick=False, progress=True)
    # the study names the registered command; this run is reproduced by this script instead
    registered = result.config["command"]
    result.config["command"] = f"{COMMAND} {'fine' if part.startswith('fine') else part}"
    result.notes = result.notes.replace(registered, result.config["command"])
    paths = write_report(result, OUT)
    print(
        f"{time.strftime('%H:%M:%S')} {name}: {time.perf_counter() - t0:.0f} s, wrote {sorted(map(str, paths.values()))}",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:] or [*PARTS, "fine"])
