"""The sparse route's rank search on a large exactly low-rank problem, one line per candidate
(issue 21): each call of ``als`` made by ``select_ridge_als`` is logged with its start time, its
duration, the rank and its ridge path (ridge, held-out RMSE, sweeps), as JSON lines on stdout.

    PYTHONPATH=src python benchmarks/trace_rank_search.py 100000,50000,20,5000000 none

The problem is :mod:`bench_matrix_sparse`'s (Gaussian factors, entries uniformly at random, seed 0);
the second argument is ``complete()``'s time limit in seconds or ``none``. One torch thread.
"""

from __future__ import annotations

import json
import sys
import time

import bench_matrix_sparse as problem

from torchlowrank.matrix import ridge_select
from torchlowrank.reproducibility import one_thread

T0 = time.perf_counter()
_als = ridge_select.als


def traced_als(*args, **kwargs):
    t = time.perf_counter()
    res = _als(*args, **kwargs)
    path = [(p["reg"], round(p["val_rmse"], 5), p["sweeps"]) for p in res.reg_path]
    line = {"t": round(t - T0, 1), "dur": round(time.perf_counter() - t, 1), "rank": args[2]}
    print(json.dumps({**line, "status": res.status, "n_iters": res.n_iters, "path": path}), flush=True)
    return res


if __name__ == "__main__":
    ridge_select.als = traced_als  # this script's own process: the library is not patched elsewhere
    m, n, r, n_obs = (int(x) for x in sys.argv[1].split(","))
    limit = None if sys.argv[2] == "none" else float(sys.argv[2])
    with one_thread():
        print(problem._complete_case(m, n, r, n_obs, None, limit), flush=True)
    print("total", time.perf_counter() - T0)
