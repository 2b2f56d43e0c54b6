"""NuclearNorm baseline: sub-gradient, proximal step (singular value thresholding), same interface as Q3R."""

import copy

import pytest
import torch
from torch import nn

from conftest import linear_with
from torchlowrank.regularizers import NuclearNorm


@pytest.mark.parametrize("shape", [(9, 9), (14, 5), (4, 11)])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_nuclear_step_adds_lam_U_Vt_equal_to_autograd_of_value(shape, scale):
    W = torch.randn(*shape, dtype=torch.float64) * scale
    lin = linear_with(W)
    reg = NuclearNorm(lin, 0.3)
    reg.step()
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(lin.weight.grad, 0.3 * U @ Vh, rtol=1e-9, atol=1e-12)
    g = lin.weight.grad.clone()
    lin.weight.grad = None
    reg.value().backward()
    torch.testing.assert_close(lin.weight.grad, g, rtol=1e-8, atol=1e-10)
    assert reg.value().item() == pytest.approx(0.3 * float(torch.linalg.svdvals(W).sum()), rel=1e-10)


def test_prox_is_singular_value_soft_thresholding():
    W = torch.randn(10, 8, dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    lin = linear_with(W)
    tau = float(s[3])  # shrink by the 4th singular value: rank 3 remains
    NuclearNorm(lin, 2.0).prox(lr=tau / 2.0)
    torch.testing.assert_close(lin.weight.detach(), (U * (s - tau).clamp_min(0)) @ Vh, rtol=1e-9, atol=1e-12)
    assert torch.linalg.matrix_rank(lin.weight.detach()) == 3


def test_nuclear_decoupled_equals_coupled_for_sgd_and_prox_reads_optimizer_lr():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 2))
    b = copy.deepcopy(a)
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    ra = NuclearNorm(a, 0.05, targets=["0", "2"])
    rb = NuclearNorm(b, 0.05, targets=["0", "2"], decoupled=True, optimizer=ob)
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    for model, reg, opt in ((a, ra, oa), (b, rb, ob)):
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            reg.step()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    w = b[0].weight.detach().clone()
    rb.prox()  # lr 0.1 from the optimizer
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(
        torch.linalg.svdvals(b[0].weight.detach()), (s - 0.1 * 0.05).clamp_min(0), rtol=1e-4, atol=1e-6
    )


def test_nuclear_split_and_conv1d(tiny_gpt2):
    model = tiny_gpt2.double()
    reg = NuclearNorm(model, 0.1, targets=["c_attn"], split={"c_attn": 3})
    reg.step()
    W = model.transformer.h[1].attn.c_attn.weight
    for j in range(3):
        part = W.detach()[:, 32 * j : 32 * (j + 1)]
        U, _, Vh = torch.linalg.svd(part, full_matrices=False)
        torch.testing.assert_close(W.grad[:, 32 * j : 32 * (j + 1)], 0.1 * U @ Vh, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs, match", [(dict(lam=-1.0), "lam"), (dict(lam=0.1, targets=["zzz"]), "matched nothing")]
)
def test_nuclear_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NuclearNorm(nn.Sequential(nn.Linear(3, 3)), **kwargs)


def test_nuclear_nan_weight_names_the_layer():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'1'"):
        NuclearNorm(model, 0.1).step()
    assert model[0].weight.grad is None
