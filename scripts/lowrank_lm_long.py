"""The long lowrank-lm run (issue 19, item 2): both budgets, 1000 steps, 3 seeds, the registered search.

Two studies, run one after the other in this process, each written as soon as it ends (so that a run
cut short by a deadline still leaves the first budget's report):

1. ``lowrank-lm-long-p25``: dense AdamW, factorized AdamW and LowRankAdam (fixed rank) at 25 %;
2. ``lowrank-lm-long-p50``: factorized AdamW and LowRankAdam at 50 % (dense AdamW does not depend on the
   budget: it is the same runs as in part 1, same seeds, same batches).

Everything else is ``LMConfig()`` (model, batch, lr ladder and its start, seeds), with the training
budget 2.5x the registered one: 1000 steps, warm-up 50 (both 2.5x), evaluation every 50 steps.
LowRankAdam adaptive and GaLoreAdamW are left out for time (2-core shared machine, one thread).

    PYTHONPATH=src python scripts/lowrank_lm_long.py [p25] [p50]
"""

from __future__ import annotations

import dataclasses
import sys
import time

from torchlowrank.experiments import lowrank_lm
from torchlowrank.report import write_report

OUT = "docs/results/lowrank-lm"
COMMAND = "PYTHONPATH=src python scripts/lowrank_lm_long.py"
LONG = dataclasses.replace(lowrank_lm.LMConfig(), steps=1000, warmup=50, eval_every=50)
PARTS = {
    "p25": dict(fractions=(0.25,), methods=("dense AdamW", "factorized AdamW", "LowRankAdam")),
    "p50": dict(fractions=(0.5,), methods=("factorized AdamW", "LowRankAdam")),
}


def main(parts: list[str]) -> None:
    for part in parts:
        name = f"lowrank-lm-long-{part}"
        t0 = time.perf_counter()
        print(f"{time.strftime('%H:%M:%S')} {name}: start", flush=True)
        result = lowrank_lm.lm_study(
            name, dataclasses.replace(LONG, **PARTS[part]), quick=False, progress=True
        )
        # the study names the registered command; this run is reproduced by this script instead
        registered = result.config["command"]
        result.config["command"] = f"{COMMAND} {part}"
        result.notes = result.notes.replace(registered, result.config["command"])
        paths = write_report(result, OUT)
        print(
            f"{time.strftime('%H:%M:%S')} {name}: {time.perf_counter() - t0:.0f} s, wrote {sorted(map(str, paths.values()))}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or list(PARTS))
