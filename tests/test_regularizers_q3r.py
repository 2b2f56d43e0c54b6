"""Q3R (DESIGN §4.6): the weight operator, the majorization, the reweighting and the training loop."""

import copy
import math

import pytest
import torch
from torch import nn

import torchlowrank as tlr
from conftest import decaying_matrix, linear_with
from torchlowrank.regularizers import Q3R, q3r_operator, q3r_reweight, smoothed_logdet

SCALES = [1e-4, 1e-2, 1.0, 1e2, 1e4]


def reference_operator(W0: torch.Tensor, rank: int):
    """P_U, P_V (full, explicit matrices) and eps from a float64 full SVD of W0 -- no torchlowrank code."""
    U, s, Vh = torch.linalg.svd(W0.double(), full_matrices=True)
    k = min(W0.shape)
    eps = float(s[rank]) if rank < k else math.inf
    w = torch.ones(k, dtype=torch.float64)
    big = s > eps
    w[big] = eps / s[big]
    m, n = W0.shape
    du = torch.ones(m, dtype=torch.float64)
    du[:k] = w
    dv = torch.ones(n, dtype=torch.float64)
    dv[:k] = w
    PU = U @ torch.diag(du) @ U.T
    PV = Vh.T @ torch.diag(dv) @ Vh
    return PU, PV, eps


# -- the math ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 12), (20, 7), (6, 15)])
@pytest.mark.parametrize("scale", SCALES)
def test_q3r_step_gradient_equals_2_lam_R_W_from_independent_float64_svd(shape, scale):
    W0 = decaying_matrix(*shape, decay=0.7, seed=1) * scale
    lin = linear_with(W0)
    lam, rank = 0.3, 2
    reg = Q3R(lin, rank, lam, method="full")
    reg.step()
    PU, PV, eps = reference_operator(W0, rank)
    expected = 2 * lam * PU @ W0 @ PV
    assert reg.eps["Linear"] == pytest.approx(eps, rel=1e-12)
    torch.testing.assert_close(lin.weight.grad, expected, rtol=1e-9, atol=1e-12 * scale)
    # at the expansion point R(W0) = U diag(s * min(1, eps / s)^2) V^T (a closed form)
    U, s, Vh = torch.linalg.svd(W0, full_matrices=False)
    closed = (U * (s * torch.clamp(eps / s, max=1.0) ** 2)) @ Vh
    torch.testing.assert_close(lin.weight.grad, 2 * lam * closed, rtol=1e-9, atol=1e-12 * scale)


def test_q3r_gradient_matches_autograd_of_value_with_operator_fixed():
    W0 = torch.randn(16, 10, dtype=torch.float64)
    lin = linear_with(W0)
    reg = Q3R(lin, 3, 0.7, period=100)
    reg.step()  # builds the operator at W0
    with torch.no_grad():  # move the weight: the operator must stay the one from W0
        lin.weight.add_(0.3 * torch.randn_like(W0))
    lin.weight.grad = None
    reg.step()  # step 1: not a reweighting step
    g_step = lin.weight.grad.clone()
    lin.weight.grad = None
    reg.value().backward()
    torch.testing.assert_close(g_step, lin.weight.grad, rtol=1e-10, atol=1e-12)
    PU, PV, _ = reference_operator(W0, 3)
    torch.testing.assert_close(g_step, 2 * 0.7 * PU @ lin.weight.detach() @ PV, rtol=1e-8, atol=1e-10)
    assert reg.value().detach().item() == pytest.approx(
        0.7 * float((lin.weight.detach() * (PU @ lin.weight.detach() @ PV)).sum()), rel=1e-8
    )


def test_q3r_operator_is_symmetric_positive_semidefinite():
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(9, 7, generator=g, dtype=torch.float64)
    U, s, V, eps = q3r_reweight(W0, 2, math.inf, method="full")
    c = eps / s - 1
    X, Y = (
        torch.randn(9, 7, generator=g, dtype=torch.float64),
        torch.randn(9, 7, generator=g, dtype=torch.float64),
    )
    assert float((Y * q3r_operator(X, U, V, c)).sum()) == pytest.approx(
        float((X * q3r_operator(Y, U, V, c)).sum()), rel=1e-12
    )
    assert float((X * q3r_operator(X, U, V, c)).sum()) >= 0


