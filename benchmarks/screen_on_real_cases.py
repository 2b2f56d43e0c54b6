"""The exact screen of ``complete()`` on every case and seed of the real-completion reproduction:
it must give up (return nothing) on real, noisy data, and quickly. One line per fit: case, seed,
the screen's result (None, or the rank it accepted and its held-out error), thread CPU seconds.

    PYTHONPATH=src python benchmarks/screen_on_real_cases.py

The screen gets the inputs ``complete()``'s dense route gives it (its default 10 % hold-out, and
the check set drawn from it). One thread.
"""

from __future__ import annotations

import torch
from timing import clock

from torchlowrank.experiments.real_completion import Config, _dense, make_case
from torchlowrank.matrix.centering import holdout_split
from torchlowrank.matrix.exact_screen import check_entries, fit_if_exactly_low_rank
from torchlowrank.matrix.sparse import Entries
from torchlowrank.reproducibility import one_thread

CASES = (
    "diabetes standardized",
    "diabetes raw",
    "breast cancer standardized",
    "breast cancer raw",
    "flower.jpg grey",
    "MovieLens random",
    "MovieLens temporal",
)
SEEDS = (0, 1, 2)
HOLDOUT = 0.1  # complete()'s default


def screen(name: str, seed: int):
    M, W = _dense(make_case(name, Config(), seed))
    rows, cols = W.nonzero(as_tuple=True)
    E = Entries(rows, cols, M[rows, cols].to(torch.float64), tuple(M.shape))
    check = check_entries(holdout_split(rows, cols, HOLDOUT, seed, tuple(M.shape)), seed)
    val = (rows[check], cols[check], E.values[check])
    now = clock()
    t0 = now()
    out = fit_if_exactly_low_rank(E.subset(~check), val, seed=seed)
    return out, now() - t0


if __name__ == "__main__":
    with one_thread():
        for name in CASES:
            for seed in SEEDS:
                out, seconds = screen(name, seed)
                found = "None" if out is None else f"rank {out[1].rank}, held-out RMSE {out[0]:.3g}"
                print(f"{name} | seed {seed} | {found} | {seconds:.2f} s", flush=True)
