"""One column of the real-completion reproduction (``torchlowrank reproduce real-completion``),
for chosen cases and methods, printed as one line per (case, method): mean relative error and
RMSE on the hidden entries over the seeds, per-seed relative errors, wall times and one status.

    PYTHONPATH=src python benchmarks/real_completion_column.py "diabetes raw,MovieLens random" \\
        "complete() defaults" 0,1,2

The full reproduction runs every method on every case (~25 min or more on the shared 2-core
machine); this re-measures the columns a change touched, with the same cases, splits, seeds and
code (``real_completion.make_case`` / ``fit``). One thread, as the reproduction.
"""

from __future__ import annotations

import sys

import torch

from torchlowrank.experiments.real_completion import Config, fit, make_case


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = Config()
    cases = argv[0].split(",")
    meths = argv[1].split(",") if len(argv) > 1 else ["complete() defaults"]
    seeds = [int(s) for s in (argv[2] if len(argv) > 2 else "0,1,2").split(",")]
    for name in cases:
        for meth in meths:
            fs = [fit(meth, make_case(name, cfg, s), cfg, s) for s in seeds]
            rel = sum(f.rel for f in fs) / len(fs)
            rmse = sum(f.rmse for f in fs) / len(fs)
            std = (sum((f.rmse - rmse) ** 2 for f in fs) / len(fs)) ** 0.5
            print(
                f"{name} | {meth} | rel {rel:.4f} | rmse {rmse:.4f} +- {std:.4f} | "
                f"per seed rel {[round(f.rel, 4) for f in fs]} | wall {[round(f.wall, 1) for f in fs]} s | "
                f"{'; '.join(sorted({f.status for f in fs}))}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
