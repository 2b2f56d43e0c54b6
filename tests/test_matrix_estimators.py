"""Issue 21: held-out validation by default (never worse than the mean model, honest warnings),
ALS / soft-impute that work by default on real noisy data, sparse observed-entry arithmetic
(checked against dense float64), time limits honoured, and one estimator interface."""

import time
import warnings

import numpy as np
import pytest
import torch

from torchlowrank.matrix import (
    ALSCompleter,
    DeepMatrixCompleter,
    MeanModel,
    SoftImputeCompleter,
    als,
    complete,
    low_rank_target,
    random_mask,
    relative_error,
    soft_impute_path,
)
from torchlowrank.matrix.sparse import Entries, entry_dots, sparse_top_svd

pytestmark = pytest.mark.usefixtures("one_thread")


def _diabetes(hidden=0.2, seed=0):
    from sklearn.datasets import load_diabetes

    X = load_diabetes().data
    X = (X - X.mean(0)) / X.std(0)
    hide = np.random.default_rng(seed).random(X.shape) < hidden
    return torch.from_numpy(X), torch.from_numpy(~hide), torch.from_numpy(hide)


def _hidden_error(P, M, hide):
    return float((P[hide] - M[hide]).norm() / M[hide].norm())


def _column_means(M, mask):
    return torch.where(mask, M, torch.nan).nanmean(0).expand_as(M)


