"""Every training feature in float32 on every available device (CPU, and CUDA when present) against
a float64 run on the CPU: adapters (merge included), the geometric optimizers (rank decisions
included), GaLore, Q3R and the spectrum tracker. Same seeds, same data; only device and precision
differ, so a device-specific bug (a tensor left on the CPU, a device-dependent default) shows as an
error or a mismatch."""

import copy

import pytest
import torch
from torch import nn

import torchlowrank as tlr


def _data(steps=6, batch=32, d_in=20, classes=5):
    g = torch.Generator().manual_seed(7)
    return torch.randn(steps, batch, d_in, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (steps, batch), generator=g
    )


def _train(model, opt, xs, ys, device, dtype, reg=None):
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(device, dtype)), y.to(device)).backward()
        if reg is not None:
            reg.step()
        opt.step()


def _assert_state_close(got: nn.Module, want: nn.Module, atol: float):
    for (k, a), b in zip(got.state_dict().items(), want.state_dict().values()):
        assert a.shape == b.shape, k
        torch.testing.assert_close(
            a.detach().cpu().double(), b.detach().double(), atol=atol, rtol=atol, msg=k
        )


def _lowrank_mlp():
    torch.manual_seed(0)
    return nn.Sequential(tlr.LowRankLinear(20, 32, 6), nn.ReLU(), nn.Linear(32, 5))


def _dense_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: tlr.optim.LowRankAdam(m, lr=0.05, tau=0.2),
        # element-wise Adam normalises each coefficient: the exact zeros of the new directions' triangular
        # block must stay zeros (rounding noise there made float32 leave float64 by 0.07 in 6 steps)
        lambda m: tlr.optim.LowRankAdam(m, lr=0.05, tau=0.0, second_moment="elementwise", basis_lr_ratio=3.0),
        lambda m: tlr.optim.LowRankAdam(m, lr=0.05, tau=0.2, augment_every=2),
        lambda m: tlr.optim.LowRankSGD(m, lr=0.2, tau=0.2),
    ],
    ids=["LowRankAdam", "LowRankAdam-elementwise-fixed-rank", "LowRankAdam-augment-every-2", "LowRankSGD"],
)
def test_geometric_optimizers_on_each_device_follow_the_float64_cpu_run(device, make_opt):
    xs, ys = _data()
    ref = _lowrank_mlp().double()
    _train(ref, make_opt(ref), xs, ys, "cpu", torch.float64)
    model = _lowrank_mlp().to(device)
    opt = make_opt(model)
    _train(model, opt, xs, ys, device, torch.float32)
    assert model[0].U.device.type == device.type
    assert model[0].rank == ref[0].rank  # the same rank decisions
    # U, V are defined up to signs (and rotations within equal singular values): compare W and the rest
    torch.testing.assert_close(
        model[0].dense_weight().cpu().double(), ref[0].dense_weight(), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(model[0].S.detach().cpu().double(), ref[0].S.detach(), atol=1e-4, rtol=1e-4)
    _assert_state_close(model[2], ref[2], atol=1e-4)
    assert all(
        torch.is_tensor(v) is False or v.device.type == device.type
        for st in opt.state.values()
        for v in st.values()
    )


@pytest.mark.parametrize("refresh", ["svd", "warm"])
def test_galore_on_each_device_follows_the_float64_cpu_run(device, refresh):
    """Refreshes at steps 0 and 3: the moments carried across the second one need sign-fixed projectors."""
    xs, ys = _data()

    def make(m):
        return tlr.optim.GaLoreAdamW(m.parameters(), lr=1e-2, rank=4, update_gap=3, refresh=refresh)

    ref = _dense_mlp().double()
    _train(ref, make(ref), xs, ys, "cpu", torch.float64)
    model = _dense_mlp().to(device)
    _train(model, make(model), xs, ys, device, torch.float32)
    _assert_state_close(model, ref, atol=1e-4)


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_q3r_on_each_device_follows_the_float64_cpu_run(device, method):
    xs, ys = _data()
    ref = _dense_mlp().double()
    reg_ref = tlr.Q3R(ref, target_rank=3, lam=0.05, period=2, method=method, targets=["0", "2"])
    _train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), xs, ys, "cpu", torch.float64, reg_ref)
    model = _dense_mlp().to(device)
    reg = tlr.Q3R(model, target_rank=3, lam=0.05, period=2, method=method, targets=["0", "2"])
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1), xs, ys, device, torch.float32, reg)
    _assert_state_close(model, ref, atol=1e-4)
    assert reg.value().device.type == device.type
    assert reg.value().item() == pytest.approx(reg_ref.value().item(), rel=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        tlr.LoRAConfig(r=4, alpha=8, target_modules=["0", "2"]),
        tlr.DeepLoRAConfig(r=4, depth=3, compress=False, init_scale=0.3, target_modules=["0", "2"]),
    ],
    ids=["lora", "deep_lora"],
)
def test_adapters_train_and_merge_on_each_device_like_the_float64_cpu_run(device, config):
    xs, ys = _data()

    def adapted(dtype, dev):
        model = _dense_mlp().to(dev, dtype)
        tlr.adapt(model, copy.deepcopy(config))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # the same draws whatever the dtype (randn in float64 draws other numbers)
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        return model

    ref = adapted(torch.float64, "cpu")
    _train(
        ref,
        torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1),
        xs,
        ys,
        "cpu",
        torch.float64,
    )
    model = adapted(torch.float32, device)
    _train(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        xs,
        ys,
        device,
        torch.float32,
    )
    x = xs[0].to(device, torch.float32)
    before = model(x)
    tlr.merge(model)
    assert not any("lora" in k for k in model.state_dict())
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    tlr.merge(ref)
    torch.testing.assert_close(model(x).cpu().double(), ref(xs[0]), atol=1e-4, rtol=1e-4)


def test_spectrum_tracker_on_each_device_records_the_float64_cpu_spectra(device):
    xs, ys = _data()
    runs = {}
    for dev, dtype in ((device, torch.float32), ("cpu", torch.float64)):
        model = _dense_mlp().to(dev, dtype)
        tracker = tlr.SpectrumTracker(model, every=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tracker.attach(opt)
        _train(model, opt, xs, ys, dev, dtype)
        runs[dtype] = tracker.history
    got, want = runs[torch.float32], runs[torch.float64]
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert (a["step"], a["layer"], a["quantity"]) == (b["step"], b["layer"], b["quantity"])
        assert a["stable_rank"] == pytest.approx(b["stable_rank"], rel=1e-3, abs=1e-6)
