import copy

import pytest
import torch
from torch import nn

import torchlowrank as tlr


def test_forward_equals_dense_weight_times_input():
    layer = tlr.LowRankLinear(20, 30, rank=5).double()
    x = torch.randn(7, 20, dtype=torch.float64)
    W = layer.U @ torch.diag(layer.S) @ layer.V.T
    torch.testing.assert_close(layer(x), x @ W.T + layer.bias)
    assert layer.weight.shape == (30, 20)


def test_from_linear_is_the_best_rank_r_approximation():
    lin = nn.Linear(40, 25).double()
    layer = tlr.LowRankLinear.from_linear(lin, 6)
    s = torch.linalg.svdvals(lin.weight.detach())
    err = torch.linalg.matrix_norm(lin.weight.detach() - layer.dense_weight().detach())
    # Eckart-Young: the error equals the norm of the discarded singular values
    torch.testing.assert_close(err, s[6:].square().sum().sqrt())
    torch.testing.assert_close(layer.bias.detach(), lin.bias.detach())


def test_full_rank_round_trip_reproduces_the_layer():
    lin = nn.Linear(12, 9).double()
    back = tlr.LowRankLinear.from_linear(lin, 9).to_linear()
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(back(x), lin(x), atol=1e-12, rtol=1e-12)
    assert isinstance(back, nn.Linear) and back.weight.dtype == torch.float64


@pytest.mark.parametrize("in_out", [(10, 8), (8, 10), (9, 9)], ids=["wide", "tall", "square"])
def test_gradients_of_factors_input_and_bias_match_autograd_through_the_dense_weight(in_out):
    """S is folded into the smaller factor: both branches, on a (batch, seq, in) input."""
    n_in, n_out = in_out
    layer = tlr.LowRankLinear(n_in, n_out, rank=3).double()
    x = torch.randn(2, 5, n_in, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    grads = [t.grad.clone() for t in (layer.U, layer.S, layer.V, layer.bias, x)]
    U, S, V, b, xr = (t.detach().clone().requires_grad_() for t in (layer.U, layer.S, layer.V, layer.bias, x))
    (xr @ (U @ torch.diag(S) @ V.T).T + b).square().sum().backward()
    for g, ref in zip(grads, (U.grad, S.grad, V.grad, b.grad, xr.grad)):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)
    assert all(t.grad.is_contiguous() for t in (layer.U, layer.V))  # the parameters' own layout


def test_default_init_is_truncation_of_a_dense_default_init():
    torch.manual_seed(0)
    layer = tlr.LowRankLinear(64, 32, rank=8)
    s = torch.linalg.svdvals(layer.dense_weight().detach())
    assert (s[8:] < 1e-5).all() and s[0] < 1.0  # rank 8, scale of a Kaiming-uniform dense init


@pytest.mark.parametrize("rank", [0, 9, 3.0])
def test_bad_rank_raises(rank):
    with pytest.raises(ValueError, match="1..8"):
        tlr.LowRankLinear(8, 10, rank)
    with pytest.raises(ValueError):
        tlr.LowRankLinear.from_linear(nn.Linear(8, 10), rank)


def test_conv2d_round_trip_and_best_approximation():
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    full = tlr.LowRankConv2d.from_conv2d(conv, 6)
    torch.testing.assert_close(full(x), conv(x))
    torch.testing.assert_close(full.to_conv2d()(x), conv(x))
    low = tlr.LowRankConv2d.from_conv2d(conv, 2)
    W = conv.weight.detach().reshape(6, -1)
    err = torch.linalg.matrix_norm(W - low.dense_weight().detach())
    torch.testing.assert_close(err, torch.linalg.svdvals(W)[2:].square().sum().sqrt())
    # the factorized forward equals a conv with the rank-2 kernel
    ref = nn.functional.conv2d(x, low.weight.detach(), conv.bias.detach(), stride=2, padding=1)
    torch.testing.assert_close(low(x), ref)


@pytest.mark.parametrize("channels", [(3, 8), (8, 4)], ids=["S_in_V", "S_in_U"])
def test_conv2d_gradients_match_autograd_through_the_dense_kernel(channels):
    c_in, c_out = channels
    ksize = 1 if c_in == 3 else 3  # V rows in*kh*kw vs U rows out: 3 <= 8 (S scales V), 72 > 4 (S scales U)
    layer = tlr.LowRankConv2d(c_in, c_out, ksize, rank=2, padding=ksize // 2).double()
    x = torch.randn(2, c_in, 5, 5, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    grads = [t.grad.clone() for t in (layer.U, layer.S, layer.V, layer.bias, x)]
    U, S, V, b, xr = (t.detach().clone().requires_grad_() for t in (layer.U, layer.S, layer.V, layer.bias, x))
    kernel = (U @ torch.diag(S) @ V.T).reshape(c_out, c_in, ksize, ksize)
    nn.functional.conv2d(xr, kernel, b, padding=ksize // 2).square().sum().backward()
    for g, ref in zip(grads, (U.grad, S.grad, V.grad, b.grad, xr.grad)):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)


def test_conv2d_with_groups_is_rejected():
    with pytest.raises(ValueError, match="groups=1"):
        tlr.LowRankConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2), 2)


