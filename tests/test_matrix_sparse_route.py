"""Issue 21: complete() chooses ridge ALS (rank, ridge, column scaling) on held-out entries beside
its network, and takes a sparse route — observed entries only, no (m, n) array — for matrices too
large to densify; sparse inputs (torch COO, SciPy) and predict(rows, cols) without the matrix."""

import warnings

import numpy as np
import pytest
import torch

from torchlowrank.matrix import als, complete
from torchlowrank.matrix.complete import DENSE_CELLS
from torchlowrank.matrix.ridge_select import ScaledALS, entry_scales, scaled_entries, select_ridge_als
from torchlowrank.matrix.sparse import Entries

pytestmark = pytest.mark.usefixtures("one_thread")


def _exact_entries(m, n, r, n_obs, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(m, r, generator=g, dtype=torch.float64)
    V = torch.randn(n, r, generator=g, dtype=torch.float64)
    idx = torch.randint(0, m * n, (n_obs,), generator=g).unique()
    rows, cols = idx // n, idx % n
    return U, V, rows, cols, (U[rows] * V[cols]).sum(1)


def _sparse(rows, cols, vals, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse invariant checks are disabled"
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, shape).coalesce()


def test_complete_recovers_a_matrix_far_too_large_to_densify_from_its_observed_entries_alone():
    m, n = 30_000, 20_000  # 6e8 cells: 4.8 GB as a dense float64 matrix; 20 to 30 entries per row / column
    U, V, rows, cols, vals = _exact_entries(m, n, 2, 600_000)
    assert m * n > DENSE_CELLS
    res = complete(_sparse(rows, cols, vals, (m, n)))
    assert res.model is None and res.history.selected == "ridge_polish" and res.rank == 2, res.history.message
    g = torch.Generator().manual_seed(1)
    tr, tc = torch.randint(0, m, (5000,), generator=g), torch.randint(0, n, (5000,), generator=g)
    truth = (U[tr] * V[tc]).sum(1)  # float64 reference at entries never observed
    pred = res.predict(tr, tc)
    assert pred.dtype == torch.float64
    assert float((pred - truth).norm() / truth.norm()) <= 1e-6


def test_the_sparse_route_accepts_scipy_and_torch_sparse_inputs_alike_and_refuses_holdout_zero():
    import scipy.sparse as sp

    U, V, rows, cols, vals = _exact_entries(300, 200, 3, 15_000)
    S = sp.csr_matrix((vals.numpy(), (rows.numpy(), cols.numpy())), shape=(300, 200))
    a = complete(S, sparse=True)
    b = complete(_sparse(rows, cols, vals, (300, 200)), sparse=True)
    r, c = torch.arange(300).repeat_interleave(200), torch.arange(200).repeat(300)
    assert torch.allclose(a.predict(r, c), b.predict(r, c), rtol=0, atol=1e-9)
    assert torch.allclose(a.matrix, (U @ V.T), rtol=0, atol=1e-6 * float((U @ V.T).abs().max()))
    with pytest.raises(ValueError, match="holdout > 0 or pass validation"):
        complete(S, sparse=True, holdout=0)


def test_the_sparse_route_on_pure_noise_returns_the_mean_model_with_a_warning():
    g = torch.Generator().manual_seed(0)
    m, n = 400, 300
    idx = torch.randperm(m * n, generator=g)[:24_000]
    rows, cols = idx // n, idx % n
    vals = 3.0 + torch.randn(idx.numel(), generator=g, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="did not beat the mean model"):
        res = complete(_sparse(rows, cols, vals, (m, n)), sparse=True)
    assert res.status == "mean_model" and res.history.selected == "mean_model"
    assert abs(float(res.predict(torch.tensor([0]), torch.tensor([0]))) - 3.0) < 0.5


def test_scaled_ridge_als_predicts_in_the_datas_units_and_equals_its_dense_matrix():
    from sklearn.datasets import load_breast_cancer

    X = torch.from_numpy(load_breast_cancer().data)  # raw: columns from 1e-3 to 1e3
    m, n = X.shape
    rows, cols = torch.arange(m).repeat_interleave(n), torch.arange(n).repeat(m)
    E = Entries(rows, cols, X.reshape(-1), (m, n))
    sc = entry_scales(E)
    assert sc is not None and torch.equal(sc[0], torch.ones(m))  # the columns are scaled, not the rows
    sd = X.std(0, unbiased=False)
    assert torch.allclose(sc[1], sd, rtol=1e-12)
    Es = scaled_entries(E, sc)
    assert torch.allclose(Es.values * sd[cols], E.values, rtol=1e-12)
    res = als(Es, None, 3, reg=0.05)
    fit = ScaledALS(res, *sc)
    assert torch.allclose(fit.predict(rows, cols), fit.dense().reshape(-1), rtol=1e-12, atol=0)
    assert torch.allclose(fit.dense(), res.matrix * sd[None, :], rtol=1e-12, atol=0)
    # a table whose columns share one scale is not rescaled
    Z = torch.randn(200, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r2, c2 = torch.arange(200).repeat_interleave(20), torch.arange(20).repeat(200)
    assert entry_scales(Entries(r2, c2, Z.reshape(-1), (200, 20))) is None


def test_the_rank_search_stops_at_the_true_rank_of_exact_data():
    U, V, rows, cols, vals = _exact_entries(600, 400, 5, 40_000)
    E = Entries(rows, cols, vals, (600, 400))
    hold = torch.zeros(len(E), dtype=torch.bool)
    hold[::10] = True
    best = select_ridge_als(E.subset(~hold), (rows[hold], cols[hold], vals[hold]))
    assert best is not None and best[1].rank == 5 and not best[1].scaled
    assert best[0] <= 1e-6 * float(vals.std())


@pytest.mark.slow
def test_default_complete_on_raw_breast_cancer_is_no_worse_than_als_tuned_over_ranks():
    """The raw table's columns differ in scale by 10^4: complete() must not lose to ridge ALS with
    its rank and ridge tuned on a validation split (the issue's baseline), on entries it never saw."""
    from sklearn.datasets import load_breast_cancer

    X = torch.from_numpy(load_breast_cancer().data)
    hide = torch.from_numpy(np.random.default_rng(1).random(X.shape) < 0.2)
    mask = ~hide
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = complete(X, mask, seed=1)
        r, c = mask.nonzero(as_tuple=True)
        perm = torch.randperm(r.numel(), generator=torch.Generator().manual_seed(18))
        nv = r.numel() // 10
        vi, fi = perm[:nv], perm[nv:]
        W = torch.zeros_like(mask)
        W[r[fi], c[fi]] = True
        best = None
        for k in (1, 2, 3, 5, 10, 20):
            a = als(X, W, k, validation=(r[vi], c[vi], X[r[vi], c[vi]]), seed=1, warn=False)
            e = float((a.predict(r[vi], c[vi]) - X[r[vi], c[vi]]).square().mean())
            if best is None or e < best[0]:
                best = (e, k, a.reg)
        tuned = als(X, mask, best[1], reg=best[2], seed=1, warn=False)
    hr, hc = hide.nonzero(as_tuple=True)
    truth = X[hr, hc]
    ours = float((res.predict(hr, hc) - truth).norm() / truth.norm())
    theirs = float((tuned.predict(hr, hc) - truth).norm() / truth.norm())
    assert ours <= theirs, (ours, theirs, res.history.message)
