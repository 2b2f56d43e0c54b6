"""Soft-impute with factored iterates (issue 21, "sparse all the way"): the sparse-plus-low-rank
step with a warm-started block power iteration reaches the fixed point of exact soft-impute (dense
SVDs, float64), takes sparse inputs far too large to densify, and the path chooses the same way on
dense and sparse inputs."""

import pytest
import torch

from torchlowrank.matrix import SoftImputeCompleter, SoftImputeFit, soft_impute, soft_impute_path, svt

pytestmark = pytest.mark.usefixtures("one_thread")


def _noisy_low_rank(m=60, n=45, r=3, frac=0.5, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(
        r, n, generator=g, dtype=torch.float64
    )
    M = M + noise * torch.randn(m, n, generator=g, dtype=torch.float64)
    return M, torch.rand(m, n, generator=g) < frac


def _exact_soft_impute(M, mask, lam, max_rank, tol=1e-13, max_iters=20_000):
    """The textbook iteration with full SVDs: Z <- SVT_lam(P_Omega(M) + P_Omega^perp(Z))."""
    Z = torch.zeros_like(M)
    for _ in range(max_iters):
        Znew = svt(torch.where(mask, M, Z), lam, max_rank)
        done = float((Znew - Z).norm()) < tol * float(Z.norm().clamp_min(1e-300))
        Z = Znew
        if done:
            return Z
    raise AssertionError("the reference did not converge")


@pytest.mark.parametrize("lam, max_rank", [(2.0, None), (0.5, None), (0.5, 4), (20.0, None)])
def test_factored_soft_impute_reaches_the_fixed_point_of_exact_soft_impute(lam, max_rank):
    M, mask = _noisy_low_rank()
    ref = _exact_soft_impute(M, mask, lam, max_rank)
    info = {}
    Z = soft_impute(M, mask, lam, max_rank=max_rank, max_iters=20_000, tol=1e-13, info=info)
    assert info["status"] == "converged"
    assert float((Z - ref).norm()) <= 1e-9 * max(float(ref.norm()), 1.0)
    s_ref = torch.linalg.svdvals(ref)
    assert int((s_ref > 1e-9).sum()) == int((torch.linalg.svdvals(Z) > 1e-9).sum())


def test_a_sparse_input_too_large_to_densify_is_fitted_and_predicted_from_its_entries():
    # a small problem's entries scattered over a (100k, 60k) matrix (48 GB as float64, twice this
    # machine's memory): soft-impute there equals soft-impute of the small matrix (the empty rows
    # and columns of Z stay zero)
    M, mask = _noisy_low_rank(seed=4)
    m, n = 100_000, 60_000
    g = torch.Generator().manual_seed(0)
    row_of, col_of = (
        torch.randperm(m, generator=g)[: M.shape[0]],
        torch.randperm(n, generator=g)[: M.shape[1]],
    )
    r, c = mask.nonzero(as_tuple=True)
    X = torch.sparse_coo_tensor(torch.stack([row_of[r], col_of[c]]), M[r, c], (m, n)).coalesce()
    small = soft_impute(M, mask, 3.0, max_rank=20, max_iters=5000, tol=1e-10)
    est = SoftImputeCompleter(lam=3.0, max_rank=20, max_iters=5000, tol=1e-10).fit(X)
    assert (
        isinstance(est.result_, SoftImputeFit) and est.result_.shape == (m, n) and est.status_ == "converged"
    )
    hr, hc = (~mask).nonzero(as_tuple=True)  # the small problem's hidden entries, in the large matrix
    torch.testing.assert_close(est.predict(row_of[hr], col_of[hc]), small[hr, hc], rtol=1e-6, atol=1e-8)
    outside = est.predict(torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7]))
    assert not set(row_of.tolist()) & {0, 1, 2} and float(outside.abs().max()) < 1e-9


def test_the_path_chooses_the_same_lam_on_dense_and_sparse_inputs():
    M, mask = _noisy_low_rank(seed=1)
    r, c = mask.nonzero(as_tuple=True)
    S = torch.sparse_coo_tensor(torch.stack([r, c]), M[r, c], M.shape).coalesce()
    Zd, lam_d, path_d = soft_impute_path(M, mask, seed=3)
    Zs, lam_s, path_s = soft_impute_path(S, None, seed=3)
    assert lam_d == lam_s and [p["rank"] for p in path_d] == [p["rank"] for p in path_s]
    torch.testing.assert_close(Zd, Zs, rtol=1e-8, atol=1e-10)


def test_a_dense_warm_start_is_truncated_to_max_rank_and_continues_the_iteration():
    M, mask = _noisy_low_rank(seed=2)
    cold = soft_impute(M, mask, 1.0, max_rank=5, max_iters=5000, tol=1e-12)
    half = soft_impute(M, mask, 1.0, max_rank=5, max_iters=3, warn=False)
    warm = soft_impute(M, mask, 1.0, max_rank=5, max_iters=5000, tol=1e-12, init=half)
    assert int((torch.linalg.svdvals(half) > 1e-9).sum()) <= 5
    torch.testing.assert_close(warm, cold, rtol=1e-7, atol=1e-9)


def test_bad_arguments_are_refused_with_what_to_pass():
    M, mask = _noisy_low_rank()
    with pytest.raises(ValueError, match="lam must be >= 0"):
        soft_impute(M, mask, -1.0)
    with pytest.raises(ValueError, match="max_rank must be a positive int"):
        soft_impute(M, mask, 1.0, max_rank=0)
    with pytest.raises(ValueError, match="time_limit must be >= 0"):
        soft_impute_path(M, mask, time_limit=-1.0)
    with pytest.raises(ValueError, match="mask has shape"):
        soft_impute(M, mask[:5], 1.0)