def test_quadratic_majorizes_smoothed_logdet_and_touches_at_expansion_point():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        m, n = (int(v) for v in torch.randint(2, 14, (2,), generator=g))
        scale = 10 ** float(torch.empty(1).uniform_(-4, 4, generator=g))
        W0 = torch.randn(m, n, generator=g, dtype=torch.float64) * scale
        rank = int(torch.randint(0, min(m, n), (1,), generator=g))
        eps0 = (
            math.inf if trial % 3 == 0 else float(torch.linalg.svdvals(W0)[rank]) * 0.5
        )  # also a smaller old eps
        U, s, V, eps = q3r_reweight(W0, rank, eps0, method="full")
        c = eps / s - 1
        F0 = smoothed_logdet(torch.linalg.svdvals(W0), eps)
        q0 = float((W0 * q3r_operator(W0, U, V, c)).sum())
        # touches: Q(W0 | W0) = F(W0) by construction; the gradients agree too
        W = W0.clone().requires_grad_(True)
        smoothed_logdet(torch.linalg.svdvals(W), eps).backward()
        torch.testing.assert_close(W.grad, q3r_operator(W0, U, V, c), rtol=1e-7, atol=1e-9 * scale)
        for _ in range(5):
            W = W0 + torch.randn(m, n, generator=g, dtype=torch.float64) * scale * 3 * float(
                torch.rand(1, generator=g)
            )
            Q = F0 + 0.5 * (float((W * q3r_operator(W, U, V, c)).sum()) - q0)
            F = smoothed_logdet(torch.linalg.svdvals(W), eps)
            assert Q >= F - 1e-9 * abs(F), (trial, float(Q), float(F))


def test_smoothed_logdet_is_continuous_at_eps_and_quadratic_below():
    eps = 0.5
    s = torch.tensor([eps * (1 - 1e-9), eps * (1 + 1e-9)], dtype=torch.float64)
    a, b = (smoothed_logdet(s[i : i + 1], eps) for i in range(2))
    assert float(a) == pytest.approx(float(b), rel=1e-7)
    assert float(smoothed_logdet(torch.tensor([0.1, 0.2], dtype=torch.float64), eps)) == pytest.approx(
        (0.01 + 0.04) / 2
    )
    assert float(smoothed_logdet(torch.tensor([2.0], dtype=torch.float64), math.inf)) == 2.0


# -- the reweighting ------------------------------------------------------------------------------------------
def test_reweighting_grows_the_svd_until_the_smallest_kept_value_is_below_eps():
    W = decaying_matrix(80, 60, decay=0.95, dtype=torch.float32, seed=2)
    s_full = torch.linalg.svdvals(W.double())
    small_eps = (
        float(s_full[29] + s_full[30]) / 2
    )  # an earlier, smaller eps: 30 directions are above it, far more than r + 1 = 3
    U, s, V, eps = q3r_reweight(W, 2, small_eps, method="randomized", n_iter=4)
    assert eps == small_eps
    assert s.numel() == int((s_full > small_eps).sum())
    torch.testing.assert_close(s.double(), s_full[: s.numel()], rtol=1e-3, atol=1e-5)
    assert U.shape == (80, s.numel()) and V.shape == (60, s.numel())


def test_randomized_reweighting_matches_full_svd_on_a_decaying_spectrum():
    W = decaying_matrix(120, 90, decay=0.8, dtype=torch.float32, seed=4)
    Ur, sr, Vr, er = q3r_reweight(
        W, 6, math.inf, method="randomized", generator=torch.Generator().manual_seed(0)
    )
    Uf, sf, Vf, ef = q3r_reweight(W, 6, math.inf, method="full")
    assert er == pytest.approx(ef, rel=1e-4)
    X = torch.randn(120, 90)
    torch.testing.assert_close(
        q3r_operator(X, Ur, Vr, er / sr - 1), q3r_operator(X, Uf, Vf, ef / sf - 1), rtol=1e-3, atol=1e-3
    )


def test_eps_starts_infinite_and_never_increases_during_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    reg = Q3R(model, 4, 0.01, period=2, targets=["0", "2"])
    assert all(math.isinf(e) for e in reg.eps.values())
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)  # large steps: singular values move up and down
    x, y = torch.randn(64, 10), torch.randn(64, 1)
    history = []
    for _ in range(40):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        reg.step()
        opt.step()
        history.append(reg.eps)
    for name in history[0]:
        seq = [h[name] for h in history]
        assert all(b <= a for a, b in zip(seq, seq[1:])), seq
        assert seq[-1] < seq[0] and math.isfinite(seq[0])


