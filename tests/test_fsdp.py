"""FSDP2 (``fully_shard``, 2 gloo processes on CPU): sharded training equals one process in float64.

Every sharded job runs in one launch (spawning processes is the slow part); each writes the full
(gathered) tensors it ends with, and the tests compare them with a single-process run on the global
batch. Distributed checkpoints (DCP) are resumed across world sizes: 1 -> 2 (a checkpoint written
here, before the launch, is loaded by the 2 processes) and 2 -> 1 (theirs is loaded here).
"""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import torchlowrank as tlr
from ddp import run_ddp
from host_syncs import HostSyncCounter
from sharded_state import whole, whole_state
from torchlowrank.optim import GaLoreAdamW

pytestmark = [pytest.mark.ddp, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

STEPS, BATCH, WORLD = 4, 8, 2
TOL = dict(atol=1e-10, rtol=1e-10)


def _batches(shape: tuple[int, ...], classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(STEPS, BATCH, *shape, generator=g, dtype=torch.float64)
    return xs, torch.randint(0, classes, (STEPS, BATCH), generator=g)


def _local(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    half = BATCH // world
    return batch[:, rank * half : (rank + 1) * half]


def _train(model, opt, xs, ys, steps=None):
    for x, y in list(zip(xs, ys))[:steps]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _assert_states_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, **TOL, msg=lambda m, k=k: f"{k}: {m}")


def test_sharded_helpers_are_the_plain_operations_without_a_mesh():
    """One process (mesh None): the same numbers as the unsharded code paths, bit for bit."""
    from torchlowrank import sharded
    from torchlowrank.linalg import sign_fixed

    g = torch.Generator().manual_seed(0)
    X, P = (
        torch.randn(9, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    )
    for got, want in zip(sharded.sign_fixed_rows(X, None, P), sign_fixed(X, P)):
        assert torch.equal(got, want)
    assert torch.equal(sharded.qr_rows(X, None), torch.linalg.qr(X).Q)
    assert torch.equal(sharded.gram(X, None), X.mT @ X)
    for f in (sharded.shard_rows, sharded.replicated, sharded.reduce_scatter_rows):
        assert f(X, None) is X
    assert sharded.gather_rows(X, None, 9) is X and sharded.local(X) is X and sharded.row_mesh(X, "x") is None


# -- layers --------------------------------------------------------------------------------------
class _LowRankNet(nn.Module):
    """Every factorized layer type, with odd sizes: FSDP2's row shards are uneven (S (3,) splits 2 + 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = tlr.LowRankConv2d(2, 5, 3, rank=3, padding=1)
        self.lin = tlr.LowRankLinear(5 * 16, 9, 3)
        self.fac = tlr.FactorizedLinear(9, 7, 3)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fac(torch.relu(self.lin(h)))))


def _layers_model():
    torch.manual_seed(0)
    return _LowRankNet().double()


def _layers_data():
    return _batches((2, 4, 4), 3)


def _layers_worker(rank, world, out):
    model = _layers_model()
    for layer in (model.conv, model.lin, model.fac):
        fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    xs, ys = _layers_data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt, _local(xs, rank, world), _local(ys, rank, world))
    # (only after training: in torch 2.13 a no_grad forward before the first backward makes
    # fully_shard skip the first gradient reduction, with nn.Linear as with these layers)
    with torch.no_grad():
        logits = model(_local(xs, rank, world)[0])
    errors = []
    for replace in (
        lambda: tlr.factorize(model, 2, targets=["head"]),
        lambda: tlr.truncate(model, 0.5, targets=["head"]),
        lambda: tlr.factorize_ab(model, 2, targets=["head"]),
        lambda: tlr.adapt(model, tlr.LoRAConfig(r=2, target_modules=["head"])),
    ):
        try:
            replace()
            errors.append("")
        except ValueError as e:
            errors.append(str(e))
    torch.save(
        {"logits": logits.detach(), "state": whole_state(model), "errors": errors}, out / f"layers{rank}.pt"
    )


def test_lowrank_layers_under_fully_shard_train_as_one_process(fsdp_out):
    """LowRankConv2d, LowRankLinear, FactorizedLinear each fully_shard-ed (plus the root): the
    forward on each rank's half batch and 4 AdamW steps equal one process on the global batch."""
    model = _layers_model()
    xs, ys = _layers_data()
    _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), xs, ys)
    logits = model(xs[0])
    for rank in range(WORLD):
        got = torch.load(fsdp_out / f"layers{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["logits"], _local(logits[None], rank, WORLD)[0].detach(), **TOL)
        _assert_states_equal(got["state"], model.state_dict())
        # layer replacements after fully_shard are refused, naming the order that works
        assert all("fully_shard" in e and "then fully_shard" in e for e in got["errors"]), got["errors"]


# -- adapters ------------------------------------------------------------------------------------
def _adapted_model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 11), nn.ReLU(), nn.Linear(11, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    return tlr.adapt(base, tlr.LoRAConfig(r=2, alpha=4, target_modules=["0", "2"], init="gaussian"))


def _adapter_data():
    return _batches((6,), 3, seed=1)


def _adapter_worker(rank, world, out):
    model = _adapted_model()
    fully_shard(model[0])  # one adapter layer sharded on its own, the other by the root
    fully_shard(model)
    xs, ys = _adapter_data()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, opt, _local(xs, rank, world), _local(ys, rank, world))
    trained = whole_state(model)
    try:
        tlr.merge(model)
        error = ""
    except ValueError as e:
        error = str(e)
    # what the error says to do: gather the full state, merge an unsharded copy
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    copy = _adapted_model()
    copy.load_state_dict(full)
    merged = tlr.merge(copy).state_dict()
    torch.save({"trained": trained, "error": error, "merged": merged}, out / f"adapter{rank}.pt")


def test_lora_adapters_under_fully_shard_train_as_one_process_and_merge_says_what_to_do(fsdp_out):
    model = _adapted_model()
    xs, ys = _adapter_data()
    _train(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), xs, ys)
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = tlr.merge(model).state_dict()
    for rank in range(WORLD):
        got = torch.load(fsdp_out / f"adapter{rank}.pt", weights_only=True)
        _assert_states_equal(got["trained"], trained)
        assert "fully_shard" in got["error"] and "get_model_state_dict" in got["error"]
        _assert_states_equal(got["merged"], merged)