def test_bfloat16_layer_keeps_its_dtype():
    lin = nn.Linear(32, 16).to(torch.bfloat16)
    layer = tlr.LowRankLinear.from_linear(lin, 4)
    assert layer.U.dtype == torch.bfloat16
    assert layer(torch.randn(3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_default_init_has_the_spectrum_of_a_truncated_dense_default_init():
    torch.manual_seed(0)
    m, n, r = 256, 512, 32
    layer = tlr.LowRankLinear(n, m, r)
    dense_s = torch.linalg.svdvals(nn.Linear(n, m).weight.detach().double())[:r]
    torch.testing.assert_close(layer.S.detach().double(), dense_s, rtol=0.03, atol=0)
    eye = torch.eye(r)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-5, rtol=0)
    assert float(layer.bias.detach().abs().max()) <= 1 / n**0.5


def test_init_forms_no_dense_matrix_and_runs_no_svd(monkeypatch):
    import torchlowrank.layers as layers

    def no_svd(*a, **k):
        raise AssertionError("reset_parameters must not compute an SVD")

    monkeypatch.setattr(layers, "truncated_svd", no_svd)
    layer = tlr.LowRankLinear(4096, 4096, 16)
    conv = tlr.LowRankConv2d(64, 64, 3, rank=8)
    assert layer.S.shape == (16,) and conv.S.shape == (8,)


def test_layers_can_be_built_on_the_meta_device():
    layer = tlr.LowRankLinear(1024, 512, 16, device="meta")
    conv = tlr.LowRankConv2d(8, 16, 3, rank=4, device="meta")
    assert layer.U.is_meta and conv.V.is_meta
    assert layer(torch.empty(2, 1024, device="meta")).shape == (2, 512)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.isfinite(layer.dense_weight()).all()


def test_from_linear_constructs_subclasses_through_their_init():
    class Tagged(tlr.LowRankLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.tag = "built by __init__"

    low = Tagged.from_linear(nn.Linear(20, 10), 4)
    assert isinstance(low, Tagged) and low.tag == "built by __init__"


def test_from_linear_accepts_a_hugging_face_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=12, nx=20).double()
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    low = tlr.LowRankLinear.from_linear(conv, 12).double()
    x = torch.randn(3, 20, dtype=torch.float64)
    torch.testing.assert_close(low(x), conv(x))
    assert (low.in_features, low.out_features) == (20, 12)


def test_lowrank_layers_compile_with_no_graph_breaks():
    torch._dynamo.reset()
    layer = tlr.LowRankLinear(16, 12, 4)
    conv = tlr.LowRankConv2d(3, 6, 3, rank=2, padding=1)
    x, img = torch.randn(5, 16, requires_grad=True), torch.randn(2, 3, 8, 8)
    for module, inp in ((layer, x), (conv, img)):
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        out = compiled(inp)
        torch.testing.assert_close(out, module(inp))
        out.sum().backward()
        assert module.U.grad is not None and module.S.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lowrank_layers_in_half_precision_and_under_autocast(dtype):
    ref = tlr.LowRankLinear(32, 24, 8).double()
    x = torch.randn(4, 32, dtype=torch.float64)
    half = tlr.LowRankLinear.from_linear(ref.to_linear().to(dtype), 8)
    assert half.U.dtype == dtype
    torch.testing.assert_close(half(x.to(dtype)).double(), ref(x), atol=5e-2, rtol=5e-2)
    fp32 = copy.deepcopy(ref).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp32(x.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref(x), atol=5e-2, rtol=5e-2)


def test_lowrank_layers_run_and_train_on_every_available_device(device):
    torch.manual_seed(0)
    dense = nn.Linear(48, 32).to(device)
    low = tlr.LowRankLinear.from_linear(dense, 32)  # full rank: the same function
    assert low.U.device.type == device.type
    x = torch.randn(7, 48, device=device)
    torch.testing.assert_close(low(x), dense(x), atol=1e-4, rtol=1e-4)
    low(x).square().mean().backward()
    assert low.S.grad.device.type == device.type
    fresh = tlr.LowRankLinear(48, 32, 8, device=device)
    assert fresh.V.device.type == device.type and torch.isfinite(fresh.dense_weight()).all()


def test_float64_layers_are_initialised_orthonormal_to_float64_precision():
    layer = tlr.LowRankLinear(40, 30, 7, dtype=torch.float64)
    eye = torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-13, rtol=0)
    torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-13, rtol=0)
