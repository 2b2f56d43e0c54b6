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

from torchlowrank.experiments.real_completion import Config, make_case
from torchlowrank.matrix.centering import holdout_split
from torchlowrank.matrix.exact_screen import check_entries, fit_if_exactly_low_rank
from torchlowrank.matrix.sparse import Entries
from torchlowrank.reproducibility import one_thread

HOLDOUT = 0.1  # complete()'s default


def screen(name: str, seed: int):
    case = make_case(name, Config(), seed)  # the reproduction's split of this case
    r, c, v = case.train
    order = torch.argsort(r * case.shape[1] + c)  # row-major, the order complete() reads a mask in
    rows, cols = r[order], c[order]
    E = Entries(rows, cols, v[order].to(torch.float64), case.shape)
    check = check_entries(holdout_split(rows, cols, HOLDOUT, seed, case.shape), seed)
    val = (rows[check], cols[check], E.values[check])
    now = clock()
    t0 = now()
    out = fit_if_exactly_low_rank(E.subset(~check), val, seed=seed)
    return out, now() - t0


if __name__ == "__main__":
    with one_thread():
        cfg = Config()  # the reproduction's cases and seeds
        for name in cfg.cases:
            for seed in cfg.seeds:
                out, seconds = screen(name, seed)
                found = "None" if out is None else f"rank {out[1].rank}, held-out RMSE {out[0]:.3g}"
                print(f"{name} | seed {seed} | {found} | {seconds:.2f} s", flush=True)
