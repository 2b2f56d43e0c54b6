import math

import pytest
import torch

import torchlowrank as tlr
from conftest import decaying_matrix
from torchlowrank.linalg import robust_svd


def test_full_truncated_svd_matches_float64_reference():
    A = torch.randn(60, 40, dtype=torch.float64)
    U, S, Vh = tlr.truncated_svd(A, 7, method="full")
    S_ref = torch.linalg.svdvals(A)[:7]
    assert U.shape == (60, 7) and S.shape == (7,) and Vh.shape == (7, 40)
    torch.testing.assert_close(S, S_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(U.T @ U, torch.eye(7, dtype=torch.float64), atol=1e-12, rtol=0)
    # the rank-7 reconstruction error is the tail of the spectrum (Eckart-Young)
    err = torch.linalg.matrix_norm(A - (U * S) @ Vh)
    tail = torch.linalg.svdvals(A)[7:].square().sum().sqrt()
    assert math.isclose(float(err), float(tail), rel_tol=1e-10)


def test_randomized_svd_is_accurate_on_decaying_spectrum():
    A = decaying_matrix(500, 300, decay=0.8)
    U, S, Vh = tlr.truncated_svd(A, 10, method="randomized")
    S_ref = torch.linalg.svdvals(A)[:10]
    # stated tolerance: relative 1e-6 on singular values for a 0.8-geometric spectrum (4 power iterations)
    torch.testing.assert_close(S, S_ref, rtol=1e-6, atol=0)
    best = torch.linalg.svdvals(A)[10:].square().sum().sqrt()
    err = torch.linalg.matrix_norm(A - (U * S) @ Vh)
    assert float(err) <= 1.0001 * float(best)


def test_auto_picks_randomized_only_for_small_ranks(monkeypatch):
    calls = []
    import torchlowrank.linalg as L

    real = L.randomized_svd
    monkeypatch.setattr(L, "randomized_svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    A = decaying_matrix(400, 300, dtype=torch.float32)
    tlr.truncated_svd(A, 8)  # 18 * 4 <= 300: randomized
    assert calls == [1]
    tlr.truncated_svd(A, 100)  # large rank: full SVD
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_computes_in_float32_and_returns_input_dtype(dtype):
    A32 = decaying_matrix(80, 50, dtype=torch.float32)
    A = A32.to(dtype)
    U, S, Vh = tlr.truncated_svd(A, 5)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    S_ref = torch.linalg.svdvals(A.float())[:5]
    torch.testing.assert_close(S.float(), S_ref, rtol=1e-2, atol=1e-2)


def test_nan_input_raises_value_error_naming_the_shape():
    A = torch.randn(12, 9)
    A[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"\(12, 9\)"):
        tlr.truncated_svd(A, 2)
    A[3, 4] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        tlr.truncated_svd(A, 2, method="randomized")


@pytest.mark.parametrize("rank", [0, -1, 10, 2.5, True])
def test_rank_outside_range_raises(rank):
    with pytest.raises(ValueError, match="rank must be an int in 1..9"):
        tlr.truncated_svd(torch.randn(12, 9), rank)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="method"):
        tlr.truncated_svd(torch.randn(5, 5), 2, method="fast")


def test_svd_failure_falls_back_instead_of_crashing(monkeypatch):
    A = torch.randn(30, 20)
    real = torch.linalg.svd
    failures = {"n": 0}

    def flaky(X, *args, **kwargs):
        if X.dtype == torch.float32:  # the first attempt "fails to converge"
            failures["n"] += 1
            raise torch._C._LinAlgError("svd did not converge")
        return real(X, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    U, S, Vh = robust_svd(A)
    assert failures["n"] == 1 and S.dtype == torch.float32
    torch.testing.assert_close(S, torch.linalg.svdvals(A.double()).float(), rtol=1e-5, atol=1e-5)


def test_orthogonal_init_has_all_singular_values_equal_to_scale():
    for rows, cols in [(20, 7), (7, 20), (9, 9)]:
        W = tlr.orthogonal_init(rows, cols, scale=1e-3, dtype=torch.float64)
        assert W.shape == (rows, cols)
        torch.testing.assert_close(
            torch.linalg.svdvals(W), torch.full((min(rows, cols),), 1e-3, dtype=torch.float64)
        )


def test_principal_angles_zero_for_same_subspace_and_right_angle_for_orthogonal():
    Q, _ = torch.linalg.qr(torch.randn(30, 6, dtype=torch.float64))
    same = tlr.principal_angles(Q[:, :3], Q[:, :3] @ torch.randn(3, 3, dtype=torch.float64))
    assert same.abs().max() < 1e-7
    ortho = tlr.principal_angles(Q[:, :3], Q[:, 3:])
    torch.testing.assert_close(ortho, torch.full((3,), math.pi / 2, dtype=torch.float64))


def test_principal_angle_of_a_rotated_line_is_the_rotation_angle():
    theta = 0.3
    a = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    b = torch.tensor([[math.cos(theta)], [math.sin(theta)], [0.0]], dtype=torch.float64)
    assert math.isclose(float(tlr.principal_angles(a, b)[0]), theta, rel_tol=1e-12)
    tiny = 1e-6  # arccos alone would lose this angle in float32 / lose digits in float64
    c = torch.tensor([[math.cos(tiny)], [math.sin(tiny)], [0.0]], dtype=torch.float64)
    assert math.isclose(float(tlr.principal_angles(a, c)[0]), tiny, rel_tol=1e-6)


def test_orthonormal_basis_drops_dependent_columns():
    A = torch.randn(10, 3, dtype=torch.float64)
    A = torch.cat([A, A[:, :1] + A[:, 1:2]], dim=1)  # 4 columns, rank 3
    Q = tlr.orthonormal_basis(A)
    assert Q.shape == (10, 3)
    torch.testing.assert_close(Q @ (Q.T @ A), A)


def test_sign_fixed_makes_each_largest_entry_positive_and_keeps_the_product():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    Uf, Vf = tlr.linalg.sign_fixed(U, Vh.mT)
    top = torch.gather(Uf, -2, Uf.abs().argmax(-2, keepdim=True))
    assert (top > 0).all()
    torch.testing.assert_close((Uf * S[:, None, :]) @ Vf.mT, A)
    # the flips undo any sign a LAPACK picks
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(tlr.linalg.sign_fixed(U * flip)[0], Uf)


def test_hashed_sketch_is_the_same_numbers_in_every_dtype_and_a_full_rank_uniform_test_matrix():
    a = tlr.linalg.hashed_sketch(500, 40, seed=3)
    b = tlr.linalg.hashed_sketch(500, 40, seed=3, dtype=torch.float64)
    assert torch.equal(a.double(), b)  # 24 random bits: exact in float32
    assert not torch.equal(a, tlr.linalg.hashed_sketch(500, 40, seed=4))
    assert a.min() >= -1 and a.max() < 1 and abs(a.mean()) < 0.05 and abs(a.std() - 3**-0.5) < 0.02
    assert torch.linalg.matrix_rank(b) == 40
