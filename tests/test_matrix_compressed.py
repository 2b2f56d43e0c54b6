"""The compressed network (DESIGN §4.4): construction, step-0 equality with the original, exact
equivalence with the original's moving block on a factorization problem, gradients."""

import math

import pytest
import torch

from torchlowrank.linalg import principal_angles
from torchlowrank.matrix import (
    Completion,
    CompressedFactorization,
    DeepFactorization,
    Factorization,
    low_rank_target,
    random_mask,
    rho_trajectory,
    suggest_lr,
    train_gd,
)


def _completion(d=30, r=2, frac=0.4, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    shape = shape or (d, d)
    M = low_rank_target(shape, r, generator=g)
    return Completion(M, random_mask(shape, frac, generator=g), truth=M)


def test_end_to_end_at_step_zero_equals_the_original_on_span_V1():
    problem = _completion()
    eps, L, r = 1e-2, 3, 3
    base = DeepFactorization(
        problem.shape, depth=L, init_scale=eps, generator=torch.Generator().manual_seed(1)
    )
    comp = CompressedFactorization.from_problem(problem, r, base=base)
    k = comp.rank
    assert k == 2 * r
    Phi0, Phic = base.end_to_end(), comp.end_to_end()
    V1 = comp.right
    torch.testing.assert_close(V1.T @ V1, torch.eye(k, dtype=torch.float64), atol=1e-13, rtol=0)
    # equal on span(V_1) ...
    torch.testing.assert_close(Phic, Phi0 @ V1 @ V1.T, atol=1e-12 * eps**L, rtol=0)
    torch.testing.assert_close(Phic @ V1, Phi0 @ V1, atol=1e-12 * eps**L, rtol=0)
    # ... and what is dropped is the complement block, norm eps^L sqrt(n - k) (every singular value eps^L)
    gap = float(torch.linalg.matrix_norm(Phi0 - Phic))
    assert math.isclose(gap, eps**L * math.sqrt(problem.shape[1] - k), rel_tol=1e-10)
    # inner factors eps I, outer U_L = Phi(0) V_1 / eps^L
    for C in comp.inner:
        torch.testing.assert_close(C, eps * torch.eye(k, dtype=torch.float64))
    torch.testing.assert_close(comp.left, Phi0 @ V1 / eps**L, atol=1e-12, rtol=0)


def test_shortcut_without_base_spans_the_same_subspace_as_the_design_formula():
    # V_1 = orth([V_g, W_1(0)^T U_g / eps]) with G_1 = (W_L..W_2)^T dL/dPhi equals orth([V_f, O^T U_f])
    problem = _completion(d=24, seed=3)
    base = DeepFactorization(
        problem.shape, depth=3, init_scale=1e-3, generator=torch.Generator().manual_seed(2)
    )
    a = CompressedFactorization.from_problem(problem, 2, base=base)
    O = base.end_to_end() / 1e-9
    _, G = problem.loss_and_grad(base.end_to_end())
    U, _, Vh = torch.linalg.svd(G)
    ref = torch.cat([Vh[:2].T, O.T @ U[:, :2]], 1)
    assert float(principal_angles(a.right, ref).max()) < 1e-6


def test_gamma_zero_compressed_trajectory_equals_the_original_block_on_factorization():
    # for a rank-r factorization target the theorem makes this exact: Phi_orig(t) = Phi_c(t) + rho(t)^L O P_perp
    d, r, L, eps, lr, steps = 14, 2, 3, 0.3, 0.02, 120
    g = torch.Generator().manual_seed(5)
    M = low_rank_target((d, d), r, generator=g)
    problem = Factorization(M, reduction="sum")
    base = DeepFactorization((d, d), depth=L, init_scale=eps, generator=g)
    comp = CompressedFactorization.from_problem(problem, r, base=base, gamma=0.0)
    O = base.end_to_end().detach() / eps**L
    P_perp = torch.eye(d, dtype=torch.float64) - comp.right @ comp.right.T
    train_gd(base, problem, lr, max_iters=steps)
    train_gd(comp, problem, lr, max_iters=steps)
    rho = rho_trajectory(eps, lr, L, steps, problem.scale)
    expected = comp.end_to_end() + float(rho[-1]) ** L * O @ P_perp
    Phi = base.end_to_end()
    assert float(torch.linalg.matrix_norm(Phi - expected) / torch.linalg.matrix_norm(Phi)) < 1e-10
    assert problem.recovery_error(Phi) < 0.5  # the run went somewhere


@pytest.mark.parametrize("shape", [(20, 20), (18, 25), (25, 12)])
def test_compressed_gradients_match_autograd(shape):
    problem = _completion(shape=shape, seed=7)
    comp = CompressedFactorization.from_problem(
        problem, 2, depth=3, init_scale=0.5, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():  # move away from the symmetric init
        for p in comp.factor_parameters():
            p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype))
    loss, grads = comp.loss_and_grads(problem)
    ps = [p.detach().clone().requires_grad_(True) for p in comp.factor_parameters()]
    A, *Cs, V = ps
    Phi = A
    for C in reversed(Cs):
        Phi = Phi @ C
    ref = problem.loss(Phi @ V.T)
    ref.backward()
    assert math.isclose(float(loss), float(ref.detach()), rel_tol=1e-12)
    for g, p in zip(grads, ps):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-15)


def test_lr_scales_give_gamma_to_the_outer_factors_only():
    comp = CompressedFactorization.from_problem(_completion(), 2, depth=3, gamma=0.05)
    assert comp.lr_scales() == [0.05, 1.0, 1.0, 1.0, 0.05]
    assert len(comp.factors) == 5 and comp.factors[0].shape == (4, 30)


def test_compressed_completion_recovers_a_low_rank_matrix():
    problem = _completion(d=40, r=2, frac=0.5, seed=11)
    comp = CompressedFactorization.from_problem(problem, 2, generator=torch.Generator().manual_seed(0))
    comp = CompressedFactorization.from_problem(
        problem, 2, init_scale=1e-2, generator=torch.Generator().manual_seed(0)
    )
    h = train_gd(comp, problem, lr=suggest_lr(problem, 3), max_iters=8000, target_error=1e-6, eval_every=100)
    assert h.status == "converged" and h.reason == "target_error", (h.status, h.recovery_error[-5:])
