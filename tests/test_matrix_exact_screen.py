"""The exact screen of complete(): plain ALS at the rank the spectrum shows, kept only when it fits
held-out entries to rounding."""

import importlib

import numpy as np
import torch

from torchlowrank.matrix.als import spectral_start
from torchlowrank.matrix.centering import holdout_split
from torchlowrank.matrix.exact_screen import (
    CHECK_MIN,
    MIN_GAP,
    PATIENCE,
    _on_course,
    candidate_ranks,
    check_entries,
    fit_if_exactly_low_rank,
)
from torchlowrank.matrix.problems import low_rank_target, random_mask
from torchlowrank.matrix.sparse import Entries


def _entries(M: torch.Tensor, mask: torch.Tensor, seed: int = 0):
    rows, cols = mask.nonzero(as_tuple=True)
    E = Entries(rows, cols, M[rows, cols], tuple(M.shape))
    pick = holdout_split(rows, cols, 0.1, seed, tuple(M.shape))
    return E.subset(~pick), (rows[pick], cols[pick], M[rows[pick], cols[pick]])


def test_candidate_ranks_are_the_largest_drops_of_the_spectrum_largest_first():
    S = torch.tensor([10.0, 9.0, 3.0, 2.9, 2.8, 1.0, 0.99], dtype=torch.float64)
    assert candidate_ranks(S, max_rank=6) == [2, 5, 1]  # drops 3.0, 2.8, 1.11
    assert candidate_ranks(S, max_rank=1) == [1]
    flat = torch.linspace(2.0, 1.9, 20, dtype=torch.float64)
    assert candidate_ranks(flat, max_rank=19) == []  # no drop >= MIN_GAP: no candidate
    assert MIN_GAP > 1


def test_exact_screen_recovers_exactly_low_rank_data_at_its_rank_with_an_offset():
    g = torch.Generator().manual_seed(0)
    M = 5.0 + low_rank_target((300, 200), 6, generator=g)
    E_fit, val = _entries(M, random_mask((300, 200), 0.3, generator=g))
    rmse, fit = fit_if_exactly_low_rank(E_fit, val)
    assert fit.rank == 6 and fit.result.status == "converged"
    assert rmse <= 1e-6 * float(val[2].std())
    err = torch.linalg.matrix_norm(fit.dense() - M) / torch.linalg.matrix_norm(M)
    assert float(err) < 1e-6  # the whole matrix, not only the held-out entries


def test_exact_screen_gives_up_on_noisy_data_after_a_few_sweeps(monkeypatch):
    g = torch.Generator().manual_seed(1)
    M = low_rank_target((300, 200), 6, generator=g)
    M = M + 0.01 * M.std() * torch.randn(M.shape, generator=g, dtype=M.dtype)
    E_fit, val = _entries(M, random_mask((300, 200), 0.3, generator=g))
    halves = []
    als_module = importlib.import_module("torchlowrank.matrix.als")  # the module, not the function
    real_half = als_module._Fit.half
    monkeypatch.setattr(als_module._Fit, "half", lambda self, *a: halves.append(1) or real_half(self, *a))
    assert fit_if_exactly_low_rank(E_fit, val) is None
    assert 0 < len(halves) <= 2 * 3 * 40  # at most 3 candidate ranks, a few dozen sweeps each at most


def test_a_given_rank_is_tried_first_where_the_spectrum_hides_it():
    g = torch.Generator().manual_seed(0)
    M = low_rank_target((400, 400), 10, generator=g)
    E_fit, val = _entries(M, random_mask((400, 400), 0.10, generator=g))  # 2x the degrees of freedom
    S = spectral_start(
        E_fit, 65, float(E_fit.values.mean()), torch.Generator().manual_seed(0), torch.float64
    )[3]
    assert 10 not in candidate_ranks(S, 64)  # the sampling noise hides the drop at the true rank
    assert fit_if_exactly_low_rank(E_fit, val) is None
    rmse, fit = fit_if_exactly_low_rank(E_fit, val, rank=10)
    assert fit.rank == 10 and rmse <= 1e-6 * float(val[2].std())
    assert float(torch.linalg.matrix_norm(fit.dense() - M) / torch.linalg.matrix_norm(M)) < 1e-6


def test_the_screen_goes_on_while_the_held_out_error_would_reach_its_target_in_time():
    steady = [0.9**k for k in range(PATIENCE + 1)]  # 10 % a sweep: 1e-6 is 131 sweeps away
    assert _on_course(steady, 1e-6, sweeps_left=200)
    assert not _on_course(steady, 1e-6, sweeps_left=100)
    assert not _on_course([1.0] * (PATIENCE + 1), 1e-6, sweeps_left=10_000)  # stalled: noise
    assert not _on_course([1.0 + 0.01 * k for k in range(PATIENCE + 1)], 1e-6, sweeps_left=10_000)


