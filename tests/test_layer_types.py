"""torchlowrank.layer_types: the one matrix view of a layer, as a specification.

For every layer type the library knows, the view's (out, in) matrix W is the map the layer applies:
y = W x (+ b) for linear layers, W applied to each unfolded input patch for convolutions, W applied to
one-hot codes for embeddings. Everything is checked against the module's own forward, in float64.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchlowrank as tlr
from torchlowrank.layer_types import is_matrix_layer, matrix_view, tied_aliases, why_not_matrix

DT = torch.float64


def _hf_conv1d(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf, nx).to(DT)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


def _linear_apply(W: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x @ W.T + (0 if b is None else b)


def _conv2d_apply(W: torch.Tensor, b: torch.Tensor | None, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 2-D convolution as the matrix W (out, in*kh*kw) applied to the unfolded patches of x."""
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    out = W @ cols  # (batch, out, patches)
    if b is not None:
        out = out + b[:, None]
    h = (x.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[
        0
    ] + 1
    return out.reshape(x.shape[0], W.shape[0], h, -1)


def _check_linear_forward(layer: nn.Module, n_in: int) -> None:
    view = matrix_view(layer)
    x = torch.randn(5, n_in, dtype=DT)
    assert view.shape == (view.read().shape[0], n_in)
    torch.testing.assert_close(_linear_apply(view.read(), layer.bias, x), layer(x), rtol=1e-12, atol=1e-12)


# -- each kind's view is the map its forward applies ----------------------------------------------------
def test_linear_view_is_its_weight_and_its_forward():
    layer = nn.Linear(7, 4, dtype=DT)
    view = matrix_view(layer)
    assert (view.kind, view.shape, view.exact, view.transposed, view.out_dim) == (
        "linear",
        (4, 7),
        True,
        False,
        0,
    )
    assert view.read() is layer.weight or view.read().data_ptr() == layer.weight.data_ptr()
    _check_linear_forward(layer, 7)


def test_hf_conv1d_view_is_the_transpose_of_its_stored_weight_and_its_forward():
    layer = _hf_conv1d(nx=6, nf=9)
    view = matrix_view(layer)
    assert tuple(layer.weight.shape) == (6, 9)  # stored (in, out)
    assert (view.kind, view.shape, view.transposed, view.out_dim) == ("hf_conv1d", (9, 6), True, 1)
    torch.testing.assert_close(view.read(), layer.weight.T, rtol=0, atol=0)
    _check_linear_forward(layer, 6)


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(stride=2, padding=1), dict(padding=2, dilation=2, bias=False)], ids=str
)
def test_conv2d_view_is_the_kernel_as_out_by_in_kh_kw_applied_to_unfolded_patches(kwargs):
    conv = nn.Conv2d(3, 5, (3, 2), dtype=DT, **kwargs)
    view = matrix_view(conv)
    assert (view.kind, view.shape, view.exact) == ("conv2d", (5, 3 * 3 * 2), True)
    x = torch.randn(2, 3, 9, 8, dtype=DT)
    torch.testing.assert_close(
        _conv2d_apply(view.read(), conv.bias, conv, x), conv(x), rtol=1e-12, atol=1e-12
    )


