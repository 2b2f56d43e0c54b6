"""SpectrumTracker: its records equal a direct SVD, its angles are right, and it never changes training."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchlowrank as tlr
from torchlowrank.diagnostics import SpectrumTracker, analyse_matrix, load_history, tracker_plots
from torchlowrank.linalg import principal_angles
from torchlowrank.models import MLP, SmallViT


def _train(model, steps, tracker=None, attach=False, seed=0, lr=0.05):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if tracker is not None and attach:
        tracker.attach(opt)
    for _ in range(steps):
        x = torch.randn(16, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if tracker is not None and not attach:
            tracker.step()
    return opt


def test_records_match_a_direct_svd_at_the_recorded_steps():
    torch.manual_seed(0)
    model = MLP(64, (32, 24), 10)
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tracker = SpectrumTracker(model, every=3, top_k=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    checked = 0
    for step in range(1, 7):
        opt.zero_grad()
        F.cross_entropy(
            model(torch.randn(8, 64, generator=g)), torch.randint(0, 10, (8,), generator=g)
        ).backward()
        opt.step()
        if tracker.step():
            assert step % 3 == 0
            for name, mod in model.named_modules():
                if not isinstance(mod, nn.Linear):
                    continue
                refs = {
                    "weight": mod.weight.detach(),
                    "update": mod.weight.detach() - w0[name],
                    "grad": mod.weight.grad,
                }
                for q, M in refs.items():
                    row = [r for r in tracker.rows(q, name) if r["step"] == step][0]
                    s = torch.linalg.svdvals(M.double())
                    assert row["top_singular_values"] == pytest.approx(s[:4].tolist(), rel=1e-4, abs=1e-7)
                    assert row["stable_rank"] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-4)
                    p = s / s.sum()
                    assert row["effective_rank"] == pytest.approx(
                        float(torch.exp(-torch.special.xlogy(p, p).sum())), rel=1e-4
                    )
                    cum = torch.cumsum(s**2, 0) / (s**2).sum()
                    assert row["numerical_rank"] == int((cum < 0.99).sum()) + 1
                    assert row["fro_norm"] == pytest.approx(float(M.norm()), rel=1e-5)
                    checked += 1
    assert checked == 2 * 3 * 3
    assert sorted({r["step"] for r in tracker.history}) == [0, 3, 6]
    # step 0 holds the weights only: no update or gradient exists yet
    assert {r["quantity"] for r in tracker.history if r["step"] == 0} == {"weight"}


def test_principal_angles_zero_for_the_same_subspace_and_pi_over_2_for_orthogonal_ones():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(20, 6, generator=g, dtype=torch.float64))
    A, B = Q[:, :3], Q[:, 3:]
    mix = torch.randn(3, 3, generator=g, dtype=torch.float64)  # another basis of the same span
    assert principal_angles(A, A @ mix).abs().max() < 1e-7
    assert torch.allclose(
        principal_angles(A, B), torch.full((3,), math.pi / 2, dtype=torch.float64), atol=1e-12
    )


def test_angle_of_an_unchanged_weight_is_zero_and_of_a_rotated_one_is_the_rotation():
    lin = nn.Linear(10, 12, bias=False)
    with torch.no_grad():
        U, _ = torch.linalg.qr(torch.randn(12, 12))
        V, _ = torch.linalg.qr(torch.randn(10, 10))
        s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1])
        lin.weight.copy_(U[:, :10] * s @ V.T)
    tracker = SpectrumTracker(nn.Sequential(lin), every=1, track=("weight",), top_k=2)
    tracker.step()
    assert tracker.history[-1]["angle_left"] == pytest.approx(0.0, abs=1e-3)
    # rotate the top left singular vector by 0.3 rad towards a direction outside the top-2 subspace
    c, sn = math.cos(0.3), math.sin(0.3)
    with torch.no_grad():
        U2 = U.clone()
        U2[:, 0] = c * U[:, 0] + sn * U[:, 5]
        U2[:, 5] = -sn * U[:, 0] + c * U[:, 5]
        lin.weight.copy_(U2[:, :10] * s @ V.T)
    tracker.step()
    assert tracker.history[-1]["angle_left"] == pytest.approx(0.3, abs=1e-4)
    assert tracker.history[-1]["angle_right"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("attach", [False, True])
def test_tracker_never_changes_training(attach):
    torch.manual_seed(0)
    model = SmallViT(image_size=8, patch_size=4, dim=16, depth=1, heads=2, dropout=0.1)
    reference = copy.deepcopy(model)
    torch.manual_seed(123)
    _train(reference, 6)
    torch.manual_seed(123)  # dropout draws from the global generator: the tracker must not consume it
    tracker = SpectrumTracker(model, every=2)
    _train(model, 6, tracker, attach=attach)
    assert tracker.steps == 6 and {r["step"] for r in tracker.history} == {0, 2, 4, 6}
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), n


def test_works_under_no_grad_and_for_conv_embedding_and_factorized_layers():
    model = nn.Sequential(nn.Embedding(30, 8), nn.Conv2d(3, 6, 3), tlr.LowRankLinear(12, 10, rank=3))
    with torch.no_grad():
        tracker = SpectrumTracker(model, every=1)
        tracker.step()
    shapes = {r["layer"]: (r["rows"], r["cols"]) for r in tracker.history}
    assert shapes == {"0": (30, 8), "1": (6, 27), "2": (10, 12)}
    low = [r for r in tracker.history if r["layer"] == "2" and r["quantity"] == "weight"][-1]
    assert low["numerical_rank"] <= 3 and low["top_singular_values"][3] < 1e-5
    # no backward happened: no gradient rows; the factorized layer never gets one (dense_weight is not a leaf)
    assert not tracker.rows("grad")


def test_large_layers_use_a_truncated_svd_with_exact_stable_rank():
    g = torch.Generator().manual_seed(0)
    M = (
        torch.randn(300, 200, generator=g)
        @ torch.diag(torch.logspace(0, -3, 200))
        @ torch.randn(200, 200, generator=g)
    )
    rec_full, U, _ = analyse_matrix(M, top_k=20)
    rec_top, U2, _ = analyse_matrix(M, top_k=20, full_spectrum_max=50)
    assert rec_top["spectrum"] == "top-k" and rec_top["effective_rank"] is None
    assert rec_top["stable_rank"] == pytest.approx(rec_full["stable_rank"], rel=1e-4)
    assert rec_top["top_singular_values"] == pytest.approx(rec_full["top_singular_values"], rel=1e-3)
    assert principal_angles(U[:, :5], U2[:, :5]).max() < 1e-2
    # numerical rank: exact when reached within the top-k values, else unknown (None)
    assert rec_top["numerical_rank"] in (rec_full["numerical_rank"], None)


def _small_trained_tracker() -> SpectrumTracker:
    torch.manual_seed(0)
    model = MLP(64, (16,), 10)
    tracker = SpectrumTracker(model, every=2, targets=["features.0", "head"])
    _train(nn.Sequential(nn.Flatten(), model), 4, tracker)
    return tracker


def test_history_saves_as_json_and_csv_and_plots(tmp_path):
    tracker = _small_trained_tracker()
    tracker.save(tmp_path / "h.json")
    tracker.save(tmp_path / "h.csv")
    assert load_history(tmp_path / "h.json") == json.loads(json.dumps(tracker.history))
    lines = (tmp_path / "h.csv").read_text().splitlines()
    assert len(lines) == len(tracker.history) + 1 and lines[0].startswith("step,layer,quantity")
    names = [p.name for p in tracker_plots(tracker.history)]
    assert "heatmap_grad_stable_rank" in names and "angle_weight_left" in names
    heat = [p for p in tracker.plots() if p.name == "heatmap_weight_stable_rank"][0]
    assert heat.yticks == ["features.0", "head"] and heat.xticks == [0, 2, 4]


def test_bad_arguments_raise_clear_errors():
    model = MLP(4, (3,), 2)
    with pytest.raises(ValueError, match="every"):
        SpectrumTracker(model, every=0)
    with pytest.raises(ValueError, match="track"):
        SpectrumTracker(model, track=("weights",))
    with pytest.raises(ValueError, match="matched nothing"):
        SpectrumTracker(model, targets=["nope"])


def test_fast_largest_angle_equals_the_foundation_principal_angles():
    from torchlowrank.diagnostics.tracker import max_principal_angle

    g = torch.Generator().manual_seed(3)
    for p, q in [(4, 4), (6, 3), (2, 5)]:
        A, _ = torch.linalg.qr(torch.randn(30, p, generator=g, dtype=torch.float64))
        B, _ = torch.linalg.qr(torch.randn(30, q, generator=g, dtype=torch.float64))
        assert max_principal_angle(A, B) == pytest.approx(float(principal_angles(A, B).max()), abs=1e-9)
    assert max_principal_angle(A, A) == pytest.approx(0.0, abs=1e-6)
    assert max_principal_angle(None, A) is None


def test_csv_history_reads_back_with_the_same_values(tmp_path):
    tracker = _small_trained_tracker()
    tracker.save(tmp_path / "h.csv")
    back = load_history(tmp_path / "h.csv")
    assert len(back) == len(tracker.history)
    for a, b in zip(back, tracker.history):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(b[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-8, nan_ok=True)
            elif isinstance(b[k], list):
                assert a[k] == pytest.approx(b[k], rel=1e-8)
            else:
                assert a[k] == b[k], k
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a tracker history CSV"):
        load_history(tmp_path / "bad.csv")


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_full_spectrum_max_must_be_a_non_negative_int(value):
    with pytest.raises(ValueError, match="full_spectrum_max"):
        SpectrumTracker(MLP(4, (3,), 2), full_spectrum_max=value)


def test_tracker_records_gpt2_conv1d_weights_and_gradients(tiny_gpt2):
    import hf_models

    model = tiny_gpt2.train()
    tracker = SpectrumTracker(model, every=1, targets=r".*c_attn")
    ids = hf_models.example_inputs("gpt2")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    tracker.step()
    grads = [r for r in tracker.history if r["quantity"] == "grad"]
    assert {r["layer"] for r in grads} == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    G = model.transformer.h[0].attn.c_attn.weight.grad.T  # (out, in)
    row = [r for r in grads if r["layer"] == "transformer.h.0.attn.c_attn"][0]
    assert (row["rows"], row["cols"]) == (96, 32)
    assert row["top_singular_values"][:3] == pytest.approx(torch.linalg.svdvals(G)[:3].tolist(), rel=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "t5", "bart", "whisper", "qwen2", "mistral"])
def test_tracker_lists_each_weight_once_like_spectrum_tied_aliases_included(name):
    pytest.importorskip("transformers")
    import hf_models

    model = hf_models.build(name)
    tracker = SpectrumTracker(model, track=("weight",))
    layers = [row["layer"] for row in tracker.history]
    assert layers == [r.name for r in tlr.spectrum(model)]
    assert len(layers) == len({id(model.get_submodule(n).weight) for n in layers})
    weights = {id(p) for n, p in model.named_parameters() if p.dim() >= 2}
    assert len(layers) == len(
        weights
    )  # every matrix / kernel once (these models have no other such parameters)
