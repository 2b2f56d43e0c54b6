"""real-completion (issue 21): registered, runs in quick mode on real data (diabetes, flower.jpg,
MovieLens-100K), and every default estimator is no worse than the mean on held-out entries."""

import torch

from torchlowrank.experiments import get_experiment
from torchlowrank.experiments.real_completion import QUICK, make_case


def test_temporal_split_holds_out_each_users_latest_ratings():
    case = make_case("MovieLens temporal", QUICK, 0)
    from torchlowrank.experiments.real_completion import _movielens_entries

    u, i, r, t = _movielens_entries()
    key = {(a, b): tt for a, b, tt in zip(u.tolist(), i.tolist(), t.tolist())}
    last_train = {}
    for a, b in zip(case.train[0].tolist(), case.train[1].tolist()):
        last_train[a] = max(last_train.get(a, -1), key[(a, b)])
    assert all(
        key[(a, b)] >= last_train.get(a, -1) for a, b in zip(case.test[0].tolist(), case.test[1].tolist())
    )
    assert 0.08 < len(case.test[2]) / len(r) < 0.12


def test_real_completion_quick_defaults_are_never_worse_than_the_mean():
    threads = torch.get_num_threads()
    res = get_experiment("real-completion").run(quick=True)
    assert torch.get_num_threads() == threads
    (table,) = res.tables
    cols = table.columns
    by = {(row[0], row[1]): row for row in table.rows}
    for case in QUICK.cases:
        mean = by[(case, "mean")][cols.index("RMSE")]
        for meth in ("complete() defaults", "ALS defaults"):
            assert by[(case, meth)][cols.index("RMSE")] <= 1.01 * mean, (case, meth, by[(case, meth)], mean)
    assert "reproduce real-completion" in res.notes
