"""Hugging Face Trainer integration: our optimizers and callbacks inside Trainer.train() give what a
manual loop gives; gradient checkpointing keeps adapter gradients; the MiniLM example runs end to
end (1 and 2 processes) and its adapter loads in peft."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hf_models
import torchlowrank as tlr
from example_runs import run_example

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from torchlowrank.integrations.hf import (  # noqa: E402
    RegularizerCallback,
    SpectrumTrackerCallback,
    TruncateCallback,  # noqa: E402
    enable_gradient_checkpointing,
)

ROOT = Path(__file__).resolve().parents[1]
N, SEQ = 8, 10


def _dataset(vocab=197, n=N, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, SEQ), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def _batch(ds):
    return {k: torch.stack([d[k] for d in ds]) for k in ds[0]}


def _args(tmp_path, steps, batch=N, **kw):
    kw = {"max_grad_norm": 0.0, "lr_scheduler_type": "constant", "warmup_steps": 0, **kw}
    return TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **kw,
    )


def _manual(model, ds, opt, steps, after_backward=None):
    batch = _batch(ds)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        opt.zero_grad()


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def _deep_lora_llama(ds):
    model = hf_models.tiny_llama()
    tlr.adapt(model, tlr.DeepLoRAConfig(r=4, depth=3, target_modules=["q_proj", "v_proj", "down_proj"]))
    tlr.init_compressed(model, _batch(ds), generator=torch.Generator().manual_seed(0))
    return model


def test_trainer_with_adapter_param_groups_equals_a_manual_loop_and_keeps_deep_loras_learning_rates(tmp_path):
    ds = _dataset()
    model = _deep_lora_llama(ds)
    ref = copy.deepcopy(model)
    lr = 3e-2
    opt = torch.optim.AdamW(tlr.adapter_param_groups(model, lr))
    Trainer(model=model, args=_args(tmp_path, 3), train_dataset=ds, optimizers=(opt, None)).train()
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"adapter": lr, "adapter_outer": lr * 0.01}
    _manual(ref, ds, torch.optim.AdamW(tlr.adapter_param_groups(ref, lr)), 3)
    _assert_same(_trainable(model), _trainable(ref))
    assert not torch.equal(
        _trainable(model)["model.layers.0.self_attn.q_proj.lora_factors.1"],
        _trainable(_deep_lora_llama(ds))["model.layers.0.self_attn.q_proj.lora_factors.1"],
    )


def test_the_trainers_default_scheduler_keeps_deep_loras_outer_to_inner_learning_rate_ratio(tmp_path):
    ds = _dataset()
    model = _deep_lora_llama(ds)
    opt = torch.optim.AdamW(tlr.adapter_param_groups(model, 1e-2))
    seen = []

    class Lrs(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            seen.append({g["name"]: g["lr"] for g in opt.param_groups})

    Trainer(
        model=model,
        args=_args(tmp_path, 3, lr_scheduler_type="linear", warmup_steps=1),
        train_dataset=ds,
        optimizers=(opt, None),
        callbacks=[Lrs()],
    ).train()
    assert len({s["adapter"] for s in seen}) == 3  # the schedule did change the lr ...
    for s in seen:  # ... by the same factor in both groups
        assert s["adapter_outer"] == pytest.approx(0.01 * s["adapter"], rel=1e-12)


class WeightDecayStandIn:
    """A regularizer with Q3R's interface: step() adds lam * W to W.grad (weight decay as a
    regularizer, R = lam / 2 ||W||^2); value() returns R."""

    def __init__(self, params, lam):
        self.params, self.lam, self.calls = list(params), lam, 0

    def step(self):
        self.calls += 1
        for p in self.params:
            if p.grad is None:
                raise RuntimeError("reg.step() called without gradients (after zero_grad?)")
            p.grad.add_(p.detach(), alpha=self.lam)

    def value(self):
        return 0.5 * self.lam * sum(float(p.detach().square().sum()) for p in self.params)


def test_regularizer_callback_adds_its_gradient_once_per_optimizer_step_like_a_manual_loop(tmp_path):
    ds = _dataset()
    torch.manual_seed(0)
    model = hf_models.tiny_llama()
    tlr.adapt(model, tlr.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init="gaussian"))
    ref = copy.deepcopy(model)
    lam, steps = 0.5, 3

    def reg_for(m):
        return WeightDecayStandIn([p for p in m.parameters() if p.requires_grad], lam)

    reg = reg_for(model)
    opt = torch.optim.SGD(tlr.adapter_param_groups(model, 0.1))
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, steps, batch=N // 2, gradient_accumulation_steps=2),
        train_dataset=ds,
        optimizers=(opt, None),
        callbacks=[RegularizerCallback(reg)],
    )
    trainer.train()
    assert reg.calls == steps  # once per optimizer step, not per micro-batch
    ref_reg = reg_for(ref)
    _manual(ref, ds, torch.optim.SGD(tlr.adapter_param_groups(ref, 0.1)), steps, after_backward=ref_reg.step)
    _assert_same(_trainable(model), _trainable(ref))
    logged = [h["regularizer"] for h in trainer.state.log_history if "regularizer" in h and "loss" in h]
    assert len(logged) == steps and logged[-1] == pytest.approx(reg.value(), rel=1e-6)


def test_q3r_through_the_regularizer_callback_equals_a_manual_loop(tmp_path):
    ds = _dataset()
    torch.manual_seed(0)
    model = hf_models.tiny_llama().train()
    ref = copy.deepcopy(model)
    steps = 6  # two reweightings at period 5

    def reg_for(m):
        return tlr.Q3R(m, target_rank=2, lam=0.05, period=5, targets=["q_proj", "v_proj"], method="full")

    reg = reg_for(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    Trainer(
        model=model,
        args=_args(tmp_path, steps),
        train_dataset=ds,
        optimizers=(opt, None),
        callbacks=[RegularizerCallback(reg)],
    ).train()
    ref_reg = reg_for(ref)
    _manual(ref, ds, torch.optim.SGD(ref.parameters(), lr=0.05), steps, after_backward=ref_reg.step)
    _assert_same(_trainable(model), _trainable(ref), atol=1e-6)
    assert reg.eps == pytest.approx(ref_reg.eps) and all(0 < e < float("inf") for e in reg.eps.values())


def test_regularizer_callback_refuses_an_object_without_step():
    with pytest.raises(ValueError, match="step"):
        RegularizerCallback(object())


def test_spectrum_tracker_callback_records_the_gradients_of_each_step_like_attach(tmp_path):
    ds = _dataset()
    model = hf_models.tiny_llama()
    ref = copy.deepcopy(model)
    kw = {"every": 1, "track": ("weight", "grad"), "targets": ["q_proj", "down_proj"]}
    cb = SpectrumTrackerCallback(**kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    Trainer(
        model=model, args=_args(tmp_path, 3), train_dataset=ds, optimizers=(opt, None), callbacks=[cb]
    ).train()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_tracker = tlr.SpectrumTracker(ref, **kw).attach(ref_opt)
    _manual(ref, ds, ref_opt, 3)
    got, want = cb.tracker.history, ref_tracker.history
    assert len(got) == len(want) > 0
    assert [(r["step"], r["layer"], r["quantity"]) for r in got] == [
        (r["step"], r["layer"], r["quantity"]) for r in want
    ]
    grads = [r for r in got if r["quantity"] == "grad"]
    assert {r["step"] for r in grads} == {1, 2, 3} and all(r["fro_norm"] > 0 for r in grads)
    for a, b in zip(got, want):
        assert a["fro_norm"] == pytest.approx(b["fro_norm"], rel=1e-4)
        assert a["stable_rank"] == pytest.approx(b["stable_rank"], rel=1e-4)
    saved = json.loads((tmp_path / "trainer" / "spectrum_history.json").read_text())
    assert saved  # written at on_train_end


def test_spectrum_tracker_callback_takes_a_tracker_or_its_arguments_not_both():
    model = hf_models.tiny_llama()
    with pytest.raises(ValueError, match="not both"):
        SpectrumTrackerCallback(tlr.SpectrumTracker(model), every=2)
    with pytest.raises(ValueError, match="SpectrumTracker"):
        SpectrumTrackerCallback("tracker")


class _Snapshot(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.weights = {
            n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
        }


def test_truncate_callback_leaves_the_best_rank_k_approximation_of_the_trained_weights(tmp_path):
    ds = _dataset()
    model = hf_models.tiny_llama()
    snap, cut = _Snapshot(), TruncateCallback(0.5, targets=["q_proj", "up_proj"])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = Trainer(
        model=model, args=_args(tmp_path, 2), train_dataset=ds, optimizers=(opt, None), callbacks=[snap, cut]
    )
    trainer.train()
    names = [n for n in snap.weights if n.endswith(("q_proj", "up_proj"))]
    assert len(names) == 4 and set(cut.report.ranks) == set(names)
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, tlr.LowRankLinear)
        W = snap.weights[name].double()
        k = tlr.rank_for_fraction(tuple(W.shape), 0.5)
        assert cut.report.ranks[name] == k
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        torch.testing.assert_close(layer.dense_weight().double(), best, atol=1e-5, rtol=1e-4)
    summary = json.loads((tmp_path / "trainer" / "truncation.json").read_text())
    assert summary["ranks"] == cut.report.ranks
    assert (tmp_path / "trainer" / "truncation.md").is_file()
    assert trainer.state.log_history[-1]["truncation"]["model_params_after"] < summary["model_params_before"]


def test_truncate_callback_fails_before_training_when_a_layer_would_get_rank_0(tmp_path):
    ds = _dataset()
    model = hf_models.tiny_llama()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, 2),
        train_dataset=ds,
        optimizers=(opt, None),
        callbacks=[TruncateCallback(0.01, targets=["q_proj"])],
    )
    with pytest.raises(ValueError, match="rank 0"):
        trainer.train()
    assert trainer.state.global_step == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="param_fraction"):
        TruncateCallback(1.5)


def _adapter_grads(name, checkpointing=None):
    model = hf_models.build(name)
    tlr.adapt(model, tlr.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    from conftest import randomize_trainable

    randomize_trainable(model)
    model.train()
    if checkpointing is not None:
        enable_gradient_checkpointing(model, use_reentrant=checkpointing)
    out = model(**hf_models.example_inputs(name, batch=3)).logits
    out.square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("name", ["llama", "vit"])
def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(name, use_reentrant):
    want = _adapter_grads(name)
    got = _adapter_grads(name, use_reentrant)
    assert got.keys() == want.keys() and len(got) == 8
    for k in want:
        assert got[k] is not None, k
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)


# transformers 5 renamed TrainingArguments.gradient_checkpointing to activation_checkpointing
GC_ARG = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def test_trainer_with_gradient_checkpointing_trains_adapters_like_without(tmp_path):
    ds = _dataset()
    runs = []
    for gc in (False, True):
        model = _deep_lora_llama(ds)
        opt = torch.optim.AdamW(tlr.adapter_param_groups(model, 1e-2))
        Trainer(
            model=model,
            args=_args(tmp_path / str(gc), 2, **{GC_ARG: gc}),
            train_dataset=ds,
            optimizers=(opt, None),
        ).train()
        runs.append(_trainable(model))
    _assert_same(runs[1], runs[0])


def _python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env},
    )


@pytest.mark.slow
def test_import_torchlowrank_does_not_import_transformers_and_a_missing_transformers_names_the_extra():
    r = _python(
        "import sys, torchlowrank as tlr; print('transformers' in sys.modules)\n"
        "print(tlr.integrations.hf.TruncateCallback.__name__, 'transformers' in sys.modules)"
    )
    assert r.returncode == 0 and r.stdout.split() == ["False", "TruncateCallback", "True"], r.stderr
    r = _python(
        "import sys; sys.modules['transformers'] = None\n"
        "try:\n    import torchlowrank.integrations.hf\nexcept ImportError as e:\n    print(e)"
    )
    assert r.returncode == 0 and "pip install 'torchlowrank[hf]'" in r.stdout, r.stderr


# --- the example script, as a user runs it ------------------------------------------------------------

EXAMPLE = "finetune_minilm_trainer.py"
EXAMPLE_ARGS = [
    "--steps",
    "3",
    "--train-size",
    "32",
    "--eval-size",
    "32",
    "--max-length",
    "24",
    "--batch-size",
    "4",
    # a larger eps and lr than the defaults so that 3 steps move the logits measurably
    "--init-scale",
    "0.3",
    "--lr",
    "1e-2",
]


def _run_example(out, nproc):
    return run_example(EXAMPLE, EXAMPLE_ARGS, out, nproc)[0]


def _check_example(res, out, nproc):
    assert res["world_size"] == nproc and res["steps"] == 3
    assert res["adapter_max_abs_logit_effect"] > 1e-3  # the adapters change the logits ...
    assert res["peft_max_abs_logit_diff"] <= 1e-5  # ... and peft, loading the export, gives our logits
    assert 0.0 <= res["accuracy"] <= 1.0 and res["eval_examples"] == 32
    assert 0.5 <= res["majority_class_accuracy"] <= 1.0  # 3 steps need not beat it; the status says so
    assert res["status"] == (
        "ok" if res["accuracy"] > res["majority_class_accuracy"] else "no better than the majority class"
    )
    assert (out / "peft" / "adapter_config.json").is_file()
    assert res["trainable_params"] < res["total_params"] / 10


@pytest.mark.slow
def test_minilm_trainer_example_runs_offline_in_one_process_and_exports_a_peft_adapter(tmp_path):
    _check_example(_run_example(tmp_path, 1), tmp_path, 1)


@pytest.mark.ddp
def test_minilm_trainer_example_runs_under_torchrun_with_2_processes(tmp_path):
    res = _run_example(tmp_path, 2)
    _check_example(res, tmp_path, 2)
    # every rank ends with rank 0's adapter (DDP really wrapped the model: see the example's comment
    # on trainer.evaluate() before train())
    assert res["max_abs_adapter_diff_between_ranks"] == 0.0
    # the mean cross-entropy of 2 classes starts near ln 2 = 0.69; the Trainer's default
    # average_tokens_across_devices=True doubled it (and the gradients) under 2 processes: 1.48
    assert res["train_loss"] < 1.0
