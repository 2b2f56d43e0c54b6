"""GaLoreAdamW against the galore-torch package on the same matrices, and its warm-started refresh."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from torchlowrank.linalg import principal_angles
from torchlowrank.optim import GaLoreAdamW

galore_torch = pytest.importorskip("galore_torch")


def _model(seed):
    torch.manual_seed(seed)
    # a tall (m >= n: right projection) and a wide (m < n: left projection) matrix, plus a bias
    return nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 12))


def _groups(model):
    mats = [model[0].weight, model[2].weight]
    rest = [model[0].bias, model[2].bias]
    return mats, rest


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_update_matches_galore_torch_over_refreshes(weight_decay):
    ours_m, ref_m = _model(0), _model(0)
    mats, rest = _groups(ours_m)
    ours = GaLoreAdamW([{"params": mats}, {"params": rest, "rank": None}], lr=1e-2, rank=4, update_gap=5, scale=0.25,
                       weight_decay=weight_decay, refresh="svd")
    rmats, rrest = _groups(ref_m)
    ref = galore_torch.GaLoreAdamW([{"params": rmats, "rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": "std"},
                                    {"params": rrest}], lr=1e-2, weight_decay=weight_decay, no_deprecation_warning=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):  # covers refreshes at steps 0, 5, 10
        x, y = torch.randn(16, 24, generator=g), torch.randn(16, 12, generator=g)
        for model, opt in ((ours_m, ours), (ref_m, ref)):
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            opt.step()
    for a, b in zip(ours_m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (ours_m[0].weight - _model(0)[0].weight).abs().max() > 1e-3  # it moved: the comparison can fail


def test_state_memory_equals_the_package():
    ours_m, ref_m = _model(0), _model(0)
    ours = GaLoreAdamW([ours_m[0].weight, ours_m[2].weight], lr=1e-2, rank=4, update_gap=5, scale=0.25)
    ref = galore_torch.GaLoreAdamW([{"params": [ref_m[0].weight, ref_m[2].weight], "rank": 4, "update_proj_gap": 5,
                                     "scale": 0.25, "proj_type": "std"}], lr=1e-2, no_deprecation_warning=True)
    x = torch.randn(8, 24)
    for model, opt in ((ours_m, ours), (ref_m, ref)):
        model(x).sum().backward()
        opt.step()
    ref_bytes = 0
    for st in ref.state.values():
        for k, v in st.items():
            if torch.is_tensor(v):
                ref_bytes += v.numel() * v.element_size()
        P = st["projector"].ortho_matrix
        ref_bytes += P.numel() * P.element_size()
    assert ours.state_bytes() == ref_bytes


def test_warm_refresh_finds_the_top_singular_subspace():
    """A gradient with a spectral gap: the subspace-iteration projector is the exact top-r one."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 120, 80, 6
    Uq = torch.linalg.qr(torch.randn(m, n, generator=g)).Q
    Vq = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    s = torch.cat([torch.linspace(10, 5, r), torch.linspace(0.5, 0.01, n - r)])
    G = (Uq * s) @ Vq.T
    p = nn.Parameter(torch.zeros(m, n))
    opt = GaLoreAdamW([p], lr=1e-3, rank=r, update_gap=1, scale=1.0)
    for _ in range(3):
        p.grad = G.clone()
        opt.step()
    P = opt.state[p]["ortho"]  # (r, n): right projection since m >= n
    assert principal_angles(P.T, Vq[:, :r]).max() < 1e-3
    # wide matrix: left projection
    q = nn.Parameter(torch.zeros(n, m))
    opt2 = GaLoreAdamW([q], lr=1e-3, rank=r, update_gap=1, scale=1.0)
    q.grad = G.T.clone()
    opt2.step()
    assert principal_angles(opt2.state[q]["ortho"], Vq[:, :r]).max() < 1e-2


def test_resume_equals_uninterrupted():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 24, generator=g), torch.randn(8, 12, generator=g)) for _ in range(14)]

    def train(model, opt, bs):
        for x, y in bs:
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            opt.step()

    a = _model(0)
    opt = GaLoreAdamW(a.parameters(), lr=1e-2, rank=4, update_gap=4, scale=0.25)
    train(a, opt, batches[:6])
    buf = io.BytesIO()
    torch.save({"m": a.state_dict(), "o": opt.state_dict()}, buf)
    train(a, opt, batches[6:])
    ck = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    b = _model(5)
    b.load_state_dict(ck["m"])
    opt2 = GaLoreAdamW(b.parameters(), lr=1e-2, rank=4, update_gap=4, scale=0.25)
    opt2.load_state_dict(ck["o"])
    train(b, opt2, batches[6:])
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_bf16_and_large_scale_gradients():
    for dtype, scale in ((torch.bfloat16, 1.0), (torch.float32, 1e4), (torch.float32, 1e-4)):
        p = nn.Parameter(torch.randn(40, 30, dtype=dtype))
        opt = GaLoreAdamW([p], lr=1e-2, rank=4, update_gap=2)
        before = p.detach().clone()
        for _ in range(3):
            p.grad = (torch.randn(40, 30) * scale).to(dtype)
            opt.step()
        assert p.dtype == dtype and torch.isfinite(p).all()
        assert (p - before).abs().max() > 0


def test_bad_arguments():
    p = nn.Parameter(torch.zeros(4, 4))
    for kw in (dict(lr=0.0), dict(rank=0), dict(update_gap=0), dict(refresh="qr")):
        with pytest.raises(ValueError):
            GaLoreAdamW([p], **kw)
