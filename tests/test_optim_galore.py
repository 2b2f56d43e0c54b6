"""GaLoreAdamW against the galore-torch package on the same matrices, and its warm-started refresh."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from host_syncs import HostSyncCounter
from torchlowrank.linalg import principal_angles, sign_fixed
from torchlowrank.optim import GaLoreAdamW
from torchlowrank.optim import galore as galore_module

galore_torch = pytest.importorskip("galore_torch")


def _model(seed):
    torch.manual_seed(seed)
    # a tall (m >= n: right projection) and a wide (m < n: left projection) matrix, plus a bias
    return nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 12))


def _groups(model):
    mats = [model[0].weight, model[2].weight]
    rest = [model[0].bias, model[2].bias]
    return mats, rest


def _fix_signs(X):
    """Each column's largest-|entry| component positive (the convention GaLoreAdamW uses)."""
    return sign_fixed(X)[0]


@pytest.fixture
def sign_fixed_package(monkeypatch):
    """galore-torch with its projector's singular vectors sign-fixed, nothing else changed.

    The package keeps the LAPACK signs of torch.linalg.svd, which are arbitrary (another device or
    library returns other ones), and its Adam moments are kept across a refresh, so after the second
    refresh the update depends on those signs. GaLoreAdamW fixes them; with the same convention in
    the package the two updates must agree exactly."""
    orig = galore_torch.galore_projector.GaLoreProjector.get_orthogonal_matrix

    def fixed(self, weights, rank, type):
        P = orig(self, weights, rank, type)
        return _fix_signs(P.T).T if type == "right" else _fix_signs(P)

    monkeypatch.setattr(galore_torch.galore_projector.GaLoreProjector, "get_orthogonal_matrix", fixed)


def _run_both(weight_decay, steps):
    ours_m, ref_m = _model(0), _model(0)
    mats, rest = _groups(ours_m)
    ours = GaLoreAdamW(
        [{"params": mats}, {"params": rest, "rank": None}],
        lr=1e-2,
        rank=4,
        update_gap=5,
        scale=0.25,
        weight_decay=weight_decay,
        refresh="svd",
    )
    rmats, rrest = _groups(ref_m)
    ref = galore_torch.GaLoreAdamW(
        [
            {"params": rmats, "rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": "std"},
            {"params": rrest},
        ],
        lr=1e-2,
        weight_decay=weight_decay,
        no_deprecation_warning=True,
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(16, 24, generator=g), torch.randn(16, 12, generator=g)
        for model, opt in ((ours_m, ours), (ref_m, ref)):
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            opt.step()
    return ours_m, ref_m


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_update_matches_galore_torch_with_sign_fixed_projectors_over_refreshes(
    sign_fixed_package, weight_decay
):
    ours_m, ref_m = _run_both(weight_decay, steps=12)  # refreshes at steps 0, 5, 10
    for a, b in zip(ours_m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (ours_m[0].weight - _model(0)[0].weight).abs().max() > 1e-3  # it moved: the comparison can fail


def test_update_matches_the_unmodified_package_while_one_projector_is_in_use():
    """Until the second refresh the update is sign-invariant: R = G P^T and direction @ P flip together."""
    ours_m, ref_m = _run_both(0.0, steps=5)
    for a, b in zip(ours_m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _gapped_gradient(m, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    Uq = torch.linalg.qr(torch.randn(m, min(m, n), generator=g)).Q
    Vq = torch.linalg.qr(torch.randn(n, min(m, n), generator=g)).Q
    s = torch.cat([torch.linspace(10, 5, r), torch.linspace(0.5, 0.01, min(m, n) - r)])
    return (Uq * s) @ Vq.T


def _projector_after_steps(G, refresh, steps=1, **kw):
    p = nn.Parameter(torch.zeros(G.shape))
    opt = GaLoreAdamW([p], lr=1e-3, rank=4, update_gap=1, refresh=refresh, **kw)
    for _ in range(steps):
        p.grad = G.clone()
        opt.step()
    return opt.state[p]["ortho"]


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)], ids=["right", "left"])
@pytest.mark.parametrize("refresh", ["svd", "warm"])
def test_projector_does_not_depend_on_the_signs_the_factorizations_return(monkeypatch, refresh, shape):
    """Another LAPACK / cuSOLVER may return any column of U, V or Q negated: the projector stays bit-identical."""
    G = _gapped_gradient(*shape, r=4)
    want = _projector_after_steps(G, refresh, steps=3)
    flips = torch.Generator().manual_seed(3)

    def signs(k, dtype):
        return torch.randint(0, 2, (k,), generator=flips).to(dtype) * 2 - 1

    svd, qr = torch.linalg.svd, torch.linalg.qr

    def flipped_svd(A, full_matrices=True):
        U, S, Vh = svd(A, full_matrices=full_matrices)
        d = signs(S.shape[-1], U.dtype)
        return torch.return_types.linalg_svd((U * d, S, d[:, None] * Vh))

    def flipped_qr(A, mode="reduced"):
        Q, R = qr(A, mode=mode)
        d = signs(Q.shape[-1], Q.dtype)
        return torch.return_types.linalg_qr((Q * d, d[:, None] * R))

    monkeypatch.setattr(galore_module.torch.linalg, "svd", flipped_svd)
    monkeypatch.setattr(galore_module.torch.linalg, "qr", flipped_qr)
    got = _projector_after_steps(G, refresh, steps=3)
    monkeypatch.undo()
    assert not torch.equal(signs(8, torch.float32), torch.ones(8))  # the flips are not all +1
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(120, 80), (80, 120)], ids=["right", "left"])
def test_warm_refresh_equals_the_svd_refresh_in_order_and_sign_on_a_gapped_spectrum(shape):
    G = _gapped_gradient(*shape, r=4)
    exact = _projector_after_steps(G, "svd")
    for steps in (1, 3):  # the first refresh (random sketch) and warm-started ones
        warm = _projector_after_steps(G, "warm", steps=steps)
        torch.testing.assert_close(warm, exact, rtol=0, atol=1e-4)