def test_embedding_view_is_the_dim_by_num_map_from_one_hot_codes():
    emb = nn.Embedding(11, 4, dtype=DT)
    view = matrix_view(emb)
    assert (view.kind, view.shape, view.transposed) == ("embedding", (4, 11), True)
    ids = torch.tensor([[0, 3, 10], [7, 7, 1]])
    torch.testing.assert_close(F.one_hot(ids, 11).to(DT) @ view.read().T, emb(ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    "build",
    [lambda: tlr.LowRankLinear(8, 6, rank=3), lambda: tlr.FactorizedLinear(8, 6, rank=3)],
    ids=["usv", "ab"],
)
def test_factorized_linear_views_are_the_matrix_their_factors_apply(build):
    layer = build().to(DT)
    view = matrix_view(layer)
    assert (view.kind, view.shape, view.computed, view.param) == ("factorized", (6, 8), True, None)
    assert torch.linalg.matrix_rank(view.read().detach()) == 3
    _check_linear_forward(layer, 8)
    with pytest.raises(TypeError, match="computes its matrix from factors"):
        view.write(torch.zeros(6, 8, dtype=DT))


@pytest.mark.parametrize("cls", [tlr.LowRankConv2d, tlr.FactorizedConv2d])
def test_factorized_conv_views_are_the_matrix_applied_to_unfolded_patches(cls):
    layer = cls(3, 5, 3, rank=2, padding=1).to(DT)
    view = matrix_view(layer)
    assert (view.kind, view.shape) == ("factorized", (5, 27))
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    torch.testing.assert_close(
        _conv2d_apply(view.read(), layer.bias, layer, x), layer(x), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("base", ["linear", "hf_conv1d"])
def test_adapted_view_is_w0_plus_delta_in_the_base_orientation(base):
    layer = nn.Linear(6, 9, dtype=DT) if base == "linear" else _hf_conv1d(nx=6, nf=9)
    model = nn.Sequential(layer)
    tlr.adapt(model, tlr.LoRAConfig(r=2, alpha=4, target_modules=["0"]))
    adapter = model[0]
    with torch.no_grad():
        adapter.lora_B.normal_()  # B = 0 at init would hide Delta W
    view = matrix_view(adapter)
    base_view = matrix_view(adapter.base_layer)
    assert (view.kind, view.shape, view.transposed) == ("adapted", (9, 6), base_view.transposed)
    torch.testing.assert_close(view.read(), base_view.read() + adapter.delta_matrix(), rtol=1e-12, atol=1e-12)
    _check_linear_forward(adapter, 6)
    assert tied_aliases(model, adapter) == []


# -- write, then read -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Linear(5, 3, dtype=DT),
        lambda: _hf_conv1d(nx=5, nf=3),
        lambda: nn.Conv2d(2, 3, 2, dtype=DT),
        lambda: nn.Embedding(7, 3, dtype=DT),
    ],
    ids=["linear", "hf_conv1d", "conv2d", "embedding"],
)
def test_write_then_read_round_trips_in_place(build):
    layer = build()
    view = matrix_view(layer)
    weight = layer.weight
    W = torch.randn(view.shape, dtype=DT)
    view.write(W)
    assert layer.weight is weight  # the Parameter object stays (optimizers keep their reference)
    torch.testing.assert_close(view.read(), W, rtol=0, atol=0)
    torch.testing.assert_close(view.to_layout(W), layer.weight, rtol=0, atol=0)
    torch.testing.assert_close(view.from_layout(layer.weight), W, rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected a matrix of shape"):
        view.write(torch.zeros(view.shape[1] + 1, view.shape[0], dtype=DT))


def test_write_changes_what_the_layer_computes():
    layer = _hf_conv1d(nx=4, nf=3)
    W = torch.randn(3, 4, dtype=DT)
    matrix_view(layer).write(W)
    x = torch.randn(2, 4, dtype=DT)
    torch.testing.assert_close(layer(x), x @ W.T + layer.bias, rtol=1e-12, atol=1e-12)


# -- what spectra list -------------------------------------------------------------------------------------
def test_tensor_is_what_spectra_list():
    conv, emb, c1d = nn.Conv2d(3, 4, 3), nn.Embedding(9, 2), _hf_conv1d(nx=5, nf=3)
    assert matrix_view(conv).tensor() is conv.weight and matrix_view(conv).tensor_shape == (4, 3, 3, 3)
    # an embedding's table as stored (num, dim): the (out, in) orientation of the head it is tied to
    assert matrix_view(emb).tensor() is emb.weight and matrix_view(emb).tensor_shape == (9, 2)
    assert matrix_view(c1d).tensor_shape == (3, 5)
    torch.testing.assert_close(matrix_view(c1d).tensor(), c1d.weight.T, rtol=0, atol=0)


# -- not a matrix layer, and why ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module, reason",
    [
        (nn.ReLU(), r"ReLU has no weight matrix \(known: nn.Linear, HF Conv1D"),
        (nn.LayerNorm(4), r"LayerNorm has a weight of shape \(4,\) but is not a matrix layer"),
        (nn.Conv2d(4, 4, 3, groups=2), r"grouped convolution \(groups=2\).*2 separate matrices"),
        (nn.ConvTranspose2d(3, 4, 3), r"transposed convolution"),
    ],
    ids=["relu", "layernorm", "grouped", "transposed"],
)
def test_why_not_matrix_names_the_reason(module, reason):
    assert not is_matrix_layer(module)
    assert why_not_matrix(module) is not None
    assert re.search(reason, why_not_matrix(module)), why_not_matrix(module)