# -- GaLoreAdamW ---------------------------------------------------------------------------------
class _GaLoreNet(nn.Module):
    """Right projections (m >= n: proj (20, 12), low.U and low.V (20, 6)) and left ones (m < n:
    conv (6, 2*3*3), up (20, 96), mid (12, 20), down (7, 20)), rows sharded unevenly (7 = 4 + 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.up = nn.Linear(6 * 16, 20)
        self.low = tlr.LowRankLinear(20, 20, 6)
        self.mid = nn.Linear(20, 12)
        self.proj = nn.Linear(12, 20)
        self.down = nn.Linear(20, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        h = torch.tanh(self.low(torch.tanh(self.up(h))))
        h = torch.tanh(self.proj(torch.tanh(self.mid(h))))
        return self.head(torch.tanh(self.down(h)))


def _galore_model():
    torch.manual_seed(0)
    return _GaLoreNet().double()


def _galore_opt(model, kind="galore"):
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return GaLoreAdamW(
        model.parameters(), lr=1e-2, rank=3, update_gap=2, scale=0.5, weight_decay=0.1, oversample=2
    )


def _galore_worker(rank, world, out):
    model = _galore_model()
    fully_shard(model)
    opt = _galore_opt(model)
    xs, ys = _layers_data()
    syncs = []
    for x, y in zip(_local(xs, rank, world), _local(ys, rank, world)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with HostSyncCounter() as counter:
            opt.step()
        syncs.append(counter.calls)
    layout = {
        f"{name}.{k}": str(tuple(v.placements)) if isinstance(v, DTensor) else type(v).__name__
        for name, p in model.named_parameters()
        for k, v in opt.state[p].items()
    }
    orthos = {
        name: whole(opt.state[p]["ortho"]) for name, p in model.named_parameters() if "ortho" in opt.state[p]
    }
    torch.save(
        {
            "state": whole_state(model),
            "orthos": orthos,
            "layout": layout,
            "bytes": opt.state_bytes(),
            "syncs": syncs,
        },
        out / f"galore{rank}.pt",
    )
    try:
        GaLoreAdamW(model.parameters(), rank=3, refresh="svd").step()
        error = ""
    except ValueError as e:
        error = str(e)
    torch.save(error, out / f"galore_svd{rank}.pt")


def test_galore_under_fully_shard_equals_one_process(fsdp_out):
    """Projectors refreshed at steps 0 and 2 (the second warm-started) from all-reduced products of
    the row shards, left (m < n) and right (m >= n) alike: parameters and projectors equal one
    process; the moments and left projectors are sharded by rows, the right projectors replicated."""
    model = _galore_model()
    opt = _galore_opt(model)
    xs, ys = _layers_data()
    _train(model, opt, xs, ys)
    orthos = {name: opt.state[p]["ortho"] for name, p in model.named_parameters() if "ortho" in opt.state[p]}
    assert set(orthos) == {
        "conv.weight",
        "up.weight",
        "low.U",
        "low.V",
        "mid.weight",
        "proj.weight",
        "down.weight",
    }
    got = [torch.load(fsdp_out / f"galore{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for g in got:
        _assert_states_equal(g["state"], model.state_dict())
        _assert_states_equal(g["orthos"], orthos)
    layout = got[0]["layout"]
    for name in ("down.weight", "conv.weight"):  # left: Q (m, r) and the (r, n) moments split by rows
        for k in ("ortho", "exp_avg", "exp_avg_sq"):
            assert layout[f"{name}.{k}"] == "(Shard(dim=0),)", (name, k)
    for name in ("proj.weight", "low.U"):  # right: P (r, n) replicated, the (m, r) moments split by rows
        assert layout[f"{name}.ortho"] == "(Replicate(),)"
        assert layout[f"{name}.exp_avg"] == layout[f"{name}.exp_avg_sq"] == "(Shard(dim=0),)"
    assert layout["head.bias.exp_avg"] == "(Shard(dim=0),)" and layout["head.bias.step"] == "int"
    assert got[0]["syncs"] == got[1]["syncs"] == [[]] * STEPS  # refresh steps (0, 2) included
    assert sum(g["bytes"] for g in got) < 2 * opt.state_bytes()  # only the (r, n) projectors are replicated


def test_galore_svd_refresh_under_fully_shard_raises(fsdp_out):
    assert "refresh='warm'" in torch.load(fsdp_out / "galore_svd0.pt")


# -- distributed checkpoints ---------------------------------------------------------------------
HALF = 2  # steps before the checkpoint


def _save(model, opt, path) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def _load(model, opt, path) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)  # allocates the optimizer state to load into
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _dcp_worker(rank, world, out, ckpt_dir):
    xs, ys = _layers_data()
    xs, ys = _local(xs, rank, world), _local(ys, rank, world)
    for kind in ("adamw", "galore"):
        # 2 -> 1: train the first half here, the test resumes in one process
        model = _galore_model()
        fully_shard(model)
        opt = _galore_opt(model, kind)
        _train(model, opt, xs[:HALF], ys[:HALF])
        _save(model, opt, out / f"ckpt2_{kind}")
        # 1 -> 2: resume the one-process checkpoint written before the launch
        model = _galore_model()
        for p in model.parameters():  # the checkpoint must overwrite every value
            p.data.fill_(0.5)
        fully_shard(model)
        opt = _galore_opt(model, kind)
        _load(model, opt, ckpt_dir / f"ckpt1_{kind}")
        _train(model, opt, xs[HALF:], ys[HALF:])
        torch.save(whole_state(model), out / f"resumed_{kind}{rank}.pt")


def _one_process_checkpoints(ckpt_dir):
    xs, ys = _layers_data()
    for kind in ("adamw", "galore"):
        model = _galore_model()
        opt = _galore_opt(model, kind)
        _train(model, opt, xs[:HALF], ys[:HALF])
        _save(model, opt, ckpt_dir / f"ckpt1_{kind}")


@pytest.mark.parametrize("kind", ["adamw", "galore"])
def test_dcp_checkpoints_resume_across_world_sizes_as_an_uninterrupted_run(fsdp_out, kind):
    xs, ys = _layers_data()
    model = _galore_model()
    _train(model, _galore_opt(model, kind), xs, ys)
    want = model.state_dict()
    for rank in range(WORLD):  # 1 -> 2
        _assert_states_equal(torch.load(fsdp_out / f"resumed_{kind}{rank}.pt", weights_only=True), want)
    resumed = _galore_model()  # 2 -> 1
    opt = _galore_opt(resumed, kind)
    _load(resumed, opt, fsdp_out / f"ckpt2_{kind}")
    _train(resumed, opt, xs[HALF:], ys[HALF:])
    _assert_states_equal(resumed.state_dict(), want)


# -- Q3R -----------------------------------------------------------------------------------------
def _q3r_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 16, 20),
        nn.ReLU(),
        nn.Linear(20, 7),  # 7 rows: 4 + 3
        nn.ReLU(),
        nn.Linear(7, 3),  # 3 rows, K = 3 slots: 2 + 1 rows, fewer than K on each rank
    ).double()


def _q3r_setup(model, decoupled=False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg = tlr.Q3R(
        model,
        target_rank=2,
        lam=0.05,
        period=2,
        method="randomized",
        oversample=2,
        seed=3,
        decoupled=decoupled,
        optimizer=opt if decoupled else None,
    )
    return opt, reg


def _q3r_train(model, opt, reg, xs, ys):
    syncs = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with HostSyncCounter() as counter:
            reg.step()
        syncs.append(counter.calls)
        opt.step()
    return syncs


def _q3r_worker(rank, world, out):
    model = _q3r_model()
    fully_shard(model)
    opt, reg = _q3r_setup(model)
    xs, ys = _layers_data()
    syncs = _q3r_train(model, opt, reg, _local(xs, rank, world), _local(ys, rank, world))
    blocks = reg.state_dict()["blocks"]
    reg_state = {f"{b['name']}.{k}": whole(b[k]) for b in blocks for k in ("U", "V", "s")}
    reg_state.update({f"{b['name']}.eps": torch.tensor(b["eps"]) for b in blocks})
    # a resumed regularizer: from its own (row-sharded) state and from whole tensors (one process's)
    whole_reg = {**reg.state_dict(), "blocks": [{**b, "U": whole(b["U"])} for b in blocks]}
    resumed = []
    for state in (reg.state_dict(), whole_reg):
        again = tlr.Q3R(model, target_rank=2, lam=0.05, period=2, method="randomized", oversample=2, seed=3)
        again.load_state_dict(state)
        resumed.append(
            all(
                torch.equal(whole(a["U"]), whole(b["U"]))
                for a, b in zip(again.state_dict()["blocks"], blocks)
            )
        )
    errors = []
    for make in (
        lambda: reg.value(),
        lambda: tlr.Q3R(model, target_rank=2, lam=0.1, method="full"),
        lambda: tlr.Q3R(model, target_rank=2, lam=0.1, shard_reweighting=True),
    ):
        try:
            make()
            errors.append("")
        except ValueError as e:
            errors.append(str(e))
    coupled = whole_state(model)
    model = _q3r_model()  # decoupled: the weights' local rows are updated in place
    fully_shard(model)
    opt, reg = _q3r_setup(model, decoupled=True)
    _q3r_train(model, opt, reg, _local(xs, rank, world), _local(ys, rank, world))
    torch.save(
        {
            "state": coupled,
            "reg": reg_state,
            "errors": errors,
            "resumed": resumed,
            "syncs": syncs,
            "decoupled": whole_state(model),
        },
        out / f"q3r{rank}.pt",
    )


def test_q3r_on_sharded_weights_equals_one_process(fsdp_out):
    """Reweightings at steps 0 and 2 from the row shards (range finder: all-reduced products, TSQR,
    sign fix over the ranks) and the gradient term each step: weights, U, V, s and eps equal one process."""
    model = _q3r_model()
    opt, reg = _q3r_setup(model)
    xs, ys = _layers_data()
    _q3r_train(model, opt, reg, xs, ys)
    assert all(float(reg.state_dict()["blocks"][i]["eps"]) < float("inf") for i in range(4))
    want = {f"{b['name']}.{k}": b[k] for b in reg.state_dict()["blocks"] for k in ("U", "V", "s")}
    want.update({f"{b['name']}.eps": torch.tensor(b["eps"]) for b in reg.state_dict()["blocks"]})
    for rank in range(WORLD):
        got = torch.load(fsdp_out / f"q3r{rank}.pt", weights_only=True)
        _assert_states_equal(got["state"], model.state_dict())
        _assert_states_equal(got["reg"], want)
        assert got["resumed"] == [True, True]
        # as in one process: the batched small SVD's status check on reweighting steps (0, 2) only
        assert got["syncs"] == [["linalg_svd"], [], ["linalg_svd"], []], got["syncs"]
        value, full, shard = got["errors"]
        assert "reg.step()" in value and "method='randomized'" in full and "leave it False" in shard
    model = _q3r_model()
    opt, reg = _q3r_setup(model, decoupled=True)
    _q3r_train(model, opt, reg, xs, ys)
    for rank in range(WORLD):
        _assert_states_equal(
            torch.load(fsdp_out / f"q3r{rank}.pt", weights_only=True)["decoupled"], model.state_dict()
        )


def test_bench_fsdp_quick_runs_and_reports_every_arm(monkeypatch):
    """The benchmark's smoke test (its own launches, 1 and 2 processes); an arm whose optimizer does
    not support FSDP2 is a row marked unsupported, not a failure."""
    import importlib
    from pathlib import Path

    # by name from sys.path, as benchmarks/run.py loads it: the spawned processes import it again
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("bench_fsdp")
    (table,) = bench.run(quick=True).tables
    assert [row[0] for row in table.rows] == [1] * 4 + [2] * 4
    status = {(row[0], row[1]): row[-1] for row in table.rows}
    assert all(v == "ok" for (_, name), v in status.items() if "LowRankAdam" not in name)
    assert all(v == "ok" or v.startswith("unsupported (") for v in status.values())


# -- the launch ----------------------------------------------------------------------------------
def _worker(rank, world, out, ckpt_dir):
    _layers_worker(rank, world, out)
    _adapter_worker(rank, world, out)
    _galore_worker(rank, world, out)
    _dcp_worker(rank, world, out, ckpt_dir)
    _q3r_worker(rank, world, out)


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("ckpt1")
    _one_process_checkpoints(ckpt_dir)
    return run_ddp(_worker, tmp_path_factory.mktemp("fsdp"), WORLD, ckpt_dir)
