"""FactorizedLinear / FactorizedConv2d (W = A B^T) and factorize_ab."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchlowrank as tlr
from torchlowrank.factorized import FactorizedConv2d, FactorizedLinear, factorize_ab


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_from_linear_is_the_best_rank_r_approximation(shape, scale):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0]).double()
    with torch.no_grad():
        lin.weight.mul_(scale)
    f = FactorizedLinear.from_linear(lin, 4)
    U, S, Vh = torch.linalg.svd(lin.weight.detach())
    torch.testing.assert_close(f.dense_weight(), (U[:, :4] * S[:4]) @ Vh[:4], rtol=1e-10, atol=1e-12 * scale)
    # balanced: ||A|| columns equal ||B|| columns
    torch.testing.assert_close(f.A.norm(dim=0), f.B.norm(dim=0))
    x = torch.randn(5, shape[1], dtype=torch.float64)
    torch.testing.assert_close(f(x), x @ f.dense_weight().T + lin.bias)


def test_conv_forward_equals_dense_conv_with_the_factorized_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
    f = FactorizedConv2d.from_conv2d(conv, 5)
    x = torch.randn(2, 3, 9, 9)
    ref = nn.functional.conv2d(x, f.dense_weight().reshape(8, 3, 3, 3), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(f(x), ref, rtol=1e-5, atol=1e-5)
    full = FactorizedConv2d.from_conv2d(conv, 8)  # full rank: reproduces the conv
    torch.testing.assert_close(full(x), conv(x), rtol=1e-4, atol=1e-5)


def test_gradients_match_autograd_on_the_dense_weight():
    torch.manual_seed(0)
    f = FactorizedLinear(10, 7, 3).double()
    x = torch.randn(6, 10, dtype=torch.float64)
    f(x).pow(2).sum().backward()
    W = f.dense_weight().detach().requires_grad_(True)
    (nn.functional.linear(x, W, f.bias)).pow(2).sum().backward()
    torch.testing.assert_close(f.A.grad, W.grad @ f.B.detach())
    torch.testing.assert_close(f.B.grad, W.grad.T @ f.A.detach())


def test_factorize_ab_replaces_targets_and_counts_parameters():
    model = tlr.models.LeNet5()
    factorize_ab(model, 0.2, targets=["features.0", "features.3", "classifier.1", "classifier.3"])
    assert isinstance(model.features[0], FactorizedConv2d) and isinstance(
        model.classifier[1], FactorizedLinear
    )
    assert isinstance(model.classifier[5], nn.Linear)
    lin = model.classifier[1]
    assert lin.rank == int(0.2 * 120 * 400 / 520)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    m2 = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    factorize_ab(m2, 100)  # clamped to full rank
    assert m2[0].rank == 6 and m2[2].rank == 2


def test_bad_arguments():
    with pytest.raises(ValueError):
        factorize_ab(nn.Sequential(nn.Linear(3, 3)), 0)
    with pytest.raises(ValueError):
        factorize_ab(nn.Sequential(nn.Linear(3, 3)), 1.5)
    with pytest.raises(ValueError):
        factorize_ab(nn.Sequential(nn.ReLU()), 2)
    with pytest.raises(ValueError):
        FactorizedLinear(4, 4, 5)


def test_a_bf16_layer_computes_the_float64_product_to_bf16_precision():
    f = FactorizedLinear(16, 8, 4, dtype=torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = f(x)
    ref = f.to(torch.float64)(x.double())
    assert y.dtype == torch.bfloat16
    # two bf16 GEMMs with a rounding between them: a few units of bf16's 2^-8 relative precision
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=3 * 2**-8 * ref.abs().max().item())
