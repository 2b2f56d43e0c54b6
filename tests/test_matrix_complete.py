"""complete(): the one-call API, its input validation, divergence detection, early stopping, and
the soft-impute baseline."""

import math
import warnings

import pytest
import torch

import torchlowrank as tlr
from torchlowrank.matrix import (
    Completion,
    CompressedFactorization,
    complete,
    low_rank_target,
    random_mask,
    soft_impute,
    svt,
    train_gd,
)


def _data(d=40, r=2, frac=0.5, seed=11, shape=None):
    g = torch.Generator().manual_seed(seed)
    shape = shape or (d, d)
    M = low_rank_target(shape, r, generator=g)
    return M, random_mask(shape, frac, generator=g)


def test_complete_recovers_a_rectangular_low_rank_matrix():
    M, mask = _data(shape=(40, 30), frac=0.6)
    observed = torch.where(mask, M, torch.full_like(M, float("nan")))  # NaN off the mask is fine
    res = complete(
        observed,
        mask,
        depth=3,
        rank=2,
        init_scale=1e-2,
        truth=M,
        target_error=1e-6,
        max_iters=10_000,
        polish=False,
        ridge_polish=False,
    )  # the descent alone (the polish would finish first, by tol; ALS would take exact data first)
    assert res.matrix.shape == (40, 30)
    assert res.history.status == "converged" and res.history.reason == "target_error", res.history.message
    assert float(torch.linalg.matrix_norm(res.matrix - M) / torch.linalg.matrix_norm(M)) <= 1e-6
    assert res.rank == 2 and res.lr > 0


def test_uncompressed_complete_matches_history_fields():
    M, mask = _data(d=20, frac=0.6)
    with pytest.warns(RuntimeWarning, match="stalled at init|not converged"):
        res = complete(  # the network alone: no ridge ALS candidate to select instead
            M, mask, depth=2, compressed=False, truth=M, max_iters=200, eval_every=50, ridge_polish=False
        )
    h = res.history
    assert h.iterations == [0, 50, 100, 150, 200]
    assert len(h.train_loss) == len(h.recovery_error) == len(h.wall_time) == 5
    assert h.status in ("stalled_at_init", "not_converged") and h.train_loss[-1] <= h.train_loss[0]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda M, mk: (M, mk[:, :-1]), "same shape"),
        (lambda M, mk: (M, torch.zeros_like(mk)), "no entries"),
        (lambda M, mk: (torch.where(mk, torch.full_like(M, float("nan")), M), mk), "NaN"),
    ],
)
def test_bad_inputs_raise_value_errors_that_say_what_to_do(make, match):
    M, mask = _data(d=12)
    observed, mk = make(M, mask)
    with pytest.raises(ValueError, match=match):
        complete(observed, mk, rank=2)


def test_rank_too_large_for_the_matrix():
    M, mask = _data(d=12)
    with pytest.raises(ValueError, match=r"2\*rank = 14 > min\(shape\) = 12"):
        complete(M, mask, rank=7)


def test_divergence_is_detected_and_suggests_a_smaller_step():
    M, mask = _data(d=30)
    problem = Completion(M, mask, truth=M)
    comp = CompressedFactorization.from_problem(problem, 2, init_scale=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = train_gd(comp, problem, lr=1e6, max_iters=1000, check_every=5)
    assert any(issubclass(w.category, RuntimeWarning) for w in caught)
    assert h.status == "diverged" and h.n_iters < 1000
    assert "smaller step" in h.message and any("smaller step" in str(w.message) for w in caught)


def test_early_stopping_restores_the_best_validation_parameters():
    M, mask = _data(d=30, frac=0.5)
    noisy = M + 0.3 * torch.randn(M.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    val_mask = random_mask(M.shape, 0.2, generator=torch.Generator().manual_seed(1)) & ~mask
    r, c = val_mask.nonzero(as_tuple=True)
    res = complete(
        noisy,
        mask,
        rank=5,
        validation=(r, c, M[r, c]),
        patience=3,
        eval_every=20,
        max_iters=6000,
        init_scale=1e-2,
    )
    h = res.history
    assert h.best_iteration is not None and h.status == "early_stopped", h.message
    val_now = float((res.matrix[r, c] - M[r, c]).square().mean().sqrt())  # in the data's units
    assert math.isclose(val_now, min(h.val_rmse), rel_tol=1e-9)
    assert h.best_iteration >= h.escaped_at  # patience counted only after the escape


def test_svt_is_the_prox_of_the_nuclear_norm():
    A = torch.randn(12, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(A)
    lam = float(s[3])
    Z = svt(A, lam)
    torch.testing.assert_close(torch.linalg.svdvals(Z)[:3], s[:3] - lam, rtol=1e-10, atol=1e-12)
    assert int((torch.linalg.svdvals(Z) > 1e-10).sum()) == 3


def test_soft_impute_completes_an_easy_matrix():
    M, mask = _data(d=30, r=2, frac=0.6)
    Z = soft_impute(M, mask, lam=0.05, max_rank=None, max_iters=2000, tol=1e-9)
    assert float(torch.linalg.matrix_norm(Z - M) / torch.linalg.matrix_norm(M)) < 0.05


def test_public_api_is_reachable_from_the_package():
    assert tlr.matrix.complete is complete
