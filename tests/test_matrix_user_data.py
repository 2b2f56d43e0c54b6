"""complete() on a user's data (issue 11): invariant to units and offset, tall == wide, stops when
done, honest statuses with warnings, sparse / NumPy inputs, unobserved rows, no side effects, and
the ALS / soft-impute / mean-model baselines."""

import importlib
import math
import warnings

import numpy as np
import pytest
import torch

import torchlowrank as tlr
from torchlowrank.matrix import (
    als,
    complete,
    fit_mean_model,
    low_rank_target,
    random_mask,
    relative_error,
    soft_impute,
    soft_impute_path,
    train_gd,
)


def _data(shape=(40, 30), r=2, frac=0.6, seed=3, well_conditioned=False):
    g = torch.Generator().manual_seed(seed)
    M = low_rank_target(shape, r, generator=g)
    if well_conditioned:  # equal singular values: gradient descent's final phase is fast
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)
        M = (U[:, :r] @ Vh[:r]) * (shape[0] * shape[1]) ** 0.25
    return M, random_mask(shape, frac, generator=g)


def _quiet_complete(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failure status here would fail the test
        return complete(*args, **kwargs)


@pytest.mark.parametrize("offset", [0.0, 3.0])
@pytest.mark.slow
def test_complete_gives_the_same_relative_error_at_every_scale_from_1e_minus4_to_1e4(offset):
    M, mask = _data(well_conditioned=True)
    runs = {}
    for scale in (1e-4, 1.0, 1e4):
        X = scale * M + offset * scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = complete(X, mask, rank=2, init_scale=1e-2, truth=X, max_iters=2500, tol=0, ftol=0)
        runs[scale] = (relative_error(res.matrix, X), res.history.escaped_at)
    errs = [e for e, _ in runs.values()]
    assert max(errs) < 1e-3, runs
    assert max(errs) <= (1 + 1e-3) * min(errs), runs  # the same run, up to rounding
    assert len({esc for _, esc in runs.values()}) == 1, runs


def test_complete_with_default_arguments_recovers_a_mean_shifted_matrix_and_stops_early():
    M, mask = _data(shape=(50, 40), r=2, frac=0.5, seed=5, well_conditioned=True)
    X = 3.0 + 0.7 * M / M.std()  # ratings-like: a large offset, unit-variance low-rank part
    res = _quiet_complete(X, mask, truth=X, max_iters=60_000, tol=1e-7)
    assert relative_error(res.matrix, X) <= 1e-6
    assert res.status == "converged" and res.history.n_iters < 30_000, res.history.message


def test_a_tall_matrix_recovers_exactly_like_its_transpose():
    M, mask = _data(shape=(60, 24), r=2, frac=0.6, seed=7, well_conditioned=True)
    net = dict(rank=3, init_scale=1e-2, max_iters=30_000, target_error=1e-6, ridge_polish=False)
    tall = _quiet_complete(M, mask, truth=M, **net)  # the network alone: it runs on the wide side
    wide = _quiet_complete(M.T, mask.T, truth=M.T, **net)
    assert tall.transposed and not wide.transposed
    assert relative_error(tall.matrix, M) <= 1e-6 and relative_error(wide.matrix, M.T) <= 1e-6
    torch.testing.assert_close(tall.matrix, wide.matrix.T, rtol=0, atol=1e-6 * float(M.abs().max()))
    tall, wide = _quiet_complete(M, mask), _quiet_complete(M.T, mask.T)  # the defaults: exact ALS
    assert tall.history.selected == wide.history.selected == "ridge_polish"
    torch.testing.assert_close(tall.matrix, wide.matrix.T, rtol=0, atol=1e-6 * float(M.abs().max()))


def test_a_run_that_cannot_leave_the_init_in_its_budget_warns_stalled_at_init():
    M, mask = _data()
    with pytest.warns(RuntimeWarning, match="stalled at init"):
        # the adaptive step escapes in ~100 iterations; ridge_polish=False: the network alone
        res = complete(M, mask, rank=2, max_iters=20, ridge_polish=False)
    assert res.status == "stalled_at_init" and not res.ok and res.history.escaped_at is None


def test_a_run_stopped_while_still_improving_warns_not_converged():
    M, mask = _data()
    with pytest.warns(RuntimeWarning, match="not converged"):
        res = complete(M, mask, rank=2, init_scale=1e-2, max_iters=1500, tol=1e-14, ridge_polish=False)
    assert res.status == "not_converged" and res.history.escaped_at is not None


def test_time_limit_passes_through_complete():
    M, mask = _data()
    with pytest.warns(RuntimeWarning):
        res = complete(M, mask, rank=2, time_limit=0.0, max_iters=10_000)
    assert res.history.reason == "time_limit" and res.history.n_iters < 10_000


def test_patience_does_not_fire_during_the_initial_plateau():
    M, mask = _data(frac=0.5, well_conditioned=True)
    val = random_mask(M.shape, 0.2, generator=torch.Generator().manual_seed(1)) & ~mask
    r, c = val.nonzero(as_tuple=True)
    res = _quiet_complete(
        M,
        mask,
        rank=2,
        init_scale=1e-2,
        validation=(r, c, M[r, c]),
        patience=2,
        eval_every=20,
        max_iters=20_000,
        truth=M,
        tol=1e-6,
        adaptive=False,
    )  # fixed step: a long plateau
    h = res.history
    assert h.escaped_at is not None and h.escaped_at > 100  # a plateau long enough to trip patience=2
    assert relative_error(res.matrix, M) < 1e-3, h.message


def test_unobserved_rows_and_columns_get_the_mean_model_and_a_warning():
    M, mask = _data(frac=0.7)
    X = 2.0 + M
    mask = mask.clone()
    mask[5] = False
    mask[:, 7] = False
    with pytest.warns(UserWarning, match="1 rows and 1 columns have no observed entry"):
        res = complete(X, mask, rank=3, init_scale=1e-2, max_iters=3000)
    mm = res.mean_model
    assert mm.row[5] == 0 and mm.col[7] == 0
    torch.testing.assert_close(res.matrix[5], mm.mu + mm.col, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.matrix[:, 7], mm.mu + mm.row, rtol=0, atol=1e-12)


def test_sparse_coo_and_csr_inputs_give_the_dense_result():
    M, mask = _data()
    dense = complete(M, mask, rank=2, max_iters=300, tol=0, ftol=0, init_scale=1e-2)
    Mz = torch.where(mask, M, torch.zeros(()))
    idx = mask.nonzero().T
    coo = torch.sparse_coo_tensor(idx, M[mask], M.shape)
    for sp in (coo, coo.to_sparse_csr()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = complete(sp, rank=2, max_iters=300, tol=0, ftol=0, init_scale=1e-2)
        torch.testing.assert_close(res.matrix, dense.matrix, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="mask=None"):
        complete(Mz.to_sparse(), mask, rank=2)


def test_numpy_integers_are_accepted_and_bad_ranks_say_what_to_do():
    M, mask = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = complete(M.numpy(), mask.numpy(), depth=np.int64(3), rank=np.int32(2), max_iters=20)
    assert res.rank == 2 and isinstance(res.rank, int)
    with pytest.raises(ValueError, match="positive int"):
        complete(M, mask, rank=2.5)
    with pytest.raises(ValueError, match="positive int"):
        complete(M, mask, depth=True)
    with pytest.raises(ValueError, match="compressed=False"):
        complete(M, mask, rank=3, compressed=False)


def test_complete_allocates_on_the_inputs_device_not_the_default_device():
    M, mask = _data()
    with torch.device("meta"):  # any allocation that ignores the input's device lands here and fails
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = complete(M, mask, rank=2, max_iters=50, eval_every=10, truth=M)
    assert res.matrix.device.type == "cpu" and torch.isfinite(res.matrix).all()


def test_importing_the_matrix_problems_sets_no_global_warning_filter():
    from torchlowrank.matrix import problems

    before = list(warnings.filters)
    importlib.reload(problems)
    assert warnings.filters == before


def test_train_gd_leaves_the_thread_count_alone(monkeypatch):
    from torchlowrank.matrix import Completion, CompressedFactorization

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    M, mask = _data()
    pr = Completion(M, mask)
    model = CompressedFactorization.from_problem(pr, 2, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train_gd(model, pr, 1.0, max_iters=20)
        complete(M, mask, rank=2, max_iters=20)
    assert calls == []


def test_als_recovers_at_the_true_rank_at_any_scale_and_solves_its_ridge_normal_equations():
    M, mask = _data(shape=(50, 40), frac=0.5)
    for scale in (1e-4, 1e4):
        res = als(scale * M, mask, 2)
        assert res.status == "converged" and relative_error(res.matrix, scale * M) < 1e-8
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = als(M, mask, 3, reg=0.1, max_iters=5)
    W = mask.double()
    # the last half-sweep solved (V, c) exactly given (U, b): the ridge objective's gradients in V and c are
    # zero (model mu + b_i + c_j + U_i . V_j, ridge lam on U, V and bias_reg on b, c)
    R = W * (res.matrix - M)
    gV = R.T @ res.U + res.lam * res.V
    gc = R.sum(0) + res.bias_reg * res.col_bias
    assert res.lam > 0 and res.bias_reg > 0
    assert float(gV.abs().max()) < 1e-9 * float((W * M).abs().max() * res.U.abs().max())
    assert float(gc.abs().max()) < 1e-9 * float((W * M).abs().max())


def test_soft_impute_warns_when_it_stops_unconverged_and_the_path_picks_the_best_lam():
    M, mask = _data()
    with pytest.warns(RuntimeWarning, match="not converged"):
        soft_impute(M, mask, lam=0.01, max_iters=3, tol=1e-12)
    val = random_mask(M.shape, 0.3, generator=torch.Generator().manual_seed(2)) & ~mask
    r, c = val.nonzero(as_tuple=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        Z, lam, path = soft_impute_path(M, mask, (r, c, M[r, c]), max_iters=100)
    best = min(path, key=lambda d: d["val_rmse"])
    assert lam == best["lam"] and math.isclose(
        float((Z[r, c] - M[r, c]).square().mean().sqrt()), best["val_rmse"]
    )
    assert [d["lam"] for d in path] == sorted((d["lam"] for d in path), reverse=True)


def test_mean_model_recovers_an_additive_matrix_exactly():
    g = torch.Generator().manual_seed(0)
    b, c = (
        torch.randn(20, generator=g, dtype=torch.float64),
        torch.randn(15, generator=g, dtype=torch.float64),
    )
    A = 4.0 + b[:, None] + c[None, :]
    r, cc = torch.ones(20, 15, dtype=torch.bool).nonzero(as_tuple=True)
    mm = fit_mean_model(r, cc, A[r, cc], (20, 15), reg=0.0, sweeps=50)
    torch.testing.assert_close(mm.dense(), A, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="center"):
        fit_mean_model(r, cc, A[r, cc], (20, 15), center="median")


def test_baselines_are_reachable_from_the_package():
    assert tlr.matrix.als is als and tlr.matrix.soft_impute_path is soft_impute_path