@pytest.mark.parametrize("spectrum", ["geometric", "harmonic", "rank_deficient", "repeated_top"])
def test_top_eigenvectors_solve_the_eigenproblem_in_descending_order(spectrum):
    g = torch.Generator().manual_seed(0)
    k, r = 40, 30
    Q = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64)).Q
    # (eigenvalues, the columns whose eigenvalue is simple, tolerance)
    lam, unique, tol = {
        "geometric": (0.9 ** torch.arange(k, dtype=torch.float64), slice(0, r), 1e-12),
        "harmonic": (
            1.0 / torch.arange(1, k + 1, dtype=torch.float64),
            slice(0, r),
            1e-12,
        ),  # close neighbours
        "rank_deficient": (
            torch.cat([torch.linspace(2, 1, 20), torch.zeros(k - 20)]).double(),
            slice(0, 20),
            1e-12,
        ),
        # a repeated top eigenvalue converges linearly, not quadratically
        "repeated_top": (
            torch.cat([torch.full((5,), 3.0), torch.linspace(2, 1e-3, k - 5)]).double(),
            slice(5, r),
            1e-3,
        ),
    }[spectrum]
    C = (Q * lam) @ Q.T
    X = galore_module._top_eigenvectors(C, r)
    torch.testing.assert_close(X.T @ X, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(C @ X, X * lam[:r], rtol=0, atol=tol)  # C X = X diag(lam), lam descending
    torch.testing.assert_close(
        sign_fixed(X[:, unique])[0], sign_fixed(Q[:, unique])[0], rtol=0, atol=10 * tol
    )


def test_warm_refresh_steps_make_no_host_syncs_and_svd_refreshes_one_each():
    model = _model(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 24, generator=g), torch.randn(8, 12, generator=g)) for _ in range(7)]
    for refresh in ("warm", "svd"):
        opt = GaLoreAdamW(model.parameters(), lr=1e-2, rank=4, update_gap=2, refresh=refresh)
        calls = []
        for x, y in batches:  # refreshes at steps 0, 2, 4, 6 of two matrices
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            with HostSyncCounter() as syncs:
                opt.step()
            calls += syncs.calls
        assert calls == ([] if refresh == "warm" else ["linalg_svd"] * 8), refresh


def test_state_memory_equals_the_package():
    ours_m, ref_m = _model(0), _model(0)
    ours = GaLoreAdamW([ours_m[0].weight, ours_m[2].weight], lr=1e-2, rank=4, update_gap=5, scale=0.25)
    ref = galore_torch.GaLoreAdamW(
        [
            {
                "params": [ref_m[0].weight, ref_m[2].weight],
                "rank": 4,
                "update_proj_gap": 5,
                "scale": 0.25,
                "proj_type": "std",
            }
        ],
        lr=1e-2,
        no_deprecation_warning=True,
    )
    x = torch.randn(8, 24)
    for model, opt in ((ours_m, ours), (ref_m, ref)):
        model(x).sum().backward()
        opt.step()
    ref_bytes = 0
    for st in ref.state.values():
        for v in st.values():
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


def test_warm_refresh_solves_the_eigenproblems_of_same_rank_matrices_in_one_batch(monkeypatch):
    """The batched Rayleigh-Ritz gives each matrix the projector it gets alone."""
    model = _model(0)
    x, y = torch.randn(16, 24), torch.randn(16, 12)
    (model(x) - y).pow(2).mean().backward()
    calls = []
    solve = galore_module._top_eigenvectors
    monkeypatch.setattr(galore_module, "_top_eigenvectors", lambda C, r: calls.append(C.shape) or solve(C, r))
    opt = GaLoreAdamW(model.parameters(), lr=1e-2, rank=4, update_gap=2)
    opt.step()
    assert calls == [(2, 12, 12)]  # two matrices (40, 24) and (12, 40), k = 4 + 8, one batch
    for index, W in ((1, model[0].weight), (3, model[2].weight)):
        G = W.grad if W.shape[0] >= W.shape[1] else W.grad.T
        alone = galore_module._top_subspace(G, 4, None, 2, 8, torch.Generator().manual_seed(1000003 * index))
        got = opt.state[W]["ortho"]
        torch.testing.assert_close(got.T if W.shape[0] >= W.shape[1] else got, alone, rtol=0, atol=1e-6)


def test_warm_refresh_of_bf16_conv_kernels_makes_no_host_syncs():
    g = torch.Generator().manual_seed(0)
    kernel = nn.Parameter(
        torch.randn(16, 3, 3, 3, generator=g).to(torch.bfloat16)
    )  # projected as (16, 27): left
    wide = nn.Parameter(torch.randn(6, 30, generator=g).to(torch.bfloat16))
    opt = GaLoreAdamW([kernel, wide], lr=1e-2, rank=4, update_gap=2)
    calls = []
    for _ in range(5):
        for p in (kernel, wide):
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
        with HostSyncCounter() as syncs:
            opt.step()
        calls += syncs.calls
    assert calls == []
    assert opt.state[kernel]["ortho"].shape == (16, 4) and opt.state[wide]["ortho"].shape == (6, 4)
