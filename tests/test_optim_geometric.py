"""LowRankSGD / LowRankAdam (DESIGN §4.5): the geometric step, momentum transport, rank adaptivity, state."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import torchlowrank as tlr
from torchlowrank.linalg import principal_angles
from torchlowrank.optim import LowRankAdam, LowRankSGD, resize_to_state_dict


def tangent_projection(U: torch.Tensor, V: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """P_T(G) at W = U S V^T: U U^T G + G V V^T - U U^T G V V^T."""
    PU, PV = U @ U.T, V @ V.T
    return PU @ G + G @ PV - PU @ G @ PV


def dense_gradient(layer, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """dL/dW of L = 0.5 ||layer(x) - target||^2 at W = layer's dense weight, via a dense copy."""
    if isinstance(layer, tlr.LowRankLinear):
        dense = layer.to_linear()
        w = dense.weight
    else:
        dense = layer.to_conv2d()
        w = dense.weight
    loss = 0.5 * (dense(x) - target).pow(2).sum()
    (g,) = torch.autograd.grad(loss, w)
    return g.reshape(g.shape[0], -1)


def make_layer(kind: str, rank: int, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "linear":
        layer = tlr.LowRankLinear(14, 11, rank, dtype=dtype)
        x = torch.randn(9, 14, dtype=dtype)
        target = torch.randn(9, 11, dtype=dtype)
    else:
        layer = tlr.LowRankConv2d(3, 10, 3, rank, padding=1, dtype=dtype)
        x = torch.randn(2, 3, 6, 6, dtype=dtype)
        target = torch.randn(2, 10, 6, 6, dtype=dtype)
    return layer, x, target


def loss_backward(layer, x, target):
    layer.zero_grad(set_to_none=True)
    loss = 0.5 * (layer(x) - target).pow(2).sum()
    loss.backward()
    return loss


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_untruncated_step_equals_tangent_space_gradient_step(kind, scale):
    layer, x, target = make_layer(kind, rank=3)
    x, target = x * scale, target * scale
    U, V, W = layer.U.detach().clone(), layer.V.detach().clone(), layer.dense_weight().detach().clone()
    G = dense_gradient(layer, x, target)
    lr = 0.3 / (x.pow(2).sum().item() / x.shape[0])  # x is already scaled
    opt = LowRankSGD(layer, lr=lr, momentum=0.0, tau=1e-13, max_rank=6)
    loss_backward(layer, x, target)
    opt.step()
    expected = W - lr * tangent_projection(U, V, G)
    assert layer.rank == 6
    torch.testing.assert_close(
        layer.dense_weight(), expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item()
    )


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fixed_rank_step_is_best_rank_r_approximation_of_tangent_step(kind):
    layer, x, target = make_layer(kind, rank=3)
    U, V, W = layer.U.detach().clone(), layer.V.detach().clone(), layer.dense_weight().detach().clone()
    G = dense_gradient(layer, x, target)
    opt = LowRankSGD(layer, lr=0.01, momentum=0.0)
    loss_backward(layer, x, target)
    opt.step()
    Ut, St, Vht = torch.linalg.svd(W - 0.01 * tangent_projection(U, V, G))
    best = (Ut[:, :3] * St[:3]) @ Vht[:3]
    assert layer.rank == 3 and layer.U.shape == (W.shape[0], 3)
    torch.testing.assert_close(layer.dense_weight(), best, rtol=1e-10, atol=1e-12)


def test_near_singular_s_still_gives_the_exact_tangent_step():
    """S with entries 0 and 1e-200: dL/dU = G V diag(S) carries no information there; the probe must."""
    layer, x, target = make_layer("linear", rank=4)
    with torch.no_grad():
        layer.S.copy_(torch.tensor([2.0, 1e-8, 1e-200, 0.0], dtype=torch.float64))
    U, V, W = layer.U.detach().clone(), layer.V.detach().clone(), layer.dense_weight().detach().clone()
    G = dense_gradient(layer, x, target)
    opt = LowRankSGD(layer, lr=0.01, momentum=0.0, tau=1e-14, max_rank=8)
    loss_backward(layer, x, target)
    opt.step()
    expected = W - 0.01 * tangent_projection(U, V, G)
    torch.testing.assert_close(layer.dense_weight(), expected, rtol=1e-10, atol=1e-12)
    # the augmented basis really contains G V for the zero singular value (not just U's span)
    assert (expected - layer.dense_weight()).abs().max() < 1e-12
    assert (W - 0.01 * G).sub(expected).abs().max() > 1e-6  # P_T mattered: the test can fail


def test_momentum_is_transported_exactly_on_augmentation():
    """With nothing truncated, the W-space momentum used in step 2 is beta * M1 + P_T(W1)(G2)."""
    torch.manual_seed(1)
    layer = tlr.LowRankLinear(16, 13, 2, dtype=torch.float64)
    x, target = torch.randn(10, 16, dtype=torch.float64), torch.randn(10, 13, dtype=torch.float64)
    beta, lr = 0.9, 0.005
    opt = LowRankSGD(layer, lr=lr, momentum=beta, tau=1e-13, max_rank=13)

    def momentum_w():
        C = opt.state[layer.U]["momentum_buffer"]
        return layer.U.detach() @ C @ layer.V.detach().T

    loss_backward(layer, x, target)
    opt.step()
    M1, U1, V1, W1 = (
        momentum_w(),
        layer.U.detach().clone(),
        layer.V.detach().clone(),
        layer.dense_weight().detach().clone(),
    )
    G2 = dense_gradient(layer, x, target)
    loss_backward(layer, x, target)
    opt.step()
    assert layer.rank > 4  # step 2 augmented again (4 -> up to 8; a direction below tau may be dropped)
    M2 = beta * M1 + tangent_projection(U1, V1, G2)
    # the step used the whole transported momentum ...
    torch.testing.assert_close(layer.dense_weight(), W1 - lr * M2, rtol=1e-10, atol=1e-12)
    # ... and the stored one is its projection onto the kept bases (DESIGN §4.5 step 5)
    U2, V2 = layer.U.detach(), layer.V.detach()
    torch.testing.assert_close(momentum_w(), U2 @ U2.T @ M2 @ V2 @ V2.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt_cls", [LowRankSGD, LowRankAdam])
@pytest.mark.parametrize("tau", [0.0, 0.2])
def test_factors_stay_orthonormal_after_many_steps(opt_cls, tau):
    """Also: the unit state has the (r, r) shape of the current rank (LowRankAdam: a scalar second moment)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        tlr.LowRankConv2d(1, 8, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        tlr.LowRankLinear(8 * 6 * 6, 20, 5),
        nn.ReLU(),
        nn.Linear(20, 3),
    )
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    opt = opt_cls(model, lr=0.05 if opt_cls is LowRankSGD else 3e-3, tau=tau)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for layer in (model[0], model[3]):
        for F in (layer.U, layer.V):
            eye = torch.eye(F.shape[1])
            assert (F.T @ F - eye).abs().max() < 1e-5
        assert layer.U.shape[1] == layer.S.shape[0] == layer.V.shape[1] == layer.rank
        st = opt.state[layer.U]
        assert st["rank"] == layer.rank
        for k, v in st.items():
            if torch.is_tensor(v):
                assert v.shape == ((layer.rank, layer.rank) if k != "exp_avg_sq" else ()), k


@pytest.mark.parametrize("kappa", [1e1, 1e3, 1e5])
def test_error_after_few_steps_with_lr_1_does_not_depend_on_condition_number(kappa):
    """1/2 ||W - A||^2, A of rank r with condition number kappa: the geometric step at lr 1 is a
    projected subspace iteration; its error after 4 steps is at rounding level for every kappa."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 30, 20, 4
    QA = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    QB = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    A = (QA * torch.logspace(0, -math.log10(kappa), r, dtype=torch.float64)) @ QB.T
    torch.manual_seed(0)
    layer = tlr.LowRankLinear(n, m, r, bias=False, dtype=torch.float64)
    opt = LowRankSGD(layer, lr=1.0, momentum=0.0)
    for _ in range(8):
        opt.zero_grad()
        (0.5 * (layer.dense_weight() - A).pow(2).sum()).backward()
        opt.step()
    assert (layer.dense_weight() - A).norm() / A.norm() < 1e-12


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        tlr.LowRankConv2d(1, 6, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        tlr.LowRankLinear(6 * 6 * 6, 16, 8),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


@pytest.mark.parametrize(
    "opt_cls,kw",
    [
        (LowRankAdam, dict(lr=3e-2, tau=0.5)),
        (LowRankSGD, dict(lr=0.1, tau=0.5)),
        (LowRankAdam, dict(lr=1e-2, tau=0.3, second_moment="elementwise")),
    ],
)
def test_resume_after_rank_changes_equals_uninterrupted_run(opt_cls, kw):
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(30)
    ]
    ref = _make_model(0)
    opt = opt_cls(ref, **kw)
    _train(ref, opt, batches[:15])
    assert ref[3].rank != 8  # ranks changed before the checkpoint
    buf = io.BytesIO()
    torch.save({"model": ref.state_dict(), "opt": opt.state_dict()}, buf)
    _train(ref, opt, batches[15:])

    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    fresh = _make_model(1)  # different init, original ranks
    resize_to_state_dict(fresh, ckpt["model"])
    fresh.load_state_dict(ckpt["model"])
    opt2 = opt_cls(fresh, **kw)
    opt2.load_state_dict(ckpt["opt"])
    _train(fresh, opt2, batches[15:])
    for (n, a), (_, b) in zip(ref.state_dict().items(), fresh.state_dict().items()):
        assert a.shape == b.shape, n
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


def test_optimizer_load_resizes_layers_before_the_model_state():
    """Loading the optimizer first also works: it resizes the layers to the saved ranks."""
    ref = _make_model(0)
    opt = LowRankAdam(ref, lr=1e-2, tau=0.3)
    g = torch.Generator().manual_seed(0)
    _train(
        ref,
        opt,
        [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(10)],
    )
    fresh = _make_model(0)
    opt2 = LowRankAdam(fresh, lr=1e-2, tau=0.3)
    opt2.load_state_dict(opt.state_dict())
    fresh.load_state_dict(ref.state_dict())
    assert [m.rank for m in (fresh[0], fresh[3])] == [ref[0].rank, ref[3].rank]
    assert opt2.state[fresh[3].U]["exp_avg"].dtype == torch.float32


def test_state_dict_holds_only_tensors_and_plain_values():
    model = _make_model(0)
    opt = LowRankAdam(model, lr=1e-3)
    _train(model, opt, [(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))])
    sd = opt.state_dict()
    for st in sd["state"].values():
        for v in st.values():
            assert torch.is_tensor(v) or isinstance(v, (int, float, bool, str))
    for g in sd["param_groups"]:
        for v in g.values():
            assert isinstance(v, (int, float, bool, str, list, tuple, type(None)))
    buf = io.BytesIO()
    torch.save(sd, buf)
    torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def test_other_parameters_get_the_ordinary_sgd_and_adamw_updates():
    for ours, theirs in (
        (
            lambda m: LowRankSGD(m, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        ),
        (
            lambda m: LowRankAdam(m, lr=1e-2, weight_decay=0.1),  # its default betas: (0.9, 0.95)
            lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95)),
        ),
    ):
        a, b = _make_model(0), _make_model(0)
        opt_a = ours(a)
        opt_b = theirs([b[5].weight, b[5].bias, b[0].bias, b[3].bias])
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
            for model, opt in ((a, opt_a), (b, opt_b)):
                opt.zero_grad()
                # same loss, but b's low-rank layers are frozen in time: feed b the a-model's features
                nn.functional.cross_entropy(model(x), y).backward()
            opt_a.step()
            with torch.no_grad():  # keep b's factors equal to a's so the other gradients agree
                for i in (0, 3):
                    b[i].set_factors(a[i].U, a[i].S, a[i].V)
            opt_b.step()
            with torch.no_grad():
                for i in (0, 3):
                    b[i].set_factors(a[i].U, a[i].S, a[i].V)
        torch.testing.assert_close(a[5].weight, b[5].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[0].bias, b[0].bias, rtol=1e-5, atol=1e-6)


