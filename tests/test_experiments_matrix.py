"""The matrix reproductions: unknown-rank (quick) runs, is registered, scopes its thread count, and
its oracle baseline is exact; movielens runs without scikit-surprise and says so."""

import builtins
import math

import torch

from torchlowrank.experiments import get_experiment


def test_unknown_rank_quick_runs_restores_threads_and_its_als_oracle_is_exact():
    threads = torch.get_num_threads()
    res = get_experiment("unknown-rank").run(quick=True)
    assert torch.get_num_threads() == threads
    (table,) = res.tables
    row = table.rows[0]
    cols = table.columns
    assert row[cols.index("ALS true rank: error")] < 1e-6  # the oracle (rank given) recovers
    assert math.isfinite(row[cols.index("ours: error")]) and row[cols.index("ours: error")] < 1.0
    assert row[cols.index("ours: status")] in (
        "converged",
        "early_stopped",
        "not_converged",
        "stalled_at_init",
        "diverged",
    )
    assert "reproduce unknown-rank" in res.notes


def test_movielens_surprise_baselines_are_skipped_with_a_note_when_surprise_is_missing(monkeypatch):
    from torchlowrank.experiments.movielens import _surprise_rows

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "surprise" or name.startswith("surprise."):
            raise ImportError("No module named 'surprise'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    e = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([4.0, 3.0]))
    rows, note = _surprise_rows(e, e, e, quick=True, seed=0)
    assert rows == [] and "pip install scikit-surprise" in note


def test_depth_width_quick_depth_3_over_parameterized_recovers_where_depth_2_overfits_and_no_failure_says_converged():
    import warnings

    from torchlowrank.experiments import get_experiment

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the budget-limited runs warn, as they should
        r = get_experiment("depth-width").run(quick=True, progress=False)
    table = r.tables[0]
    rows = {(row[0], row[1]): dict(zip(table.columns, row)) for row in table.rows}
    assert rows[(3, 100)]["final rel. error"] < 1e-4 < 0.05 < rows[(2, 100)]["final rel. error"]
    # a stop declared "converged" is a real recovery (no saddle taken for the optimum)
    for row in rows.values():
        assert row["status"] != "converged" or row["final rel. error"] < 1e-6, row
