"""The invariant-subspace theorem (DESIGN §4.4), checked to 1e-8 on a small float64 instance.

Loss c/2 ||Phi - M||_F^2 + wd/2 sum_l ||W_l||_F^2 (c = 1 for "sum", 1/d^2 for "mean"), width-d depth-L
network from W_l(0) = eps O_l: W_l(t) = U_l diag(W~_l(t), rho(t) I_{d-2r}) V_l^T with U_l, V_l fixed and
rho(t+1) = rho(t) (1 - lr wd - lr c rho(t)^(2(L-1))), rho(0) = eps.
"""

import pytest
import torch

from torchlowrank.matrix import (
    DeepFactorization,
    Factorization,
    invariant_bases,
    low_rank_target,
    rho_trajectory,
    train_gd,
)


@pytest.mark.parametrize(
    "reduction,depth,eps,wd_sum", [("sum", 3, 0.4, 1.0), ("mean", 3, 0.4, 1.0), ("sum", 4, 0.7, 0.3)]
)
def test_complement_singular_values_follow_rho_and_subspaces_stay_fixed(reduction, depth, eps, wd_sum):
    d, r, steps = 16, 2, 150
    gen = torch.Generator().manual_seed(0)
    M = low_rank_target((d, d), r, generator=gen)
    U, _, Vh = torch.linalg.svd(M)
    problem = Factorization(M, reduction=reduction)
    lr_sum = 0.02
    # the same dynamics in both conventions: lr_mean * c_mean = lr_sum, lr_mean * wd_mean = lr_sum * wd_sum
    lr = lr_sum / problem.scale
    wd = wd_sum * problem.scale
    model = DeepFactorization((d, d), depth=depth, init_scale=eps, generator=gen)
    Us, Vs, k = invariant_bases(model, U[:, :r], Vh[:r].T)
    assert k == 2 * r
    rho = rho_trajectory(eps, lr, depth, steps, problem.scale, wd)
    assert rho[-1] < 0.5 * eps  # rho really moves
    worst = {"block": 0.0, "sigma": 0.0}

    def check(t, m):
        for l, W in enumerate(m.factors):
            W = W.detach()
            Up, Vp = Us[l][:, k:], Vs[l][:, k:]
            # W_l maps the fixed complement V_perp onto rho(t) U_perp and nothing else into U_perp
            worst["block"] = max(
                worst["block"],
                float((W @ Vp - rho[t] * Up).abs().max() / rho[t]),
                float((Up.T @ W - rho[t] * Vp.T).abs().max() / rho[t]),
            )
            s = torch.linalg.svdvals(W)
            gaps = ((s - rho[t]).abs() / rho[t]).sort().values
            worst["sigma"] = max(worst["sigma"], float(gaps[: d - k].max()))

    train_gd(
        model, problem, lr, max_iters=steps, weight_decay=wd, eval_every=1, check_every=1, callback=check
    )
    assert worst["block"] <= 1e-8
    assert worst["sigma"] <= 1e-8  # d - 2r singular values of every factor equal rho(t)
    # and the moving block really learned something (the test is not vacuous)
    assert problem.recovery_error(model.end_to_end()) < 0.5


def test_rho_recursion_closed_form_without_weight_decay():
    # rho' = rho (1 - lr rho^2) for L = 2 matches a direct loop
    rho = rho_trajectory(0.5, 0.1, 2, 3)
    x = 0.5
    for t in range(1, 4):
        x = x * (1 - 0.1 * x**2)
        assert abs(float(rho[t]) - x) < 1e-16


@pytest.mark.slow
def test_dmf_invariance_quick_reproduction_confirms_the_theorem(tmp_path):
    from torchlowrank.experiments import get_experiment
    from torchlowrank.report import write_report

    r = get_experiment("dmf-invariance").run(quick=True)
    assert r.metrics["factorization_max_deviation_over_norm"] <= 1e-12
    assert r.metrics["factorization_max_rel_sigma_minus_rho"] <= 1e-8
    assert r.metrics["completion_max_deviation_over_norm"] > 1e-3  # not a theorem for completion
    paths = write_report(r, tmp_path)
    assert paths["md"].exists() and paths["png:singular_values"].exists()