def test_target_rank_at_least_min_dim_is_plain_weight_decay():
    W = torch.randn(7, 5, dtype=torch.float64) * 3
    for rank in (5, 9, 1.0):
        lin = linear_with(W)
        reg = Q3R(lin, rank, 0.25)
        reg.step()
        assert math.isinf(reg.eps["Linear"]) and reg.kept()["Linear"] == 0
        torch.testing.assert_close(lin.weight.grad, 2 * 0.25 * W)
        assert reg.value().item() == pytest.approx(0.25 * float((W * W).sum()))


def test_fraction_target_rank_is_of_the_smaller_dimension_and_overrides_apply():
    model = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 20))
    reg = Q3R(model, 0.25, 0.1, rank_overrides={"2": 3})
    assert reg.ranks == {"0": 10, "2": 3}  # floor(0.25 * min(100, 40)) = 10


# -- training-loop properties ---------------------------------------------------------------------------------
def _train(model, reg, opt, steps, x, y, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        i = slice((t * 16) % 64, (t * 16) % 64 + 16)
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        reg.step()
        opt.step()


def _toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(64, 12, generator=g), torch.randint(0, 3, (64,), generator=g)


def test_decoupled_equals_coupled_for_plain_sgd():
    model_a, x, y = _toy()
    model_b = copy.deepcopy(model_a)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.05)
    reg_a = Q3R(model_a, 3, 0.2, period=3, targets=["0", "2"])
    reg_b = Q3R(model_b, 3, 0.2, period=3, targets=["0", "2"], decoupled=True, optimizer=opt_b)
    _train(model_a, reg_a, opt_a, 12, x, y)
    _train(model_b, reg_b, opt_b, 12, x, y)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # step(lr=...) is the same as reading lr from the optimizer
    model_c = copy.deepcopy(_toy()[0])
    opt_c = torch.optim.SGD(model_c.parameters(), lr=0.05)
    reg_c = Q3R(model_c, 3, 0.2, period=3, targets=["0", "2"], decoupled=True)
    for t in range(12):
        opt_c.zero_grad()
        i = slice((t * 16) % 64, (t * 16) % 64 + 16)
        nn.functional.cross_entropy(model_c(x[i]), y[i]).backward()
        reg_c.step(lr=0.05)
        opt_c.step()
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        torch.testing.assert_close(pa, pc, rtol=1e-5, atol=1e-6)


def test_decoupled_without_lr_or_optimizer_raises():
    model, x, y = _toy()
    reg = Q3R(model, 3, 0.2, targets=["0"], decoupled=True)
    with pytest.raises(ValueError, match="learning rate"):
        reg.step()


def test_resume_equals_uninterrupted(tmp_path):
    model, x, y = _toy()
    model2 = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg = Q3R(model, 3, 0.1, period=3, targets=["0", "2"])
    _train(model, reg, opt, 14, x, y)

    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    reg2 = Q3R(model2, 3, 0.1, period=3, targets=["0", "2"])
    _train(model2, reg2, opt2, 7, x, y)  # stop between two reweightings
    sd = reg2.state_dict()
    flat = [sd["steps"], sd["reweighted_at"], sd["period"], sd["lam"]] + [
        v for b in sd["blocks"] for v in b.values()
    ]
    assert all(isinstance(v, (torch.Tensor, int, float, str)) for v in flat)
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "reg": sd}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model3 = _toy()[0]
    model3.load_state_dict(ckpt["model"])
    opt3 = torch.optim.AdamW(model3.parameters(), lr=1e-2)
    opt3.load_state_dict(ckpt["opt"])
    reg3 = Q3R(model3, 3, 0.1, period=3, targets=["0", "2"])
    reg3.load_state_dict(ckpt["reg"])
    _train(model3, reg3, opt3, 7, x, y, start=7)
    for pa, pb in zip(model.parameters(), model3.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert reg3.eps == reg.eps


def test_load_state_dict_rejects_a_different_model_and_changes_nothing():
    model, _, _ = _toy()
    reg = Q3R(model, 3, 0.1, targets=["0", "2"])
    other = Q3R(model, 2, 0.1, targets=["0", "2"])
    before = reg.state_dict()
    with pytest.raises(ValueError, match="does not match"):
        reg.load_state_dict(other.state_dict())
    assert reg.state_dict()["blocks"][0]["rank"] == before["blocks"][0]["rank"] == 3


def test_value_plus_advance_trains_like_step():
    model_a, x, y = _toy()
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model_a, model_b))
    reg_a = Q3R(model_a, 3, 0.1, period=2, targets=["0", "2"])
    reg_b = Q3R(model_b, 3, 0.1, period=2, targets=["0", "2"])
    _train(model_a, reg_a, opt_a, 6, x, y)
    for t in range(6):
        opt_b.zero_grad()
        i = slice((t * 16) % 64, (t * 16) % 64 + 16)
        (nn.functional.cross_entropy(model_b(x[i]), y[i]) + reg_b.value()).backward()
        opt_b.step()
        reg_b.advance()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_digits_mlp_trained_with_q3r_has_little_energy_beyond_target_rank_at_similar_accuracy():
    from torchlowrank.experiments.training import accuracy, fit_classifier

    data = tlr.data.load_digits()
    x_train, x_test = data.flat()
    rank, results = 8, {}
    for lam in (0.0, 0.1):
        torch.manual_seed(0)
        model = tlr.models.MLP(64, (128, 128), 10)
        reg = Q3R(model, rank, lam, targets=r"features\..*")
        fit_classifier(
            model, x_train, data.y_train, epochs=10, lr=1e-3, after_backward=lambda step, reg=reg: reg.step()
        )
        tails = []
        for layer in (model.features[0], model.features[2]):
            s2 = torch.linalg.svdvals(layer.weight.detach().double()) ** 2
            tails.append(float(s2[rank:].sum() / s2.sum()))
        results[lam] = (accuracy(model, x_test, data.y_test), max(tails))
    (acc_plain, tail_plain), (acc_q3r, tail_q3r) = results[0.0], results[0.1]
    assert tail_plain > 0.3  # dense training spreads energy over many directions
    assert tail_q3r < 0.01 and tail_q3r < tail_plain / 30
    assert acc_q3r > 0.9 and acc_q3r > acc_plain - 0.04


