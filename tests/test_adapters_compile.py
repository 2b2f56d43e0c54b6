"""torch.compile of adapted models: LoRA and Deep LoRA forward + backward compile as one graph
(``fullgraph=True`` raises on any graph break) and give eager's outputs and gradients.

The ``aot_eager`` backend traces forward and backward through AOTAutograd like inductor does, but
runs the graphs eagerly (no C++ compile), which keeps these tests fast on CPU.
"""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import hf_models
import torchlowrank as tlr
from conftest import randomize_trainable


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _mlp():
    return nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 5))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.flatten(1))


CONFIGS = {
    "lora": lambda targets: tlr.LoRAConfig(r=4, alpha=8, target_modules=targets),
    "rslora": lambda targets: tlr.LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules=targets),
    "deep_lora_3": lambda targets: tlr.DeepLoRAConfig(
        r=4, depth=3, compress=False, init_scale=0.3, target_modules=targets
    ),
}
MODELS = {
    "linear": (_mlp, ["0", "2", "4"], lambda g: torch.randn(6, 12, generator=g)),
    "conv2d": (ConvNet, ["conv1", "conv2", "head"], lambda g: torch.randn(2, 3, 7, 7, generator=g)),
}


def _adapted(model_name, config_name, seed=0):
    build, targets, _ = MODELS[model_name]
    torch.manual_seed(seed)
    model = build()
    tlr.adapt(model, CONFIGS[config_name](targets))
    randomize_trainable(model, seed)  # LoRA's B = 0 would make the adapter path invisible in the output
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(0.3)
    return model


def _forward_backward(model, x):
    out = model(x)
    out.square().mean().backward()
    grads = {
        n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _assert_grads_close(got, want):
    assert got.keys() == want.keys() and got
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_adapted_model_compiles_as_one_graph_with_eager_outputs_and_gradients(model_name, config_name):
    eager = _adapted(model_name, config_name)
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = MODELS[model_name][2](torch.Generator().manual_seed(1))
    want_out, want_grads = _forward_backward(eager, x)
    got_out, got_grads = _forward_backward(compiled, x)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-4)
    _assert_grads_close(got_grads, want_grads)
    x2 = MODELS[model_name][2](torch.Generator().manual_seed(2))
    torch.testing.assert_close(compiled(x2), eager(x2), atol=1e-5, rtol=1e-4)
    assert counter.frame_count == 1  # one graph, and no recompilation on a second batch of the same shape


def test_compiled_deep_lora_sees_the_factors_written_by_init_compressed_without_recompiling():
    torch.manual_seed(0)
    model = _mlp()
    tlr.adapt(model, tlr.DeepLoRAConfig(r=4, depth=3, init_scale=0.5, target_modules=["0", "2"]))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    before = compiled(x).detach()
    tlr.init_compressed(
        model,
        (x, y),
        loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        generator=torch.Generator().manual_seed(0),
    )
    after = compiled(x).detach()
    with torch.no_grad():
        want = model(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, want, atol=1e-6, rtol=1e-5)
    assert counter.frame_count == 1  # new values in the same parameters: no new graph


def test_switching_an_adapter_off_recompiles_and_gives_the_base_output():
    model = _adapted("linear", "lora")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
    with_adapters = compiled(x).detach()
    layers = [layer for _, layer in tlr.adapters.adapter_layers(model)]
    for layer in layers:
        layer.disabled = True
    base = compiled(x).detach()
    with torch.no_grad():
        want = nn.Sequential(*[m.base_layer if hasattr(m, "base_layer") else m for m in model])(x)
    torch.testing.assert_close(base, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(base, with_adapters)
    assert counter.frame_count == 2  # the flag is guarded: the change is an explicit recompilation
    for layer in layers:
        layer.disabled = False
    torch.testing.assert_close(compiled(x), with_adapters, atol=1e-6, rtol=1e-5)


def test_lora_with_dropout_compiles_as_one_graph_in_training_mode():
    torch.manual_seed(0)
    model = _mlp()
    tlr.adapt(model, tlr.LoRAConfig(r=4, dropout=0.2, target_modules=["0", "2"]))
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(torch.randn(6, 12)).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    x = torch.randn(6, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))  # eval: dropout off, deterministic


LLAMA_CONFIGS = {
    "lora": tlr.LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "deep_lora_3": tlr.DeepLoRAConfig(
        r=4, depth=3, compress=False, init_scale=0.3, target_modules=["q_proj", "v_proj", "down_proj"]
    ),
}


@pytest.mark.parametrize("config_name", list(LLAMA_CONFIGS))
def test_adapted_tiny_llama_compiles_as_one_graph_with_eager_loss_and_gradients(config_name):
    eager = hf_models.tiny_llama()
    tlr.adapt(eager, copy.deepcopy(LLAMA_CONFIGS[config_name]))
    randomize_trainable(eager)
    with torch.no_grad():
        for p in eager.parameters():
            if p.requires_grad:
                p.mul_(0.1)
    eager.train()
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    inputs = hf_models.example_inputs("llama", batch=2)
    results = []
    for m in (eager, compiled):
        loss = m(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        results.append(
            (
                loss.detach(),
                {
                    n: p.grad
                    for n, p in (eager if m is eager else model).named_parameters()
                    if p.requires_grad
                },
            )
        )
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    _assert_grads_close(results[1][1], results[0][1])
    assert counter.frame_count == 1


@pytest.mark.parametrize("config_name", ["lora", "deep_lora_3"])
def test_lowrank_layer_and_adapters_compile_with_inductor_as_one_graph(config_name):
    """The default backend (inductor, C++ codegen on CPU): one graph for a model holding a
    LowRankLinear and adapted Linear layers; outputs and gradients equal eager."""
    torch.manual_seed(0)
    model = nn.Sequential(
        tlr.LowRankLinear(12, 24, 4), nn.GELU(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 5)
    )
    tlr.adapt(model, CONFIGS[config_name](["2", "4"]))
    randomize_trainable(model, 0)
    for p in model[0].parameters():  # adapt() freezes the base model; train the low-rank layer too
        p.requires_grad_(True)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
    want = _forward_backward(model, x)
    counter = CompileCounterWithBackend("inductor")
    got = _forward_backward(torch.compile(model, fullgraph=True, backend=counter), x)
    assert counter.frame_count == 1
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    _assert_grads_close(got[1], want[1])
    assert any(k.startswith("0.") for k in want[1]) and any("lora" in k for k in want[1])