def test_matrix_layers_have_no_reason():
    for layer in (nn.Linear(2, 3), nn.Conv2d(1, 2, 3), nn.Embedding(4, 2), tlr.LowRankLinear(4, 4, 2)):
        assert is_matrix_layer(layer) and why_not_matrix(layer) is None


def test_kernel_views_keep_grouped_convolutions_in_spectra():
    conv = nn.Conv2d(4, 6, 3, groups=2)
    view = matrix_view(conv)
    assert view is not None and not view.exact and view.shape == (6, 2 * 9)
    assert [r.name for r in tlr.spectrum(nn.Sequential(conv))] == ["0"]


# -- tied aliases --------------------------------------------------------------------------------------------
def test_tied_aliases_of_gpt2_embedding_and_head(tiny_gpt2):
    wte, head = tiny_gpt2.transformer.wte, tiny_gpt2.lm_head
    assert tied_aliases(tiny_gpt2, wte) == ["lm_head.weight"]
    assert tied_aliases(tiny_gpt2, head) == ["transformer.wte.weight"]
    assert tied_aliases(tiny_gpt2, tiny_gpt2.transformer.h[0].attn.c_attn) == []
    vocab, dim = wte.weight.shape
    # one tensor, two orientations: the head's (out, in) = (vocab, dim) is the embedding's (in, out)
    assert matrix_view(head).shape == (vocab, dim) and matrix_view(wte).shape == (dim, vocab)
    torch.testing.assert_close(matrix_view(head).read(), matrix_view(wte).read().T, rtol=0, atol=0)
    # listed once, under its first name, by spectrum and the tracker alike
    names = [r.name for r in tlr.spectrum(tiny_gpt2)]
    assert "transformer.wte" in names and "lm_head" not in names
    tracker = tlr.SpectrumTracker(tiny_gpt2, every=1, track=("weight",))
    assert {r["layer"] for r in tracker.history} == set(names)


def test_gpt2_projections_view_matches_their_forward(tiny_gpt2):
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"):
        layer = tiny_gpt2.get_submodule(name).to(DT)
        view = matrix_view(layer)
        assert view.kind == "hf_conv1d"
        _check_linear_forward(layer, view.shape[1])