# -- layer types, precision, HF models --------------------------------------------------------------------------
def test_conv1d_is_regularized_as_the_transposed_linear_matrix(tiny_gpt2):
    conv = tiny_gpt2.transformer.h[0].mlp.c_fc  # Conv1D, weight (in=32, out=128)
    W = conv.weight.detach().double()
    conv = conv.double()
    lin = linear_with(W.T.contiguous())
    reg_c, reg_l = Q3R(conv, 5, 0.3, method="full"), Q3R(lin, 5, 0.3, method="full")
    reg_c.step()
    reg_l.step()
    assert reg_c.eps["Conv1D"] == pytest.approx(reg_l.eps["Linear"], rel=1e-10)
    torch.testing.assert_close(conv.weight.grad, lin.weight.grad.T, rtol=1e-9, atol=1e-12)
    assert reg_c.value().item() == pytest.approx(reg_l.value().item(), rel=1e-10)


def test_split_regularizes_the_q_k_v_slices_of_gpt2_c_attn_separately(tiny_gpt2):
    model = tiny_gpt2.double()
    reg = Q3R(model, 4, 0.2, targets=["c_attn"], split={"c_attn": 3}, method="full")
    assert reg.names == [f"transformer.h.{i}.attn.c_attn[{j}]" for i in range(2) for j in range(3)]
    reg.step()
    W = model.transformer.h[0].attn.c_attn.weight  # (in 32, out 96): q | k | v along the last dim
    for j in range(3):
        part = W.detach()[:, 32 * j : 32 * (j + 1)]
        PU, PV, _ = reference_operator(part, 4)
        torch.testing.assert_close(
            W.grad[:, 32 * j : 32 * (j + 1)], 2 * 0.2 * PU @ part @ PV, rtol=1e-8, atol=1e-12
        )
    with pytest.raises(ValueError, match="does not divide"):
        Q3R(model, 4, 0.2, targets=["c_attn", "c_fc"], split=5)
    reg_sizes = Q3R(model, 4, 0.2, targets=["c_attn"], split={"c_attn": [32, 32, 32]})
    assert reg_sizes.names == reg.names


def test_split_of_a_fused_linear_slices_rows():
    W = torch.randn(18, 6, dtype=torch.float64)
    lin = linear_with(W)
    Q3R(lin, 2, 0.5, split=3, method="full").step()
    for j in range(3):
        PU, PV, _ = reference_operator(W[6 * j : 6 * (j + 1)], 2)
        torch.testing.assert_close(
            lin.weight.grad[6 * j : 6 * (j + 1)], PU @ W[6 * j : 6 * (j + 1)] @ PV, rtol=1e-9, atol=1e-12
        )


