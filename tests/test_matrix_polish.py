"""complete()'s adaptive step and exact polish (issue 11): the bold-driver step leaves the initial
plateau sooner and never raises the loss; the polish finishes at the rank the network picked, only
when the polished solution fits to tol (the trainer re-checks it), and never on noisy data."""

import warnings

import pytest
import torch

from torchlowrank.experiments.unknown_rank import make_problem
from torchlowrank.matrix import (
    Completion,
    CompressedFactorization,
    complete,
    low_rank_target,
    random_mask,
    relative_error,
    suggest_lr,
    train_gd,
)
from torchlowrank.matrix.polish import escaped_rank


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failure status would fail the test
        return fn(*args, **kwargs)


def _data(shape=(40, 30), r=2, frac=0.6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return low_rank_target(shape, r, generator=g), random_mask(shape, frac, generator=g)


def test_escaped_rank_counts_the_singular_values_above_the_first_clear_gap():
    assert escaped_rank(torch.tensor([10.0, 5.0, 1.0, 1e-6, 1e-7])) == 3
    assert escaped_rank(torch.tensor([10.0, 1e-5, 1e-8])) == 1
    assert escaped_rank(torch.tensor([10.0, 5.0, 1.0, 0.5])) is None  # no gap: nothing to trust yet
    assert escaped_rank(torch.tensor([10.0, 1e-6, 1e-7]), floor=1e-4) == 1
    # a slow decay (no gap) reaching below floor * s_1 is not trusted either
    assert escaped_rank(torch.tensor([10.0, 1.0, 0.1, 1e-2, 1e-3, 1e-4, 1e-12]), floor=1e-4) is None


def test_a_decaying_spectrum_recovers_with_default_arguments_long_before_the_budget():
    # the 4th case of the unknown-rank reproduction: rank 5, singular values 10..1, offset 3
    M, mask = make_problem((120, 120), 5, 0.5, 1.0, 3.0, "decay", 3)
    res = _quiet(complete, M, mask)
    h = res.history
    assert res.status == "converged" and h.reason == "tol" and h.polished_at is not None, h.message
    assert relative_error(res.matrix, M) <= 1e-6
    assert h.n_iters <= 2000 < 20_000  # the budget is max_iters=20k
    # the polished network is the completed matrix (the result is read from the network)
    X, Bt = res.model.factor_pair()
    assert torch.linalg.matrix_rank(X @ Bt.T, rtol=1e-8) == 5


@pytest.mark.slow
def test_the_adaptive_step_escapes_sooner_than_the_fixed_step_and_never_raises_the_loss():
    M, mask = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # the network alone (ridge_polish=False: the exact screen would take this exact data first)
        fixed = complete(M, mask, rank=2, adaptive=False, polish=False, max_iters=9000, ridge_polish=False)
    bold = _quiet(complete, M, mask, rank=2, polish=False, truth=M, max_iters=9000, ridge_polish=False)
    assert fixed.history.escaped_at is not None and bold.history.escaped_at * 10 <= fixed.history.escaped_at
    loss = bold.history.train_loss
    assert all(b <= a * (1 + 1e-9) for a, b in zip(loss, loss[1:]))  # monotone up to rounding
    assert bold.ok and relative_error(bold.matrix, M) <= 1e-6


def test_the_trainer_rejects_a_polish_that_does_not_fit_and_descends_on():
    M, mask = _data()
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    M = (U[:, :2] @ Vh[:2]) * 35**0.5  # equal singular values: descent's last phase is fast
    problem = Completion(M, mask, truth=M)

    class Claims:  # writes a "solution" that fits nothing and says it fits (the first three times)
        calls = 0

        def __call__(self, t, model, problem, target_loss):
            if self.calls == 3:
                return None
            self.calls += 1
            for p in model.factor_parameters():
                p.zero_()
            return "claims to fit"

    model = CompressedFactorization.from_problem(
        problem, 2, init_scale=1e-2, generator=torch.Generator().manual_seed(0)
    )
    polish = Claims()
    h = _quiet(
        train_gd,
        model,
        problem,
        suggest_lr(problem, 3),
        max_iters=20_000,
        tol=1e-6,
        adaptive=True,
        polish=polish,
    )
    assert polish.calls == 3 and h.polished_at is None and "rejected" in h.polish_info
    assert h.status == "converged" and h.reason == "tol"
    assert problem.recovery_error(model.end_to_end()) <= 1e-5


def _noisy_data():
    """The rank-3 test matrix plus 5% Gaussian noise: no exact low-rank fit exists."""
    M, mask = _data(frac=0.7)
    return M + 0.05 * M.std() * torch.randn(
        M.shape, generator=torch.Generator().manual_seed(5), dtype=M.dtype
    ), mask


def test_noisy_data_is_never_polished():
    noisy, mask = _noisy_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = complete(noisy, mask, rank=4, max_iters=1500)
    assert res.history.polished_at is None and res.history.reason != "tol"


def test_the_holdout_check_accepts_the_true_rank_and_refuses_a_spurious_direction():
    from torchlowrank.matrix.polish import RankPolish

    M, mask = _data(shape=(30, 40), frac=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem = complete(
            M, mask, rank=4, max_iters=0, holdout=0
        ).problem  # the normalised problem on all entries
    pol = RankPolish()
    W, Y = pol._dense_problem(problem)
    b, c = problem.b.clone(), problem.c.clone()
    # exact rank-2 factors of the normalised residual, from the full truth
    T = (M - problem.mu) / problem.unit - b[:, None] - c[None, :]
    Ut, St, Vth = torch.linalg.svd(T, full_matrices=False)
    U, V = Ut[:, :2] * St[:2].sqrt(), Vth[:2].T * St[:2].sqrt()
    target = 1e-18 * float(problem.y.square().sum())
    ok, err = pol._holdout_check(problem, W, Y, U, V, b, c, 1e-12, target)
    assert ok and err <= 1e-6
    g = torch.Generator().manual_seed(1)
    U3 = torch.cat([U, 0.5 * torch.randn(U.shape[0], 1, generator=g, dtype=U.dtype)], 1)
    V3 = torch.cat([V, 0.5 * torch.randn(V.shape[0], 1, generator=g, dtype=V.dtype)], 1)
    ok3, err3 = pol._holdout_check(problem, W, Y, U3, V3, b, c, 1e-12, target)  # rank 3: fits, predicts badly
    assert not ok3 and err3 > 1e-3


def test_weight_decay_in_complete_starts_at_the_escape_and_shrinks_the_fit():
    noisy, mask = _noisy_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        plain = complete(noisy, mask, rank=4, max_iters=1500)
        decayed = complete(noisy, mask, rank=4, max_iters=1500, weight_decay=1e-3)
    assert decayed.history.escaped_at is not None  # weight decay from iteration 0 would hold the init at zero
    X, Bt = plain.model.factor_pair()
    Xd, Btd = decayed.model.factor_pair()
    assert torch.linalg.matrix_norm(Xd @ Btd.T, ord="nuc") < torch.linalg.matrix_norm(X @ Bt.T, ord="nuc")