def test_complete_passes_its_rank_to_the_exact_screen():
    from torchlowrank.matrix import complete

    g = torch.Generator().manual_seed(0)
    M = low_rank_target((400, 400), 10, generator=g)
    mask = random_mask((400, 400), 0.11, generator=g)
    res = complete(torch.where(mask, M, torch.nan), rank=10, sparse=True)
    assert res.history.selected == "ridge_polish" and res.rank == 10
    assert "exactly low rank: rank 10" in res.history.message
    assert float(torch.linalg.matrix_norm(res.matrix - M) / torch.linalg.matrix_norm(M)) < 1e-6


def test_the_screen_checks_its_fit_on_a_seeded_one_percent_of_the_held_out_entries():
    held = torch.zeros(500_000, dtype=torch.bool)
    held[::10] = True  # a 10 % hold-out
    check = check_entries(held, seed=3)
    assert int(check.sum()) == 5000 and not bool((check & ~held).any())
    assert torch.equal(check, check_entries(held, seed=3)) and not torch.equal(
        check, check_entries(held, seed=4)
    )
    few = torch.zeros(5000, dtype=torch.bool)
    few[:700] = True
    assert torch.equal(check_entries(few), few) and CHECK_MIN > 700  # fewer than CHECK_MIN: all of them


def test_exact_screen_finds_nothing_on_a_real_table():
    from sklearn.datasets import load_diabetes

    X = torch.from_numpy(load_diabetes().data)
    mask = torch.from_numpy(np.random.default_rng(0).random(X.shape) >= 0.2)
    assert fit_if_exactly_low_rank(*_entries(X, mask)) is None


def test_a_looser_tol_stops_the_exact_screen_sooner_at_that_accuracy():
    from torchlowrank.matrix import complete

    g = torch.Generator().manual_seed(3)
    M = low_rank_target((200, 150), 4, generator=g)
    mask = random_mask((200, 150), 0.3, generator=g)
    tight, loose = complete(M, mask), complete(M, mask, tol=1e-4)
    for res, bound in ((tight, 1e-8), (loose, 1e-3)):
        assert res.status == "converged" and "exactly low rank" in res.history.message
        err = torch.linalg.matrix_norm(res.matrix - M) / torch.linalg.matrix_norm(M)
        assert float(err) < bound
    assert tight.ridge_result.result.n_iters > loose.ridge_result.result.n_iters  # refit sweeps


def test_the_sparse_route_screens_the_rank_its_search_found_when_the_spectrum_shows_none(monkeypatch):
    from torchlowrank.matrix import complete, exact_screen

    monkeypatch.setattr(exact_screen, "candidate_ranks", lambda S, max_rank: [])  # a flat spectrum
    g = torch.Generator().manual_seed(5)
    M = low_rank_target((300, 200), 3, generator=g)
    mask = random_mask((300, 200), 0.3, generator=g)
    rows, cols = mask.nonzero(as_tuple=True)
    S = torch.sparse_coo_tensor(torch.stack([rows, cols]), M[rows, cols], tuple(M.shape)).coalesce()
    res = complete(S, sparse=True)
    assert res.status == "converged" and "rank 3 (the rank search's choice)" in res.history.message
    assert float(torch.linalg.matrix_norm(res.matrix - M) / torch.linalg.matrix_norm(M)) < 1e-8


def test_the_rank_search_stops_at_the_first_rank_that_fits_to_stop_at(monkeypatch):
    from torchlowrank.matrix import ridge_select

    g = torch.Generator().manual_seed(6)
    M = low_rank_target((300, 200), 3, generator=g)
    M = M + 1e-3 * M.std() * torch.randn(M.shape, generator=g, dtype=M.dtype)  # nearly exact
    E_fit, val = _entries(M, random_mask((300, 200), 0.3, generator=g))
    tried = []
    real_als = ridge_select.als

    def spy(*args, **kwargs):
        tried.append(args[2])  # the rank
        return real_als(*args, **kwargs)

    monkeypatch.setattr(ridge_select, "als", spy)
    rmse, fit = ridge_select.select_ridge_als(E_fit, val, stop_at=1e-2, tol=1e-4)
    assert fit.rank == 3 and tried == [1, 2, 3]
    tried.clear()
    ridge_select.select_ridge_als(E_fit, val, tol=1e-4)  # the default: fitting the noise is not exact
    assert tried[:3] == [1, 2, 3] and len(tried) > 3


def test_the_dense_route_screens_a_nearly_exact_searched_rank_when_the_spectrum_shows_none(monkeypatch):
    from torchlowrank.matrix import complete, exact_screen

    monkeypatch.setattr(exact_screen, "candidate_ranks", lambda S, max_rank: [])  # a flat spectrum
    g = torch.Generator().manual_seed(5)
    M = low_rank_target((300, 200), 3, generator=g)
    mask = random_mask((300, 200), 0.3, generator=g)
    res = complete(M, mask, max_iters=50, polish=False)  # a network far from exact: the ridge search decides
    assert res.status == "converged" and "rank 3 (the rank search's choice)" in res.history.message
    assert float(torch.linalg.matrix_norm(res.matrix - M) / torch.linalg.matrix_norm(M)) < 1e-8