def test_bf16_parameters_train_and_keep_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(tlr.LowRankLinear(32, 24, 4), nn.ReLU(), nn.Linear(24, 3)).to(torch.bfloat16)
    x, y = torch.randn(64, 32, dtype=torch.bfloat16), torch.randint(0, 3, (64,))
    opt = LowRankAdam(model, lr=1e-2, tau=0.1)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    layer = model[0]
    assert layer.U.dtype == torch.bfloat16 and opt.state[layer.U]["exp_avg"].dtype == torch.float32
    U = layer.U.float()
    assert (U.T @ U - torch.eye(layer.rank)).abs().max() < 3e-2
    assert losses[-1] < 0.7 * losses[0]


def test_nan_gradient_refuses_the_step_and_names_the_layer_when_asked_to_raise():
    model = _make_model(0)
    opt = LowRankAdam(model, lr=1e-2, nonfinite="raise")
    _train(model, opt, [(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = opt.state[model[3].U]["exp_avg"].clone()
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.randint(0, 3, (4,))).backward()
    model[3].V.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'3'.*factor V"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(opt.state[model[3].U]["exp_avg"], state_before)


def test_bad_arguments_raise_value_error():
    model = _make_model(0)
    with pytest.raises(ValueError, match="no trainable LowRankLinear"):
        LowRankAdam(nn.Sequential(nn.Linear(3, 3)), lr=1e-3)
    with pytest.raises(ValueError, match="max_rank"):
        LowRankSGD(model, lr=0.1, max_rank=2)  # the linear layer has rank 8
    for tau in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="tau"):
            LowRankAdam(model, lr=1e-3, tau=tau)
    for lr in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lr"):
            LowRankSGD(model, lr=lr)
    with pytest.raises(ValueError, match="momentum"):
        LowRankSGD(model, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="second_moment"):
        LowRankAdam(model, lr=1e-3, second_moment="diagonal")
    with pytest.raises(ValueError, match="basis_lr_ratio"):
        LowRankAdam(model, lr=1e-3, basis_lr_ratio=-1.0)
    for kw in (dict(rank_every=0), dict(nonfinite="ignore")):
        with pytest.raises(ValueError, match=next(iter(kw))):
            LowRankAdam(model, lr=1e-3, **kw)


def test_basis_lr_ratio_zero_keeps_the_column_spaces():
    """With the basis blocks of the step scaled by 0 an augmented step is a pure Galerkin (S) step."""
    layer, x, target = make_layer("linear", rank=3)
    U, V = layer.U.detach().clone(), layer.V.detach().clone()
    opt = LowRankAdam(layer, lr=1e-2, basis_lr_ratio=0.0)
    for _ in range(3):
        loss_backward(layer, x, target)
        opt.step()
    assert principal_angles(layer.U.detach(), U).max() < 1e-7
    assert principal_angles(layer.V.detach(), V).max() < 1e-7
    opt = LowRankAdam(layer, lr=1e-2)
    loss_backward(layer, x, target)
    opt.step()
    assert principal_angles(layer.U.detach(), U).max() > 1e-3  # the test can fail


def test_rank_adaptive_tau_shrinks_rank_towards_target_rank():
    """Fit a rank-2 target from rank 6 with tau > 0: the rank drops to 2 and the fit is exact."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 15, generator=g, dtype=torch.float64
    )
    torch.manual_seed(0)
    layer = tlr.LowRankLinear(15, 20, 6, bias=False, dtype=torch.float64)
    opt = LowRankSGD(layer, lr=1.0, momentum=0.0, tau=1e-6)
    for _ in range(10):
        opt.zero_grad()
        (0.5 * (layer.dense_weight() - A).pow(2).sum()).backward()
        opt.step()
    assert layer.rank == 2
    assert (layer.dense_weight() - A).norm() / A.norm() < 1e-8


def test_steps_between_augmentations_are_galerkin_steps_in_the_current_basis():
    """augment_every=3, no momentum: steps 2 and 3 give W = U (diag(s) - lr U^T G V) V^T, rank kept."""
    layer, x, target = make_layer("linear", rank=3)
    opt = LowRankSGD(layer, lr=0.01, momentum=0.0, augment_every=3)
    loss_backward(layer, x, target)
    opt.step()  # step 1: augmented
    for _ in range(2):
        U, s, V = layer.U.detach().clone(), layer.S.detach().clone(), layer.V.detach().clone()
        G = dense_gradient(layer, x, target)
        loss_backward(layer, x, target)
        opt.step()
        expected = U @ (torch.diag(s) - 0.01 * U.T @ G @ V) @ V.T
        torch.testing.assert_close(layer.dense_weight(), expected, rtol=1e-10, atol=1e-12)
        assert principal_angles(layer.U.detach(), U).max() < 1e-7  # same column space
    with pytest.raises(ValueError, match="augment_every"):
        LowRankSGD(layer, lr=0.1, augment_every=0)


def test_lowrank_adam_trains_a_factorized_tiny_llama(tiny_llama):
    """A Hugging Face model factorized with tlr.factorize: every LowRankLinear is a unit, embeddings /
    norms get AdamW, and the LM loss goes down on a repeated batch."""
    model = tiny_llama
    tlr.factorize(model, 0.5, targets=r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    opt = LowRankAdam(model, lr=1e-2, tau=0.05)
    assert len(opt._units) > 0 and any(g["unit"] is None for g in opt.param_groups)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    layer = next(m for m in model.modules() if isinstance(m, tlr.LowRankLinear))
    assert (layer.U.T @ layer.U - torch.eye(layer.rank)).abs().max() < 1e-5


@pytest.mark.parametrize(
    "opt_cls,kw",
    [
        (LowRankAdam, dict(lr=1e-2)),
        (LowRankSGD, dict(lr=0.1, nesterov=True)),
        (LowRankAdam, dict(lr=1e-2, tau=0.2)),
    ],
)
def test_nan_gradient_skips_the_step_on_the_device_by_default(opt_cls, kw):
    """Like torch.amp.GradScaler: factors, moments and the other parameters keep their values, the
    skip is counted in a device tensor, and the next finite step trains as if nothing happened."""
    model = _make_model(0)
    opt = opt_cls(model, **kw)
    _train(model, opt, [(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {k: v.clone() for k, v in opt.state[model[3].U].items() if torch.is_tensor(v)}
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.randint(0, 3, (4,))).backward()
    model[3].V.grad[0, 0] = float("nan")
    model[5].weight.grad[0, 0] = float("inf")
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in state_before.items():
        assert torch.equal(opt.state[model[3].U][k], v), k
    assert int(opt.nonfinite_steps) == 1
    _train(model, opt, [(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))])
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert not torch.equal(model[3].S, before["3.S"])
    assert int(opt.nonfinite_steps) == 1


def _host_reads(calls: list[str]) -> list[str]:
    return [c for c in calls if "svd" not in c]


@pytest.mark.parametrize(
    "opt_cls,kw",
    [
        (LowRankAdam, {}),
        (LowRankAdam, dict(second_moment="elementwise")),
        (LowRankSGD, {}),
        (LowRankAdam, dict(augment_every=3)),
        (LowRankAdam, dict(tau=0.1, rank_every=4)),
    ],
)
def test_a_step_at_fixed_rank_reads_nothing_on_the_host(opt_cls, kw):
    """No .item() / bool() / int() / .tolist() / .cpu() in a fixed-rank step (nor between rank
    decisions); the one decomposition left is a batched r x r SVD per group of same-shape layers."""
    from host_syncs import HostSyncCounter

    torch.manual_seed(0)
    model = nn.Sequential(
        tlr.LowRankLinear(24, 24, 4),
        nn.ReLU(),
        tlr.LowRankLinear(24, 24, 4),
        nn.ReLU(),
        tlr.LowRankLinear(24, 24, 4),
        nn.ReLU(),
        tlr.LowRankLinear(24, 10, 3),
    )
    opt = opt_cls(model, lr=1e-2, **kw)
    x, y = torch.randn(32, 24), torch.randint(0, 10, (32,))
    for step in range(1, 8):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with HostSyncCounter() as syncs:
            opt.step()
        if kw.get("tau") and step % kw["rank_every"] == 0:
            assert _host_reads(syncs.calls) == ["TensorBase.tolist"], step  # the rank decision, read once
        else:
            assert _host_reads(syncs.calls) == [], step
            assert len(syncs.calls) == 2, step  # two shape groups: (24, 24, 4) x 3 and (10, 24, 3)


@pytest.mark.parametrize("opt_cls", [LowRankSGD, LowRankAdam])
def test_same_shape_layers_stepped_as_one_batch_equal_layers_stepped_alone(opt_cls):
    torch.manual_seed(0)
    layers = [tlr.LowRankLinear(12, 12, 3, dtype=torch.float64) for _ in range(3)]
    alone = [tlr.LowRankLinear(12, 12, 3, dtype=torch.float64) for _ in range(3)]
    for a, b in zip(alone, layers):
        a.load_state_dict(b.state_dict())
    batched = opt_cls(nn.ModuleList(layers), lr=1e-2)
    singles = [opt_cls(a, lr=1e-2) for a in alone]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(8, 12, generator=g, dtype=torch.float64)
        for group in (layers, alone):
            for layer in group:
                layer.zero_grad()
                layer(x).pow(2).sum().backward()
        batched.step()
        for opt in singles:
            opt.step()
    for a, b in zip(alone, layers):
        torch.testing.assert_close(a.dense_weight(), b.dense_weight(), rtol=1e-12, atol=1e-13)


def test_subspace_truncation_equals_the_svd_truncation_on_a_training_step():
    """The rank-r truncation by warm-started subspace iteration (float32, default iterations) gives
    the best rank-r approximation of the stepped core that a full SVD gives."""
    from torchlowrank.optim.manifold_step import top_subspace

    g = torch.Generator().manual_seed(0)
    r = 16
    s = torch.sort(torch.rand(4, r, generator=g) + 0.1, descending=True).values
    S = torch.zeros(4, 2 * r, 2 * r)
    S[:, :r, :r] = torch.diag_embed(s)
    S = S + 1e-3 * torch.randn(4, 2 * r, 2 * r, generator=g)  # one Adam step of lr 1e-3 (entries of size ~lr)
    P, d, Q = top_subspace(S, r)
    Pf, df, Qhf = torch.linalg.svd(S.double())
    best = Pf[:, :, :r] @ torch.diag_embed(df[:, :r]) @ Qhf[:, :r]
    torch.testing.assert_close((P @ torch.diag_embed(d) @ Q.mT).double(), best, rtol=0, atol=1e-5)
    torch.testing.assert_close(d.double(), df[:, :r], rtol=1e-5, atol=1e-6)


def test_cpu_truncation_is_the_best_rank_r_approximation_even_without_a_spectral_gap():
    """On a CPU the stepped core is truncated by its full SVD: exact even where a warm-started
    subspace iteration converges slowly (a core of entries ~lr only, as after a GeoLoRA start at
    S = 0, whose singular values have no gap at r)."""
    from torchlowrank.optim.manifold_step import top_triplets

    g = torch.Generator().manual_seed(1)
    r = 8
    S = 1e-3 * torch.randn(3, 2 * r, 2 * r, generator=g)
    P, d, Q = top_triplets(S, r)
    Pf, df, Qhf = torch.linalg.svd(S.double())
    best = Pf[:, :, :r] @ torch.diag_embed(df[:, :r]) @ Qhf[:, :r]
    torch.testing.assert_close(
        (P @ torch.diag_embed(d) @ Q.mT).double(), best, rtol=0, atol=3e-8
    )  # float32 rounding of 1e-3
    torch.testing.assert_close(P.mT @ P, torch.eye(r).expand(3, r, r), rtol=0, atol=1e-5)