@pytest.mark.slow
def test_default_complete_on_a_real_noisy_table_beats_column_means_and_the_unvalidated_run():
    M, mask, hide = _diabetes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = complete(M, mask, max_iters=3000)
    base = _hidden_error(_column_means(M, mask), M, hide)
    err = _hidden_error(res.matrix, M, hide)
    assert res.status in ("early_stopped", "mean_model", "converged"), res.history.message
    assert res.history.selected in ("network", "ridge_polish", "blend", "mean_model")
    assert res.history.selected != "ridge_polish" or res.history.reason == "ridge_polish"
    assert err <= base, (err, base)
    h = res.history
    assert h.holdout_rmse is not None and h.mean_model_rmse is not None and h.val_rmse
    # no warning tells the user to run longer when the held-out error was rising
    assert not any("raise max_iters" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        unvalidated = complete(M, mask, max_iters=3000, holdout=0)
    assert err < _hidden_error(unvalidated.matrix, M, hide)


def test_pure_noise_falls_back_to_the_mean_model_and_says_what_helps():
    g = torch.Generator().manual_seed(0)
    m, n = 60, 40
    b = torch.randn(m, 1, generator=g, dtype=torch.float64)
    noise = 3.0 + b + torch.randn(m, n, generator=g, dtype=torch.float64)  # row biases + noise: no low rank
    mask = random_mask((m, n), 0.5, generator=g)
    with pytest.warns(RuntimeWarning, match="did not beat the mean model") as rec:
        res = complete(noise, mask, max_iters=3000)
    assert res.status == "mean_model" and not res.ok
    assert any("more iterations will not" in str(w.message) for w in rec)
    torch.testing.assert_close(res.matrix, res.mean_model.dense())
    assert res.history.holdout_rmse >= res.history.mean_model_rmse


def test_exact_low_rank_data_still_recovers_to_1e_minus_9_with_the_default_holdout():
    g = torch.Generator().manual_seed(4)
    M = 2.0 + low_rank_target((60, 50), 3, generator=g)
    mask = random_mask((60, 50), 0.5, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = complete(M, mask)
    assert res.status == "converged" and relative_error(res.matrix, M) < 1e-8, res.history.message
    # found by the exact screen: plain ALS at the rank the spectrum shows, validated on held-out entries
    assert (
        res.history.selected == "ridge_polish" and res.rank == 3 and "exactly low rank" in res.history.message
    )
    assert res.history.ridge_polish_rmse < 1e-6 * float(M.std()) < res.history.mean_model_rmse


def test_als_default_ridge_works_on_real_noisy_data_where_no_ridge_overfits():
    M, mask, hide = _diabetes()
    res = als(M, mask, 5)
    assert res.status == "converged" and res.reg > 1e-3 and res.reg_path
    err = _hidden_error(res.matrix, M, hide)
    assert err < _hidden_error(_column_means(M, mask), M, hide) - 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        noridge = als(M, mask, 5, reg=1e-10, max_iters=200)
    assert err < 0.8 * _hidden_error(noridge.matrix, M, hide)


def test_soft_impute_path_holds_out_entries_by_default_and_honours_its_time_limit():
    M, mask, hide = _diabetes()
    Z, lam, path = soft_impute_path(M, mask)
    assert lam > 0 and path and _hidden_error(Z, M, hide) < _hidden_error(_column_means(M, mask), M, hide)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        soft_impute_path(M, mask, max_iters=100_000, tol=0.0, time_limit=0.5)
    assert time.perf_counter() - t0 < 0.5 * 1.3 + 0.2


def _sparse_problem(m=37, n=29, N=300, q=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(m * n, generator=g)[:N]
    rows, cols = flat // n, flat % n
    keep = rows != 0  # row 0 has no observed entry
    rows, cols = rows[keep], cols[keep]
    vals = torch.randn(rows.numel(), generator=g, dtype=torch.float64)
    return (
        Entries(rows, cols, vals, (m, n)),
        torch.randn(n, q, generator=g, dtype=torch.float64),
        torch.randn(m, q, generator=g, dtype=torch.float64),
    )


def test_sparse_products_and_top_svd_equal_their_dense_float64_definitions():
    E, F, Fm = _sparse_problem()
    m, n = E.shape
    R = torch.zeros(m, n, dtype=torch.float64)
    R[E.rows, E.cols] = E.values
    torch.testing.assert_close(E.matmul(E.values, F), R @ F, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(E.rmatmul(E.values, Fm), R.T @ Fm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entry_dots(Fm, F, E.rows, E.cols, chunk=7), (Fm @ F.T)[E.rows, E.cols])
    U, S, V = sparse_top_svd(E, E.values, 3, generator=torch.Generator().manual_seed(1), power_iters=8)
    torch.testing.assert_close(S, torch.linalg.svdvals(R)[:3], rtol=1e-6, atol=0)


@pytest.mark.parametrize("n_entries", [50, 2000])  # gathered in chunks / from the formed product
def test_entry_dots_equals_the_dense_product_at_the_entries_on_both_of_its_paths(n_entries):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(300, 5, dtype=torch.float64, generator=g)
    B = torch.randn(200, 5, dtype=torch.float64, generator=g)
    rows, cols = (
        torch.randint(0, 300, (n_entries,), generator=g),
        torch.randint(0, 200, (n_entries,), generator=g),
    )
    torch.testing.assert_close(
        entry_dots(A, B, rows, cols, chunk=7), (A @ B.T)[rows, cols], rtol=1e-12, atol=1e-12
    )


@pytest.mark.slow
def test_als_on_a_sparse_matrix_far_too_large_to_densify_recovers_it():
    # 200,000 x 100,000 (dense: 160 GB): only the 60,000 observed entries and (m + n) x r factors are stored
    m, n, r, N = 200_000, 100_000, 2, 60_000
    g = torch.Generator().manual_seed(0)
    # a rank-2 matrix supported on a 1,000 x 800 block of rows / columns spread over the matrix
    ri = torch.randperm(m, generator=g)[:1000]
    ci = torch.randperm(n, generator=g)[:800]
    A = torch.randn(1000, r, generator=g, dtype=torch.float64)
    B = torch.randn(800, r, generator=g, dtype=torch.float64)
    flat = torch.randperm(1000 * 800, generator=g)[:N]
    lr, lc = flat // 800, flat % 800
    vals = (A[lr] * B[lc]).sum(1)
    X = torch.sparse_coo_tensor(torch.stack([ri[lr], ci[lc]]), vals, (m, n))
    test = torch.randperm(1000 * 800, generator=g)[:2000]
    tr, tc = test // 800, test % 800
    res = als(X, None, r, reg=1e-10, max_iters=300, warn=False)
    pred = res.predict(ri[tr], ci[tc])
    truth = (A[tr] * B[tc]).sum(1)
    assert float((pred - truth).norm() / truth.norm()) < 1e-4
    assert res.U.shape == (m, r) and res.V.shape == (n, r)


def test_als_sparse_and_dense_inputs_agree_and_float32_is_close():
    g = torch.Generator().manual_seed(2)
    M = low_rank_target((40, 30), 2, generator=g)
    mask = random_mask((40, 30), 0.5, generator=g)
    dense = als(M, mask, 2)
    idx = mask.nonzero().T
    sp = als(torch.sparse_coo_tensor(idx, M[mask], M.shape), None, 2)
    torch.testing.assert_close(sp.matrix, dense.matrix, rtol=0, atol=1e-10)
    f32 = als(M, mask, 2, dtype=torch.float32, warn=False)
    assert f32.U.dtype == torch.float32 and relative_error(f32.matrix.double(), M) < 1e-3


@pytest.mark.parametrize("limit", [0.5, 1.5])
@pytest.mark.parametrize("method", ["als", "complete"])
def test_time_limits_are_honoured_by_als_and_complete(limit, method):
    g = torch.Generator().manual_seed(0)
    M = low_rank_target((600, 400), 8, generator=g) + 0.1 * torch.randn(
        600, 400, generator=g, dtype=torch.float64
    )
    mask = random_mask((600, 400), 0.3, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t0 = time.perf_counter()
        if method == "als":  # no ridge on noisy data: ALS creeps on for thousands of sweeps
            res = als(M, mask, 30, reg=1e-10, max_iters=100_000, tol=0.0, warn=False, time_limit=limit)
            reason = res.reason
        else:
            res = complete(M, mask, max_iters=10**7, tol=0.0, holdout=0, time_limit=limit)
            reason = res.history.reason
        wall = time.perf_counter() - t0
    assert reason == "time_limit"
    assert wall <= 1.1 * limit + 0.25, wall  # within 10% (plus the final bookkeeping on a shared machine)


@pytest.mark.parametrize(
    "make",
    [
        lambda: DeepMatrixCompleter(max_iters=2000),
        lambda: ALSCompleter(rank=3),
        lambda: SoftImputeCompleter(),
        lambda: MeanModel(),
    ],
)
def test_every_estimator_has_one_interface(make):
    M, mask, hide = _diabetes()
    est = make()
    params = est.get_params()
    assert make().get_params() == params  # constructor arguments stored as given
    if not isinstance(est, MeanModel):
        with pytest.raises(ValueError, match="not fitted"):
            est.predict(torch.tensor([0]), torch.tensor([0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert est.fit(M, mask) is est
    r, c = hide.nonzero(as_tuple=True)
    pred = est.predict(r, c)
    C = est.transform()
    assert C.shape == M.shape and est.completed_.shape == M.shape
    torch.testing.assert_close(pred, C[r, c])
    assert isinstance(est.n_iter_, int) and est.history_ is not None
    assert _hidden_error(C, M, hide) <= _hidden_error(_column_means(M, mask), M, hide) + 1e-9


def test_als_and_the_estimators_allocate_on_the_inputs_device_and_leave_the_global_rng_alone():
    g = torch.Generator().manual_seed(5)
    M = low_rank_target((30, 24), 2, generator=g)
    mask = random_mask((30, 24), 0.6, generator=g)
    state = torch.random.get_rng_state()
    with torch.device("meta"):  # an allocation that ignores the input's device lands here and fails
        res = als(M, mask, 2)
        est = ALSCompleter(rank=2).fit(M, mask)
        mm = MeanModel().fit(M, mask)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (
        res.U.device.type == "cpu"
        and est.completed_.device.type == "cpu"
        and mm.completed_.device.type == "cpu"
    )
    assert relative_error(res.matrix, M) < 1e-8


def test_train_gd_options_are_one_validated_config():
    from torchlowrank.matrix import Completion, CompressedFactorization, train_gd
    from torchlowrank.matrix.trainer import GDConfig, final_status

    g = torch.Generator().manual_seed(0)
    M = low_rank_target((20, 16), 2, generator=g)
    pr = Completion(M, random_mask((20, 16), 0.6, generator=g))

    def make():
        return CompressedFactorization.from_problem(
            pr, 2, init_scale=1e-2, generator=torch.Generator().manual_seed(0)
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a = train_gd(make(), pr, 1.0, max_iters=200, adaptive=True)
        b = train_gd(make(), pr, 1.0, config=GDConfig(max_iters=200, adaptive=True))
    assert a.train_loss == b.train_loss and a.status == b.status
    with pytest.raises(ValueError, match="unknown train_gd option"):
        train_gd(make(), pr, 1.0, max_iter=5)
    with pytest.raises(ValueError, match="not both"):
        train_gd(make(), pr, 1.0, config=GDConfig(), max_iters=5)
    with pytest.raises(ValueError, match="grow"):
        train_gd(make(), pr, 1.0, adaptive=True, grow=0.5)
    assert [final_status(r, True) for r in ("blowup", "tol", "patience", "max_iters")] == [
        "diverged",
        "converged",
        "early_stopped",
        "not_converged",
    ]
    assert final_status("time_limit", False) == "stalled_at_init"


@pytest.mark.parametrize("fit_biases", [True, False])
def test_the_polish_sparse_als_equals_its_dense_definition(fit_biases):
    from torchlowrank.matrix.polish import als_with_biases, als_with_biases_entries

    g = torch.Generator().manual_seed(3)
    m, n, k = 30, 25, 3
    Y = low_rank_target((m, n), 4, generator=g) + 0.3
    mask = random_mask((m, n), 0.5, generator=g)
    W = mask.double()
    rows, cols = mask.nonzero(as_tuple=True)
    E = Entries(rows, cols, Y[rows, cols], (m, n))
    U0 = torch.randn(m, k, generator=g, dtype=torch.float64)
    V0 = torch.randn(n, k, generator=g, dtype=torch.float64)
    b0 = 0.1 * torch.randn(m, generator=g, dtype=torch.float64)
    c0 = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    kw = dict(lam=0.05, bias_reg=0.5, fit_biases=fit_biases, target_sse=0.0, max_sweeps=7, min_gain=2.0)
    dense = als_with_biases(W, Y, U0, V0, b0, c0, **kw)
    sparse = als_with_biases_entries(E, Y[rows, cols], U0, V0, b0, c0, **kw)
    for a, s in zip(dense[:4], sparse[:4]):
        torch.testing.assert_close(s, a, rtol=1e-9, atol=1e-11)
    assert sparse[5] == dense[5] == 7 and sparse[4] == pytest.approx(dense[4], rel=1e-9)


def test_als_warm_started_from_its_own_optimum_stays_there():
    M, mask, hide = _diabetes()
    first = als(M, mask, 3, reg=0.2, tol=1e-10, max_iters=2000)
    again = als(M, mask, 3, reg=0.2, tol=1e-10, init=first)
    assert first.status == again.status == "converged" and again.n_iters <= 3
    torch.testing.assert_close(again.matrix, first.matrix, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="init has factors"):
        als(M, mask, 4, reg=0.2, init=first)
