import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TLR_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


# Files whose tests train on real data, load pretrained models, run reproductions, compile with
# inductor or spawn processes:
# `pytest -m "not slow"` leaves them out (the fast inner loop); `make test` runs everything.
SLOW_FILES = {
    "test_adapters_batchnorm.py",
    "test_adapters_compile.py",
    "test_benchmarks.py",
    "test_cli.py",
    "test_data.py",
    "test_diagnostics_experiments.py",
    "test_docs.py",
    "test_experiments_ablation.py",
    "test_experiments_geolora.py",
    "test_experiments_lm.py",
    "test_experiments_matrix.py",
    "test_experiments_optim.py",
    "test_experiments_q3r.py",
    "test_experiments_real_completion.py",
    "test_optim_compile.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES or item.get_closest_marker("ddp") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test, restored after: small problems on a shared
    machine, where extra threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear_with(W: torch.Tensor) -> torch.nn.Linear:
    """A bias-free nn.Linear whose weight is W (out, in), in W's dtype."""
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


def randomize_trainable(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every trainable parameter with N(0, 1) (e.g. to make a zero-initialised adapter non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def decaying_matrix(m: int, n: int, decay: float = 0.8, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """A random (m, n) matrix with singular values decay**i (known spectrum)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(k, dtype=torch.float64)
    return ((U * s) @ V.T).to(dtype)


# Tiny Hugging Face models built offline from configs (tests/hf_models.py): every feature is tried
# on GPT-2 (Conv1D, fused qkv, tied embeddings), Llama and ViT.
import hf_models  # noqa: E402


@pytest.fixture
def tiny_gpt2():
    pytest.importorskip("transformers")
    return hf_models.tiny_gpt2()


@pytest.fixture
def tiny_llama():
    pytest.importorskip("transformers")
    return hf_models.tiny_llama()


@pytest.fixture
def tiny_vit():
    pytest.importorskip("transformers")
    return hf_models.tiny_vit()


@pytest.fixture(params=hf_models.HF_MODEL_NAMES)
def tiny_hf_model(request):
    """(name, model, inputs) for each tiny HF model."""
    pytest.importorskip("transformers")
    model = hf_models.build(request.param)
    return request.param, model, hf_models.example_inputs(request.param, model)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Each test using it runs on the CPU and, when one is present, on a CUDA device."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)
