"""PerTensorAdamW (the lowrank-lm ablation arm) is AdamW with one second moment per tensor: on a
tensor whose gradient has equal squares everywhere it takes exactly AdamW's steps, and in general
its step is the AdamW formula with mean(g^2) in place of g^2 (float64 reference)."""

import torch

from torchlowrank.experiments.per_tensor_adam import PerTensorAdamW


def test_it_takes_adamws_steps_when_every_coordinate_has_the_same_gradient_square():
    a = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    oa = PerTensorAdamW([a], lr=0.1, weight_decay=0.01)
    ob = torch.optim.AdamW([b], lr=0.1, weight_decay=0.01)
    signs = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    for k in range(5):
        for p, o in ((a, oa), (b, ob)):
            p.grad = (k + 1.0) * signs
            o.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_its_step_is_adamw_with_the_tensors_mean_square_gradient():
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=g))
    ref = p.detach().clone()
    opt = PerTensorAdamW([p], lr=0.05, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1)
    m, v = torch.zeros_like(ref), torch.zeros((), dtype=torch.float64)
    for t in range(1, 4):
        grad = torch.randn(4, 3, dtype=torch.float64, generator=g)
        p.grad = grad.clone()
        opt.step()
        ref = ref * (1 - 0.05 * 0.1)
        m = 0.8 * m + 0.2 * grad
        v = 0.9 * v + 0.1 * grad.square().mean()
        ref = ref - 0.05 * (m / (1 - 0.8**t)) / ((v / (1 - 0.9**t)).sqrt() + 1e-8)
    torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-12)


def test_bad_hyperparameters_are_refused():
    import pytest

    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="lr must be > 0"):
        PerTensorAdamW([p], lr=0.0)
    with pytest.raises(ValueError, match="betas must be in"):
        PerTensorAdamW([p], betas=(0.9, 1.0))
