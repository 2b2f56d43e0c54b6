"""torch.distributed (DDP, 2 gloo processes on CPU): results equal one process on the same global batch."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import torchlowrank as tlr
from ddp import run_ddp
from torchlowrank import distributed as tlr_dist

pytestmark = pytest.mark.ddp

STEPS, BATCH = 4, 16


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(STEPS, BATCH, 20, generator=g), torch.randint(0, 5, (STEPS, BATCH), generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(tlr.LowRankLinear(20, 32, 6), nn.ReLU(), nn.Linear(32, 5))


def _train(model, xs, ys, opt):
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _worker(rank, world, out):
    """Every DDP job of this file in one launch (spawning processes is the slow part)."""
    _ddp_lowrank_worker(rank, world, out)
    _main_only_worker(rank, world, out)
    _tracker_worker(rank, world, out)
    _deep_lora_worker(rank, world, out)
    _optim_q3r_worker(rank, world, out)
    _rank_adaptive_worker(rank, world, out)
    _stale_wrapper_worker(rank, world, out)
    _galore_worker(rank, world, out)
    _rank_agreement_worker(rank, world, out)
    _sharded_q3r_worker(rank, world, out)


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    return run_ddp(_worker, tmp_path_factory.mktemp("ddp"))


def _ddp_lowrank_worker(rank, world, out):
    xs, ys = _data()
    half = BATCH // world
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    _train(ddp, xs[:, rank * half : (rank + 1) * half], ys[:, rank * half : (rank + 1) * half], opt)
    torch.save(model.state_dict(), out / f"rank{rank}.pt")


def test_ddp_training_of_a_lowrank_model_equals_one_process_on_the_global_batch(ddp_out):
    out = ddp_out
    xs, ys = _data()
    model = _model()
    _train(model, xs, ys, torch.optim.AdamW(model.parameters(), lr=1e-2))
    for r in range(2):
        state = torch.load(out / f"rank{r}.pt", weights_only=True)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(state[k], v, atol=1e-6, rtol=1e-5)


def _write_on_main(path, text):
    path.write_text(f"{text} by rank {tlr_dist.rank()}")
    return tlr_dist.rank()


def _fail_on_main():
    raise ValueError("disk full")


def _main_only_worker(rank, world, out):
    written_by = tlr_dist.main_process_only(_write_on_main)(out / "file.txt", "written")
    try:
        tlr_dist.main_process_only(_fail_on_main)()
        raised = ""
    except ValueError as e:
        raised = str(e)
    (out / f"rank{rank}.txt").write_text(f"{written_by}|{raised}|{tlr_dist.world_size()}")


def test_main_process_only_writes_once_and_every_rank_sees_the_result_or_the_error(ddp_out):
    out = ddp_out
    assert (out / "file.txt").read_text() == "written by rank 0"
    for r in range(2):
        assert (out / f"rank{r}.txt").read_text() == "0|disk full|2"


def test_helpers_are_the_identity_without_a_process_group(tmp_path):
    assert not tlr_dist.is_distributed() and tlr_dist.rank() == 0 and tlr_dist.world_size() == 1
    assert tlr_dist.main_process_only(_write_on_main)(tmp_path / "f.txt", "x") == 0
    t = torch.ones(3)
    tlr_dist.broadcast_tensors_([t])
    assert torch.equal(t, torch.ones(3))


def _tracker_worker(rank, world, out):
    xs, ys = _data()
    half = BATCH // world
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    tracker = tlr.SpectrumTracker(model, every=2)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    tracker.attach(opt)
    _train(ddp, xs[:, rank * half : (rank + 1) * half], ys[:, rank * half : (rank + 1) * half], opt)
    tracker.save(out / "history.json")
    (out / f"rows{rank}.txt").write_text(str(len(tracker.history)))


def test_spectrum_tracker_records_and_writes_on_rank_0_only(ddp_out):
    from torchlowrank.diagnostics import load_history

    out = ddp_out
    assert int((out / "rows1.txt").read_text()) == 0
    rows0 = int((out / "rows0.txt").read_text())
    assert rows0 > 0 and len(load_history(out / "history.json")) == rows0
    # the gradients rank 0 recorded are the all-reduced (global-batch) ones: equal to one process
    xs, ys = _data()
    model = _model()
    tracker = tlr.SpectrumTracker(model, every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker.attach(opt)
    _train(model, xs, ys, opt)
    ddp_rows = load_history(out / "history.json")
    for a, b in zip(ddp_rows, tracker.history):
        assert (a["step"], a["layer"], a["quantity"]) == (b["step"], b["layer"], b["quantity"])
        assert a["stable_rank"] == pytest.approx(b["stable_rank"], rel=1e-4)


def _deep_lora_setup():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    tlr.adapt(model, tlr.DeepLoRAConfig(r=4, depth=3, compress=True, target_modules=["0", "2"]))
    return model


def _deep_lora_loss(x, y):
    return lambda model, batch: nn.functional.cross_entropy(model(x), y)


def _deep_lora_worker(rank, world, out):
    xs, ys = _data()
    half = BATCH // world
    model = _deep_lora_setup()
    gen = torch.Generator().manual_seed(100 + rank)  # different draws per rank: rank 0's must win
    x, y = xs[0, rank * half : (rank + 1) * half], ys[0, rank * half : (rank + 1) * half]
    tlr.init_compressed(model, None, loss_fn=_deep_lora_loss(x, y), generator=gen)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(tlr.adapter_param_groups(model, lr=1e-2))
    _train(ddp, xs[1:, rank * half : (rank + 1) * half], ys[1:, rank * half : (rank + 1) * half], opt)
    tlr.save_adapter(model, out / "adapter")
    tlr.export_peft(model, out / "peft")
    torch.save({k: v for k, v in model.state_dict().items() if "lora" in k}, out / f"deep{rank}.pt")


def test_compressed_deep_lora_init_and_training_under_ddp_equal_one_process(ddp_out):
    xs, ys = _data()
    model = _deep_lora_setup()
    tlr.init_compressed(
        model, None, loss_fn=_deep_lora_loss(xs[0], ys[0]), generator=torch.Generator().manual_seed(100)
    )
    opt = torch.optim.AdamW(tlr.adapter_param_groups(model, lr=1e-2))
    _train(model, xs[1:], ys[1:], opt)
    ref = {k: v for k, v in model.state_dict().items() if "lora" in k}
    for r in range(2):
        state = torch.load(ddp_out / f"deep{r}.pt", weights_only=True)
        assert state.keys() == ref.keys()
        for k, v in ref.items():
            torch.testing.assert_close(state[k], v, atol=1e-6, rtol=1e-5)
    fresh = _deep_lora_setup()
    tlr.load_adapter(fresh, ddp_out / "adapter")  # written once, by rank 0, and complete
    x = torch.randn(3, 20)
    torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=1e-5)
    assert (ddp_out / "peft" / "adapter_config.json").is_file()


def _optim_q3r_setup():
    torch.manual_seed(2)
    # float64: Adam's division by sqrt(v) amplifies float32 rounding of the two half-batch means
    model = nn.Sequential(
        tlr.LowRankLinear(20, 32, 6), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)
    ).double()
    opt = tlr.optim.LowRankAdam(model, lr=1e-2)
    reg = tlr.Q3R(model, target_rank=3, lam=0.01, period=2, targets=["2"])
    return model, opt, reg


def _optim_q3r_worker(rank, world, out):
    xs, ys = _data()
    half = BATCH // world
    model, opt, reg = _optim_q3r_setup()
    ddp = nn.parallel.DistributedDataParallel(model)
    for x, y in zip(xs[:, rank * half : (rank + 1) * half], ys[:, rank * half : (rank + 1) * half]):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x.double()), y).backward()
        reg.step()
        opt.step()
    torch.save(model.state_dict(), out / f"optim{rank}.pt")


def test_lowrank_adam_and_q3r_under_ddp_equal_one_process(ddp_out):
    """Fixed rank: every rank takes the same geometric step and the same Q3R reweighting from the
    all-reduced gradients, so no extra collective is needed (rank-adaptive tau > 0 replaces
    parameters: DDP is wrapped again after such a step, tested below)."""
    xs, ys = _data()
    model, opt, reg = _optim_q3r_setup()
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.double()), y).backward()
        reg.step()
        opt.step()
    states = [torch.load(ddp_out / f"optim{r}.pt", weights_only=True) for r in range(2)]
    for k, v in model.state_dict().items():
        assert torch.equal(states[0][k], states[1][k]), k  # the ranks never drift apart
        torch.testing.assert_close(states[0][k], v, atol=1e-10, rtol=1e-8)


ADAPTIVE_STEPS = 8


def _adaptive_data():
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(ADAPTIVE_STEPS, BATCH, 20, generator=g, dtype=torch.float64),
        torch.randint(0, 5, (ADAPTIVE_STEPS, BATCH), generator=g),
    )


ADAPTIVE = {
    "adam": lambda m: tlr.optim.LowRankAdam(m, lr=0.2, tau=0.3),  # ranks 6, 5, 5, 4, ...
    "sgd": lambda m: tlr.optim.LowRankSGD(m, lr=1.0, tau=0.3),
}  # 6, 6, 6, 6, 5, ...


def _adaptive_setup(kind="adam"):
    torch.manual_seed(0)
    model = nn.Sequential(tlr.LowRankLinear(20, 32, 6), nn.ReLU(), nn.Linear(32, 5)).double()
    return model, ADAPTIVE[kind](model)


def _rank_adaptive_worker(rank, world, out):
    for kind in ADAPTIVE:
        _rank_adaptive_run(rank, world, out, kind)


def _rank_adaptive_run(rank, world, out, kind):
    xs, ys = _adaptive_data()
    half = BATCH // world
    model, opt = _adaptive_setup(kind)
    ddp = nn.parallel.DistributedDataParallel(model)
    ranks = []
    for x, y in zip(xs[:, rank * half : (rank + 1) * half], ys[:, rank * half : (rank + 1) * half]):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        if opt.ranks_changed:  # the layer holds new Parameters: DDP must learn about them
            ddp = nn.parallel.DistributedDataParallel(model)
        ranks.append(model[0].rank)
    torch.save({"state": model.state_dict(), "ranks": torch.tensor(ranks)}, out / f"adaptive_{kind}{rank}.pt")


@pytest.mark.parametrize("kind", list(ADAPTIVE))
def test_rank_adaptive_optimizers_under_ddp_keep_replicas_identical_and_equal_one_process(ddp_out, kind):
    xs, ys = _adaptive_data()
    model, opt = _adaptive_setup(kind)
    ranks = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ranks.append(model[0].rank)
    assert ranks[0] == 6 and ranks[-1] < 6  # the rank did change during the run
    got = [torch.load(ddp_out / f"adaptive_{kind}{r}.pt", weights_only=True) for r in range(2)]
    for g in got:
        assert g["ranks"].tolist() == ranks
    for k, v in model.state_dict().items():
        assert torch.equal(got[0]["state"][k], got[1]["state"][k]), k
        torch.testing.assert_close(got[0]["state"][k], v, atol=1e-10, rtol=1e-8)


def _stale_wrapper_worker(rank, world, out):
    xs, ys = _adaptive_data()
    half = BATCH // world
    model, opt = _adaptive_setup()
    ddp = nn.parallel.DistributedDataParallel(model)
    message, changed_at, before = "", None, None
    for i, (x, y) in enumerate(
        zip(xs[:, rank * half : (rank + 1) * half], ys[:, rank * half : (rank + 1) * half])
    ):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()  # the wrapper is never rebuilt
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            opt.step()
        except RuntimeError as e:
            message = str(e)
            break
        if opt.ranks_changed and changed_at is None:
            changed_at = i
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    (out / f"stale{rank}.txt").write_text(f"{changed_at}|{i}|{unchanged}|{message}")


def test_a_stale_ddp_wrapper_after_a_rank_change_is_refused_with_what_to_do(ddp_out):
    for r in range(2):
        changed_at, failed_at, unchanged, message = (ddp_out / f"stale{r}.txt").read_text().split("|", 3)
        assert changed_at != "None" and int(failed_at) == int(changed_at) + 1  # caught at the very next step
        assert unchanged == "True"
        assert "wrap the model again" in message and "DistributedDataParallel" in message


def _galore_setup():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)
    ).double()
    return model, tlr.optim.GaLoreAdamW(model.parameters(), lr=1e-2, rank=4, update_gap=2)


def _galore_worker(rank, world, out):
    xs, ys = _data()
    half = BATCH // world
    model, opt = _galore_setup()
    ddp = nn.parallel.DistributedDataParallel(model)
    for x, y in zip(xs[:, rank * half : (rank + 1) * half], ys[:, rank * half : (rank + 1) * half]):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x.double()), y).backward()
        opt.step()
    torch.save(model.state_dict(), out / f"galore{rank}.pt")


def test_galore_projection_refreshes_under_ddp_equal_one_process(ddp_out):
    """The projector is refreshed (steps 0 and 2) from the all-reduced gradient, and its random
    sketch comes from a generator seeded by the step and the parameter index, so every process
    computes the same projector without a collective."""
    xs, ys = _data()
    model, opt = _galore_setup()
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.double()), y).backward()
        opt.step()
    states = [torch.load(ddp_out / f"galore{r}.pt", weights_only=True) for r in range(2)]
    for k, v in model.state_dict().items():
        assert torch.equal(states[0][k], states[1][k]), k
        torch.testing.assert_close(states[0][k], v, atol=1e-10, rtol=1e-8)


def _rank_agreement_worker(rank, world, out):
    model, opt = _adaptive_setup()
    agreed = opt._agree_on_ranks([3 + rank, 7], torch.device("cpu"))  # as if rounding made rank 1 differ
    (out / f"agreed{rank}.txt").write_text(",".join(map(str, agreed)))


def test_rank_decisions_are_rank_0s_on_every_process(ddp_out):
    for r in range(2):
        assert (ddp_out / f"agreed{r}.txt").read_text() == "3,7"


def _q3r_setup(shard):
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(20, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 24),
        nn.ReLU(),
        nn.Linear(24, 5),
    ).double()
    reg = tlr.Q3R(model, target_rank=3, lam=0.05, period=2, targets=["0", "2", "4"], shard_reweighting=shard)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), reg


def _q3r_train(model, opt, reg, xs, ys, forward=None):
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy((forward or model)(x.double()), y).backward()
        reg.step()
        opt.step()


def _sharded_q3r_worker(rank, world, out):
    xs, ys = _data()
    half = BATCH // world
    model, opt, reg = _q3r_setup(shard=True)
    calls = {"broadcast": 0, "all_reduce": 0}
    originals = {name: getattr(dist, name) for name in calls}

    def counting(name):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return wrapped

    ddp = nn.parallel.DistributedDataParallel(model)
    for name in calls:  # count the regularizer's own collectives (DDP's all-reduce runs in C++)
        setattr(dist, name, counting(name))
    try:
        _q3r_train(
            model,
            opt,
            reg,
            xs[:, rank * half : (rank + 1) * half],
            ys[:, rank * half : (rank + 1) * half],
            ddp,
        )
    finally:
        for name, f in originals.items():
            setattr(dist, name, f)
    torch.save(
        {"state": model.state_dict(), "reg": reg.state_dict(), "calls": calls}, out / f"q3r_shard{rank}.pt"
    )


def test_sharded_q3r_reweighting_under_ddp_equals_one_process_with_the_stated_collectives(ddp_out):
    xs, ys = _data()
    model, opt, reg = _q3r_setup(shard=False)
    _q3r_train(model, opt, reg, xs, ys)
    got = [torch.load(ddp_out / f"q3r_shard{r}.pt", weights_only=True) for r in range(2)]
    for g in got:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(g["state"][k], v, atol=1e-10, rtol=1e-8)
        for a, b in zip(g["reg"]["blocks"], reg.state_dict()["blocks"]):  # the same U, V, s, eps everywhere
            assert a["eps"] == pytest.approx(b["eps"], rel=1e-10)
            torch.testing.assert_close(
                a["U"] @ torch.diag(a["s"]) @ a["V"].T,
                b["U"] @ torch.diag(b["s"]) @ b["V"].T,
                atol=1e-10,
                rtol=1e-8,
            )
    for k in model.state_dict():
        assert torch.equal(got[0]["state"][k], got[1]["state"][k])
    # STEPS = 4, period 2: two reweightings, each 2 all-reduces and one broadcast per block (3 blocks)
    assert got[0]["calls"] == {"all_reduce": 4, "broadcast": 6}
