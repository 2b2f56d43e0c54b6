"""DeepFactorization and the recovery problems: initialisation, shapes, hand-written gradients."""

import math

import pytest
import torch

import torchlowrank as tlr
from torchlowrank.matrix import (
    Completion,
    DeepFactorization,
    Factorization,
    Sensing,
    low_rank_target,
    random_mask,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "shape,depth,width",
    [((12, 12), 3, None), ((10, 7), 3, None), ((6, 9), 4, 5), ((8, 5), 1, None), ((8, 5), 2, 3)],
)
def test_orthogonal_init_at_scale_eps_and_end_to_end_shape(shape, depth, width):
    eps = 1e-2
    model = DeepFactorization(shape, depth=depth, width=width, init_scale=eps, generator=_gen())
    for W in model.factors:
        s = torch.linalg.svdvals(W)
        torch.testing.assert_close(s, torch.full_like(s, eps), rtol=1e-12, atol=0)
    Phi = model.end_to_end()
    assert Phi.shape == shape and Phi.dtype == torch.float64
    if width is None:  # width min(m, n): every singular value of Phi(0) is eps^L
        s = torch.linalg.svdvals(Phi)
        torch.testing.assert_close(s, torch.full_like(s, eps**depth), rtol=1e-10, atol=0)


def _problems(shape, gen):
    M = low_rank_target(shape, 2, generator=gen)
    mask = random_mask(shape, 0.4, generator=gen)
    out = []
    for red in ("mean", "sum"):
        out.append(Completion(M, mask, reduction=red, truth=M))
        out.append(Factorization(M, reduction=red))
        out.append(Sensing.gaussian(M, 30, generator=gen, reduction=red))
    return out


@pytest.mark.parametrize("shape,width", [((9, 7), None), ((9, 7), 3), ((6, 10), 4)])
def test_hand_written_gradients_match_autograd(shape, width):
    gen = _gen(1)
    for problem in _problems(shape, gen):
        model = DeepFactorization(shape, depth=3, width=width, init_scale=0.5, generator=gen)
        loss, grads = model.loss_and_grads(problem)
        Ws = [W.detach().clone().requires_grad_(True) for W in model.factors]
        Phi = Ws[2] @ Ws[1] @ Ws[0]
        ref = problem.loss(Phi)
        ref.backward()
        assert math.isclose(float(loss), float(ref.detach()), rel_tol=1e-12)
        for g, W in zip(grads, Ws):
            torch.testing.assert_close(g, W.grad, rtol=1e-10, atol=1e-14)


def test_loss_conventions_mean_is_sum_over_residual_count():
    gen = _gen(2)
    M = low_rank_target((8, 6), 2, generator=gen)
    mask = random_mask((8, 6), 0.5, generator=gen)
    Phi = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    s = Completion(M, mask, reduction="sum")
    m = Completion(M, mask, reduction="mean")
    assert math.isclose(float(s.loss(Phi)), 0.5 * float(((Phi - M)[mask]).square().sum()), rel_tol=1e-13)
    assert math.isclose(float(m.loss(Phi)) * int(mask.sum()), float(s.loss(Phi)), rel_tol=1e-13)
    f = Factorization(M, reduction="mean")
    assert math.isclose(float(f.loss(Phi)), 0.5 * float((Phi - M).square().mean()), rel_tol=1e-13)


def test_sparse_and_dense_completion_paths_agree():
    gen = _gen(3)
    M = low_rank_target((40, 30), 3, generator=gen)
    problem = Completion(M, random_mask((40, 30), 0.3, generator=gen))
    X = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    Bt = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    problem._CHUNK = 64  # several gather blocks
    l1, gX1, gB1 = problem.factored_loss_and_grads(X, Bt)
    l2, G = problem.loss_and_grad(X @ Bt.T)
    assert math.isclose(float(l1), float(l2), rel_tol=1e-12)
    torch.testing.assert_close(gX1, G @ Bt, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gB1, G.T @ X, rtol=1e-12, atol=1e-15)


def test_public_names():
    assert tlr.matrix.DeepFactorization is DeepFactorization
    assert callable(tlr.matrix.complete)