def test_conv2d_kernel_is_reshaped_to_out_by_in_kh_kw():
    conv = nn.Conv2d(3, 8, 3).double()
    reg = Q3R(conv, 2, 0.1, method="full")
    reg.step()
    Wm = conv.weight.detach().reshape(8, -1)
    PU, PV, _ = reference_operator(Wm, 2)
    torch.testing.assert_close(conv.weight.grad.reshape(8, -1), 0.2 * PU @ Wm @ PV, rtol=1e-9, atol=1e-12)


def test_tied_weights_are_regularized_once():
    lin = nn.Linear(6, 6, bias=False)
    reg = Q3R([("a", lin), ("b", lin)], 2, 0.1)
    assert reg.names == ["a"]


def test_on_every_tiny_hf_model_the_added_gradient_is_twice_the_penalty_along_the_weights(tiny_hf_model):
    """The penalty is lam <W, R(W)> and step() adds 2 lam R(W): so sum_W <W, added grad> = 2 * value().

    This holds whatever the layer kinds, orientations (GPT-2's transposed Conv1D, fused c_attn split in
    three) and ties are, and fails if a block's gradient lands transposed, on the wrong rows or twice.
    """
    name, model, inputs = tiny_hf_model
    model.train()
    reg = Q3R(model, 0.25, 0.1, split={"c_attn": 3} if name == "gpt2" else None)
    out = model(**inputs).logits
    out.float().pow(2).mean().backward()
    params = {id(b.param): b.param for b in reg.blocks}
    before = {k: p.grad.detach().double().clone() for k, p in params.items()}
    reg.step()
    along = sum((p.detach().double() * (p.grad.double() - before[k])).sum() for k, p in params.items())
    value = reg.value().double()
    assert value > 0
    torch.testing.assert_close(along, 2 * value, rtol=1e-4, atol=0)


