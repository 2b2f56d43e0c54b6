"""Dropout on a factorized linear model = singular-value thresholding (DESIGN §4.7)."""

import pytest
import torch

from torchlowrank.experiments.dropout_lowrank import (
    gd_on_regularizer,
    svt_closed_form,
    train_with_dropout,
    whitened_digits_regression,
)


def _objective(M, U, V, lam):
    return float(((M - U @ V.T) ** 2).sum() + lam * ((U * U).sum(0) * (V * V).sum(0)).sum())


@pytest.mark.parametrize("k,lam", [(4, 0.5), (6, 1.0), (3, 0.2), (6, 3.0)])
def test_closed_form_matches_deterministic_gd_on_the_equivalent_regularizer(k, lam):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(8, 6, generator=g, dtype=torch.float64)
    M = 2 * M / torch.linalg.svdvals(M)[0]
    s_cf, r, kappa = svt_closed_form(M, k, lam)
    U, V, _ = gd_on_regularizer(M, k, lam, lr=0.05)
    s_gd = torch.linalg.svdvals(U @ V.T)
    assert torch.allclose(s_gd, s_cf, atol=1e-6, rtol=0)
    # self-consistency: kappa = (lam / k) * ||W||_*, and the shrunk values are s_i(M) - kappa
    assert kappa == pytest.approx(lam / k * float(s_cf.sum()), rel=1e-12)
    s_M = torch.linalg.svdvals(M)
    assert torch.allclose(s_cf[:r], s_M[:r] - kappa, atol=1e-12)
    # the value of the objective at GD's point equals ||M - W*||^2 + (lam / k) ||W*||_*^2
    closed_value = float(((s_M - s_cf) ** 2).sum() + lam / k * s_cf.sum() ** 2)
    assert _objective(M, U, V, lam) == pytest.approx(closed_value, abs=1e-9)


def test_rank_is_capped_by_the_width_and_falls_with_stronger_dropout():
    M = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    ranks = [svt_closed_form(M, 3, lam)[1] for lam in (0.0, 0.3, 1.0, 3.0, 30.0)]
    assert ranks[0] == 3  # no dropout: best rank-3 approximation
    assert ranks == sorted(ranks, reverse=True) and ranks[-1] == 1


def test_whitened_inputs_make_the_expected_dropout_loss_the_regularised_objective():
    X, Y = whitened_digits_regression()
    n = len(X)
    assert torch.allclose(X.T @ X / n, torch.eye(X.shape[1], dtype=X.dtype), atol=1e-9)
    # E over masks of the dropout loss, by exact enumeration on a tiny width, equals the objective + const
    M = Y.T @ X / n
    g = torch.Generator().manual_seed(0)
    U, V = (
        torch.randn(Y.shape[1], 2, generator=g, dtype=torch.float64),
        torch.randn(X.shape[1], 2, generator=g, dtype=torch.float64),
    )
    theta = 0.6
    expected = 0.0
    for m1 in (0, 1):
        for m2 in (0, 1):
            p = (theta if m1 else 1 - theta) * (theta if m2 else 1 - theta)
            D = torch.diag(torch.tensor([m1, m2], dtype=torch.float64)) / theta
            expected += p * float(((Y - X @ V @ D @ U.T) ** 2).sum(1).mean())
    const = float((Y**2).sum(1).mean() - (M**2).sum())
    assert expected == pytest.approx(_objective(M, U, V, (1 - theta) / theta) + const, rel=1e-10)


def test_training_with_real_masks_lands_near_the_closed_form():
    X, Y = whitened_digits_regression()
    M = Y.T @ X / len(X)
    W, _ = train_with_dropout(X, Y, k=8, theta=0.5, steps=400, seed=0)
    s_cf, _, _ = svt_closed_form(M, 8, 1.0)
    s = torch.linalg.svdvals(W)
    assert (s - s_cf).abs().max() < 0.05 * float(s_cf[0])