# -- a new layer type through layer_types.py alone: nn.Conv1d ------------------------------------------------
def _conv1d_apply(W: torch.Tensor, b: torch.Tensor | None, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A 1-D convolution as W (out, in*k) applied to the unfolded patches of x (a (k, 1) 2-D unfold)."""
    (k,), (d,), (p,), (s,) = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    cols = F.unfold(x[..., None], (k, 1), dilation=(d, 1), padding=(p, 0), stride=(s, 1))
    out = W @ cols
    return out if b is None else out + b[:, None]


def _conv1d_model() -> nn.Module:
    return nn.Sequential(nn.Conv1d(3, 6, 4, padding=1, dtype=DT), nn.Flatten(), nn.Linear(6 * 9, 5, dtype=DT))


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(stride=2, padding=1), dict(padding=3, dilation=2, bias=False)], ids=str
)
def test_conv1d_view_is_the_kernel_as_out_by_in_k_applied_to_unfolded_patches(kwargs):
    conv = nn.Conv1d(3, 5, 4, dtype=DT, **kwargs)
    view = matrix_view(conv)
    assert (view.kind, view.shape, view.exact, view.out_dim) == ("conv1d", (5, 12), True, 0)
    assert is_matrix_layer(conv) and why_not_matrix(conv) is None
    x = torch.randn(2, 3, 11, dtype=DT)
    torch.testing.assert_close(
        _conv1d_apply(view.read(), conv.bias, conv, x), conv(x), rtol=1e-12, atol=1e-12
    )
    W = torch.randn(5, 12, dtype=DT)
    view.write(W)
    torch.testing.assert_close(view.read(), W, rtol=0, atol=0)
    torch.testing.assert_close(_conv1d_apply(W, conv.bias, conv, x), conv(x), rtol=1e-12, atol=1e-12)


def test_conv1d_in_spectrum_and_the_tracker():
    model = _conv1d_model()
    W = matrix_view(model[0]).read().detach()
    row = {r.name: r for r in tlr.spectrum(model, top_k=3)}["0"]
    assert row.shape == (6, 3, 4) and row.full_rank == 6
    assert row.top_singular_values == pytest.approx(torch.linalg.svdvals(W)[:3].tolist(), rel=1e-12)
    tracker = tlr.SpectrumTracker(model, every=1, top_k=3)
    model(torch.randn(2, 3, 10, dtype=DT)).square().sum().backward()
    tracker.step()
    rows = {(r["layer"], r["quantity"]): r for r in tracker.history if r["step"] == 1}
    assert (rows["0", "weight"]["rows"], rows["0", "weight"]["cols"]) == (6, 12)
    G = model[0].weight.grad.reshape(6, 12)
    assert rows["0", "grad"]["top_singular_values"] == pytest.approx(
        torch.linalg.svdvals(G)[:3].tolist(), rel=1e-10
    )


def test_q3r_on_conv1d_is_q3r_on_the_linear_layer_of_its_matrix_view():
    conv = nn.Conv1d(3, 6, 4, dtype=DT)
    lin = nn.Linear(12, 6, dtype=DT)
    with torch.no_grad():
        lin.weight.copy_(matrix_view(conv).read())
    for layer in (conv, lin):
        tlr.Q3R(layer, 2, 0.3, method="full").step()
    torch.testing.assert_close(
        matrix_view(conv).from_layout(conv.weight.grad), lin.weight.grad, rtol=1e-12, atol=1e-14
    )
    assert tlr.Q3R(_conv1d_model(), 2, 0.1).names == ["0", "2"]  # selected by default


def test_conv1d_has_no_factorized_or_adapter_layer_so_compress_and_adapt_refuse_it():
    # a replacement needs a per-kind construction (a LowRankConv1d, a Conv1d adapter) that does not exist
    model = _conv1d_model()
    with pytest.raises(ValueError, match="unsupported types: 0 \\(Conv1d\\)"):
        tlr.truncate(model, 0.5, targets=["0"])
    report = tlr.truncate(model, 0.5)
    assert list(report.ranks) == ["2"] and isinstance(model[0], nn.Conv1d)
    with pytest.raises(ValueError, match="Conv1d is not a supported layer type"):
        tlr.adapt(_conv1d_model(), tlr.LoRAConfig(r=2, target_modules=["0"]))


def test_a_lazy_layer_is_a_matrix_layer_once_its_weight_exists():
    layer = nn.LazyLinear(3, dtype=DT)
    assert matrix_view(layer) is None and "lazy" in why_not_matrix(layer)
    layer(torch.randn(2, 5, dtype=DT))
    assert matrix_view(layer).shape == (3, 5)
    _check_linear_forward(layer, 5)