def test_bf16_weights_and_bf16_autocast():
    torch.manual_seed(0)
    model32 = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    reg32 = Q3R(model32, 3, 0.1, targets=["0"], method="full")
    reg16 = Q3R(model16, 3, 0.1, targets=["0"], method="full")
    reg32.step()
    reg16.step()
    assert model16[0].weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(model16[0].weight.grad.float(), model32[0].weight.grad, rtol=0.05, atol=2e-3)
    for b in reg16.blocks:
        assert b.state["U"].dtype == torch.float32  # the reweighting runs in float32
    # under autocast: the value is computed in float32, with a gradient
    model32[0].weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(8, 16)
        loss = model32(x).float().pow(2).mean() + reg32.value()
        assert reg32.value().dtype == torch.float32
        reg32.step()
    loss.backward()
    assert torch.isfinite(model32[0].weight.grad).all()


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_rank=3, lam=-0.1), "lam"),
        (dict(target_rank=3, lam=float("nan")), "lam"),
        (dict(target_rank=0, lam=0.1), "target_rank"),
        (dict(target_rank=1.5, lam=0.1), "target_rank"),
        (dict(target_rank=0.0, lam=0.1), "target_rank"),
        (dict(target_rank=3, lam=0.1, period=0), "period"),
        (dict(target_rank=3, lam=0.1, targets=["nope"]), "matched nothing"),
        (dict(target_rank=3, lam=0.1, targets=["norm"]), "no 2-D weight"),
        (dict(target_rank=3, lam=0.1, split={"0": 7}), "does not divide"),
        (dict(target_rank=3, lam=0.1, method="qr"), "method"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    model.norm = nn.LayerNorm(4)
    with pytest.raises(ValueError, match=match):
        Q3R(model, **kwargs)


def test_low_rank_layers_are_refused_with_a_clear_error():
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    tlr.factorize(model, 2, targets=["0"])
    with pytest.raises(ValueError, match="already low-rank"):
        Q3R(model, 2, 0.1, targets=["0"])
    assert Q3R(model, 2, 0.1).names == ["2"]  # targets=None skips them


def test_nan_weight_at_a_synchronous_reweighting_names_the_layer_and_changes_nothing():
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    reg = Q3R(model, 2, 0.1, period=2)
    reg.step()
    before = copy.deepcopy(reg.state_dict())
    reg.step()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    model.zero_grad()
    with pytest.raises(ValueError, match="'2'"):
        reg.reweight(sync=True)
    after = reg.state_dict()
    assert after["steps"] == 2 and after["blocks"][0]["eps"] == before["blocks"][0]["eps"]
    assert torch.equal(after["blocks"][0]["U"], before["blocks"][0]["U"])
    assert model[0].weight.grad is None


def test_nan_weight_at_a_reweighting_step_keeps_that_layers_operator_and_reweights_the_others():
    """Inside step() nothing is read back to raise: the non-finite layer keeps its previous operator
    and eps, is listed by skipped(), and the other layers are reweighted as usual."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12))
    reg = Q3R(model, 2, 0.1, period=2)
    reg.step()
    reg.step()
    before = copy.deepcopy(reg.state_dict())
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
        model[4].weight.mul_(0.5)  # same shape as '2', reweighted in the same batch
    reg.step()  # step 2: a reweighting
    after = reg.state_dict()
    assert reg.skipped() == ["2"]
    b2, a2 = before["blocks"][1], after["blocks"][1]
    assert a2["eps"] == b2["eps"] and torch.equal(a2["U"], b2["U"]) and torch.equal(a2["s"], b2["s"])
    assert after["blocks"][2]["eps"] < before["blocks"][2]["eps"]  # '4' was reweighted (its s halved)
    assert torch.isfinite(model[4].weight.grad).all()
    with torch.no_grad():
        model[2].weight[0, 0] = 0.0
    reg.reweight()
    assert reg.skipped() == []


def test_update_mode_regularizes_w_minus_w0():
    W0 = torch.randn(10, 8, dtype=torch.float64)
    lin = linear_with(W0)
    reg = Q3R(lin, 2, 0.5, update=True, method="full")
    reg.step()  # the update is 0: eps stays +inf, no gradient
    assert math.isinf(reg.eps["Linear"])
    torch.testing.assert_close(lin.weight.grad, torch.zeros_like(W0))
    D = torch.randn(10, 8, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.add_(D)
    lin.weight.grad = None
    reg.reweight()
    reg.step()
    PU, PV, eps = reference_operator(D, 2)
    assert reg.eps["Linear"] == pytest.approx(eps, rel=1e-12)
    torch.testing.assert_close(lin.weight.grad, 2 * 0.5 * PU @ D @ PV, rtol=1e-9, atol=1e-12)
    sd = reg.state_dict()
    reg2 = Q3R(linear_with(W0 + 1.0), 2, 0.5, update=True)
    reg2.load_state_dict(sd)
    torch.testing.assert_close(reg2.blocks[0].state["anchor"], W0)


# -- GPU layout: no host sync in a step, batched reweighting, fixed slots ---------------------------------------
def _mixed_mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(40, 48),
        nn.ReLU(),
        nn.Linear(48, 48),
        nn.ReLU(),
        nn.Linear(48, 48),
        nn.ReLU(),
        nn.Linear(48, 96),
        nn.ReLU(),
        nn.Linear(96, 10),
    )


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled_tensor_lr"])
def test_step_reads_nothing_back_from_the_device_except_one_small_svd_per_reweighting(decoupled):
    """Several same-shape and different-shape layers, 8 steps at period 3 (reweightings at steps 0, 3, 6):
    a reweighting step makes exactly one batched torch.linalg.svd call (its error check is the one
    synchronisation), every other step none -- with a tensor learning rate in decoupled mode too."""
    from host_syncs import HostSyncCounter

    model = _mixed_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.01))
    reg = Q3R(model, 3, 0.1, period=3, decoupled=decoupled, optimizer=opt)
    assert len({b.shape for b in reg.blocks}) == 4 and len(reg.blocks) == 5
    x = torch.randn(16, 40)
    calls = []
    for _ in range(8):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        with HostSyncCounter() as syncs:
            reg.step()
        opt.step()
        calls.append(syncs.calls)
    assert calls == [["linalg_svd"], [], [], ["linalg_svd"], [], [], ["linalg_svd"], []]
    assert all(0 < e < math.inf for e in reg.eps.values())


def test_gpt2_conv1d_and_fused_slices_step_without_host_syncs_between_reweightings(tiny_gpt2):
    from host_syncs import HostSyncCounter

    reg = Q3R(tiny_gpt2, 0.25, 0.1, period=2, split={"c_attn": 3})
    calls = []
    for t in range(4):
        tiny_gpt2.zero_grad()
        with HostSyncCounter() as syncs:
            reg.step()
        calls.append(syncs.calls)
        if t == 0:
            assert set(reg.kept().values()) == {8}  # 0.25 of min(32, 128) = 8 directions above eps = s_9
    assert calls == [["linalg_svd"], [], ["linalg_svd"], []]
    assert all(torch.isfinite(b.param.grad).all() for b in reg.blocks)


def test_same_shape_layers_reweighted_as_one_batch_match_an_independent_float64_svd_each():
    layers = [linear_with(decaying_matrix(30, 24, decay=0.5, seed=s)) for s in range(3)]
    layers.append(linear_with(decaying_matrix(24, 30, decay=0.5, seed=7)))  # a second shape group
    lam = 0.4
    reg = Q3R(layers, 3, lam, period=100)
    assert set(reg.slots().values()) == {12}  # 3 + 1 + oversample 8
    reg.step()
    for lin in layers:
        W = lin.weight.detach()
        PU, PV, eps = reference_operator(W, 3)
        torch.testing.assert_close(lin.weight.grad, 2 * lam * PU @ W @ PV, rtol=1e-9, atol=1e-12)
    assert list(reg.eps.values()) == pytest.approx(
        [reference_operator(lin.weight.detach(), 3)[2] for lin in layers], rel=1e-10
    )


def test_singular_vectors_are_sign_fixed_largest_entry_positive():
    model = _mixed_mlp()
    reg = Q3R(model, 3, 0.1)
    reg.step()
    for b in reg.blocks:
        U = b.state["U"]
        top = U.gather(0, U.abs().argmax(0, keepdim=True))[0]
        assert (top > 0).all()
        # the sign-fixed triplets still reproduce W's top part: U^T W V = diag(s)
        W = b.matrix(b.param.detach())
        torch.testing.assert_close(U.T @ W @ b.state["V"], torch.diag(b.state["s"]), rtol=1e-3, atol=1e-4)


def reference_operator_at(W: torch.Tensor, eps: float):
    """P_U, P_V for a given eps (weights min(1, eps / s)), from a float64 full SVD."""
    U, s, Vh = torch.linalg.svd(W.double(), full_matrices=True)
    w = torch.clamp(eps / s, max=1.0)
    m, n = W.shape
    du, dv = torch.ones(m, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    du[: s.numel()], dv[: s.numel()] = w, w
    return U @ torch.diag(du) @ U.T, Vh.T @ torch.diag(dv) @ Vh


def test_slots_grow_only_at_a_synchronous_reweighting_which_restores_the_exact_kept_set():
    W0 = decaying_matrix(30, 20, decay=0.8, seed=3)
    lin = linear_with(W0)
    lam = 0.3
    reg = Q3R(lin, 2, lam, period=1, oversample=2)
    assert reg.slots() == {"Linear": 5}
    reg.step()  # eps = s_3(W0)
    eps = reg.eps["Linear"]
    with torch.no_grad():
        lin.weight.mul_(10.0)  # every s grows 10x: ~13 of them are now above the (unchanged) eps
    reg.step()  # a reweighting with the fixed 5 slots: no host sync, so no growth
    exact = int((torch.linalg.svdvals(lin.weight.detach()) > eps).sum())
    assert exact > 10 and reg.eps["Linear"] == eps
    assert reg.kept() == {"Linear": 5} and reg.saturated() == ["Linear"]
    reg.reweight(sync=True)  # 5 -> 10 -> 20 slots (= min(m, n))
    assert reg.slots() == {"Linear": 20} and reg.kept() == {"Linear": exact} and reg.saturated() == []
    lin.weight.grad = None
    reg.value().backward()
    PU, PV = reference_operator_at(lin.weight.detach(), eps)
    torch.testing.assert_close(
        lin.weight.grad, 2 * lam * PU @ lin.weight.detach() @ PV, rtol=1e-9, atol=1e-12
    )
    reg.step()  # later reweightings keep the grown slots
    assert reg.slots() == {"Linear": 20}


def test_tensor_learning_rate_gives_the_float_learning_rate_result():
    model_a, x, y = _toy()
    model_b = copy.deepcopy(model_a)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=torch.tensor(0.05))
    reg_a = Q3R(model_a, 3, 0.2, period=3, targets=["0", "2"], decoupled=True, optimizer=opt_a)
    reg_b = Q3R(model_b, 3, 0.2, period=3, targets=["0", "2"], decoupled=True, optimizer=opt_b)
    _train(model_a, reg_a, opt_a, 7, x, y)
    _train(model_b, reg_b, opt_b, 7, x, y)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_a_checkpoint_that_kept_only_the_directions_above_eps_loads_into_padded_slots():
    model, x, y = _toy()
    reg = Q3R(model, 3, 0.1, period=3, targets=["0", "2"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _train(model, reg, opt, 2, x, y)
    sd = reg.state_dict()
    for b in sd["blocks"]:  # the older layout: only the kept triplets
        keep = b["s"] > b["eps"]
        b["U"], b["V"], b["s"] = b["U"][:, keep], b["V"][:, keep], b["s"][keep]
    fresh = Q3R(model, 3, 0.1, period=3, targets=["0", "2"])
    fresh.load_state_dict(sd)
    assert fresh.kept() == reg.kept() and fresh.slots() == reg.slots()
    for a, b in zip(fresh.blocks, reg.blocks):
        X = torch.randn(*a.shape)
        torch.testing.assert_close(
            q3r_operator(X, a.state["U"], a.state["V"], a.state["c"]),
            q3r_operator(X, b.state["U"], b.state["V"], b.state["c"]),
            rtol=1e-5,
            atol=1e-6,
        )


def test_float32_randomized_slots_match_a_float64_svd_on_a_steep_spectrum():
    """The power iterations rescale with a shifted Cholesky QR (no host sync); on a steep spectrum
    (s_i = 0.9^i, s_{r+1} / s_1 ~ 0.02) float32 follows the float64 run of the same randomized
    method (the sketch is the same numbers in both dtypes) and both are close to the exact SVD."""
    g = torch.Generator().manual_seed(5)
    U, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(150, 150, generator=g, dtype=torch.float64))
    s = 0.9 ** torch.arange(150, dtype=torch.float64)
    W = (U[:, :150] * s) @ V.T
    kept = {}
    for dtype in (torch.float32, torch.float64):
        lin = nn.Linear(150, 200, bias=False, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
        reg = Q3R(lin, 36, 0.1)
        reg.step()
        kept[dtype] = reg.blocks[0].state["s"][:37].double()
    torch.testing.assert_close(kept[torch.float32], kept[torch.float64], rtol=1e-5, atol=0)
    torch.testing.assert_close(kept[torch.float64], s[:37], rtol=1e-3, atol=0)
    assert reg.eps["Linear"] == pytest.approx(float(s[36]), rel=1e-3)


def test_same_shape_layers_with_different_target_ranks_share_a_batch_with_their_own_eps():
    layers = {f"l{i}": linear_with(decaying_matrix(30, 24, decay=0.6, seed=10 + i)) for i in range(3)}
    reg = Q3R(layers, 2, 0.2, rank_overrides={"l1": 5, "l2": 24})  # l2: rank >= min(m, n), plain weight decay
    assert reg.slots() == {"l0": 14, "l1": 14, "l2": 14}  # one batch: max(r) + 1 + 8 over the active blocks
    reg.step()
    for name, rank in (("l0", 2), ("l1", 5)):
        W = layers[name].weight.detach()
        PU, PV, eps = reference_operator(W, rank)
        assert reg.eps[name] == pytest.approx(eps, rel=1e-10)
        torch.testing.assert_close(layers[name].weight.grad, 2 * 0.2 * PU @ W @ PV, rtol=1e-9, atol=1e-12)
    assert math.isinf(reg.eps["l2"]) and reg.kept()["l2"] == 0
    torch.testing.assert_close(layers["l2"].weight.grad, 2 * 0.2 * layers["l2"].weight.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_reweighting_follows_the_cpu_one_and_makes_one_host_sync():
    """Different sketches (CUDA's and the CPU's generators differ), the same operator on a decaying
    spectrum: gradients and eps agree to float32 accuracy; a reweighting step makes one sync."""
    from host_syncs import HostSyncCounter

    layers = [linear_with(decaying_matrix(64, 48, decay=0.7, seed=s).float()) for s in range(3)]
    cuda_layers = [copy.deepcopy(lin).cuda() for lin in layers]
    reg_cpu, reg_cuda = Q3R(layers, 4, 0.1, period=2), Q3R(cuda_layers, 4, 0.1, period=2)
    calls = []
    for _ in range(3):
        reg_cpu.step()
        with HostSyncCounter() as syncs:
            reg_cuda.step()
        calls.append(syncs.calls)
    assert calls == [["linalg_svd"], [], ["linalg_svd"]]
    assert list(reg_cuda.eps.values()) == pytest.approx(list(reg_cpu.eps.values()), rel=1e-4)
    for a, b in zip(layers, cuda_layers):
        torch.testing.assert_close(b.weight.grad.cpu(), a.weight.grad, rtol=1e-4, atol=1e-5)
