"""LowRankSGD / LowRankAdam on FSDP2-sharded factors (``fully_shard``, 2 gloo processes on CPU):
the sharded step equals one process on the global batch in float64, takes no host read, refuses the
layouts it cannot take, and its state goes through distributed checkpoints across world sizes."""

import pytest
import torch
from torch import nn

import torchlowrank as tlr
from ddp import run_ddp
from sharded_state import refusal, unit_state, whole_state

pytestmark = pytest.mark.ddp
fsdp = pytest.importorskip("torch.distributed.fsdp")

STEPS, BATCH, TOL = 9, 8, dict(atol=1e-10, rtol=1e-10)  # 9 steps: the step-8 re-orthonormalisation too

WRAPS = ("per_layer", "whole", "hsdp")
OPTS = {
    "adam": lambda m: tlr.optim.LowRankAdam(m),  # default settings
    "sgd": lambda m: tlr.optim.LowRankSGD(m, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam_elementwise": lambda m: tlr.optim.LowRankAdam(
        m, lr=1e-2, second_moment="elementwise", augment_every=2
    ),
}


def _data(steps=STEPS):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(steps, BATCH, 12, generator=g, dtype=torch.float64),
        torch.randint(0, 4, (steps, BATCH), generator=g),
    )


def _model():
    """Three shape groups: (17, 12, 5), and (17, 17, 3) twice (stepped as one batch). Odd m, n and r:
    the row blocks and s's slices differ in size between the processes."""
    torch.manual_seed(0)
    return nn.Sequential(
        tlr.LowRankLinear(12, 17, 5),
        nn.Tanh(),
        tlr.LowRankLinear(17, 17, 3),
        nn.Tanh(),
        tlr.LowRankLinear(17, 17, 3, bias=False),
        nn.Tanh(),
        nn.Linear(17, 4),
    ).double()


def _shard(model, wrap):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if wrap == "hsdp":  # a 2-D mesh, placements (Replicate(), Shard(0)): rows sharded over mesh dim 1
        mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("replicate", "shard"))
        for i in (0, 2, 4):
            fully_shard(model[i], mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if wrap == "per_layer":
        for i in (0, 2, 4):
            fully_shard(model[i])
    fully_shard(model)
    return model


def _train(model, opt, xs, ys):
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _local_batches(rank, world, steps=STEPS):
    xs, ys = _data(steps)
    half = BATCH // world
    return xs[:, rank * half : (rank + 1) * half], ys[:, rank * half : (rank + 1) * half]


# ----- the 2-process jobs, in one launch ------------------------------------------------------------
def _worker(rank, world, out):
    for wrap in WRAPS:
        for kind in OPTS if wrap != "hsdp" else ["adam"]:
            model = _shard(_model(), wrap)
            opt = OPTS[kind](model)
            _train(model, opt, *_local_batches(rank, world))
            torch.save(
                {"model": whole_state(model), "units": unit_state(opt)}, out / f"{wrap}_{kind}{rank}.pt"
            )
    _conv_worker(rank, world, out)
    _host_sync_worker(rank, world, out)
    _refusals_worker(rank, world, out)
    _nonfinite_worker(rank, world, out)
    _checkpoint_save(rank, world, out, "ckpt_2")


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(
        tlr.LowRankConv2d(3, 7, 3, 3), nn.Tanh(), nn.Flatten(), tlr.LowRankLinear(7 * 4 * 4, 4, 3)
    ).double()


def _conv_data(rank, world):
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(4, BATCH, 3, 6, 6, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 4, (4, BATCH), generator=g)
    half = BATCH // world
    return xs[:, rank * half : (rank + 1) * half], ys[:, rank * half : (rank + 1) * half]


def _conv_worker(rank, world, out):
    """LowRankConv2d: V (in * k * k, r) sharded by rows like a linear layer's."""
    model = _shard(_conv_model(), "whole")
    opt = tlr.optim.LowRankAdam(model)
    _train(model, opt, *_conv_data(rank, world))
    torch.save(whole_state(model), out / f"conv{rank}.pt")


def _host_sync_worker(rank, world, out):
    from host_syncs import HostSyncCounter

    model = _shard(_model(), "per_layer")
    opt = tlr.optim.LowRankAdam(model)
    calls = []
    for x, y in zip(*_local_batches(rank, world, 3)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with HostSyncCounter() as syncs:
            opt.step()
        calls += syncs.calls
    (out / f"syncs{rank}.txt").write_text(",".join(calls))


def _refusals_worker(rank, world, out):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    messages = []

    def refused(build):
        messages.append(refusal(build))

    refused(lambda: tlr.optim.LowRankAdam(_shard(_model(), "per_layer"), tau=0.2))
    mixed = _model()
    fully_shard(mixed[0])  # the other low-rank layers stay plain tensors
    refused(lambda: tlr.optim.LowRankSGD(mixed, lr=0.1))
    rank_sharded = nn.Sequential(tlr.LowRankLinear(12, 16, 4)).double()
    fully_shard(rank_sharded, shard_placement_fn=lambda p: Shard(p.ndim - 1))  # U, V by columns (r)
    refused(lambda: tlr.optim.LowRankAdam(rank_sharded))
    late = _model()
    opt = tlr.optim.LowRankAdam(late)
    _shard(late, "whole")  # after the optimizer: its Parameters are new objects
    x, y = (t[0] for t in _local_batches(rank, world, 1))
    nn.functional.cross_entropy(late(x), y).backward()
    refused(opt.step)
    (out / f"refusals{rank}.txt").write_text("|".join(messages))


def _nonfinite_worker(rank, world, out):
    """A NaN in one entry of process 1's shard of a U gradient: every process skips the step (or
    raises), none changes a weight."""
    results = []
    for mode in ("skip", "raise"):
        model = _shard(_model(), "per_layer")
        opt = tlr.optim.LowRankAdam(model, nonfinite=mode)
        x, y = (t[0] for t in _local_batches(rank, world, 1))
        nn.functional.cross_entropy(model(x), y).backward()
        if rank == 1:
            model[2].U.grad.to_local()[0, 0] = float("nan")
        before = whole_state(model)
        try:
            opt.step()
            outcome = f"skipped {int(opt.nonfinite_steps)}"
        except tlr.optim.NonFiniteStepError as e:
            outcome = str(e)
        after = whole_state(model)
        results.append(f"{outcome} / unchanged {all(torch.equal(before[k], after[k]) for k in before)}")
    (out / f"nonfinite{rank}.txt").write_text("|".join(results))


# ----- distributed checkpoints ---------------------------------------------------------------------
CKPT_STEPS = 2


def _checkpoint_save(rank, world, out, name):
    """2 steps on ``world`` processes, then the model and LowRankAdam's state through DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _shard(_model(), "per_layer")
    opt = tlr.optim.LowRankAdam(model)
    xs, ys = _local_batches(rank, world, 2 * CKPT_STEPS)
    _train(model, opt, xs[:CKPT_STEPS], ys[:CKPT_STEPS])
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=out / name)


def _checkpoint_resume(rank, world, out, name):
    """A fresh model and optimizer on ``world`` processes load the checkpoint and take 2 more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _shard(_model(), "per_layer")
    opt = tlr.optim.LowRankAdam(model)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=out / name)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    steps = [opt.state[g["params"][0]]["step"] for g in opt.param_groups if g["unit"] is not None]
    xs, ys = _local_batches(rank, world, 2 * CKPT_STEPS)
    _train(model, opt, xs[CKPT_STEPS:], ys[CKPT_STEPS:])
    torch.save(
        {"model": whole_state(model), "units": unit_state(opt), "loaded_steps": steps},
        out / f"resumed_{name}_{world}_{rank}.pt",
    )


def _resume_without_process_group(path):
    """The sharded checkpoint loaded by a plain model and optimizer (no process group, no FSDP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _model()
    opt = tlr.optim.LowRankAdam(model)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    xs, ys = _data(2 * CKPT_STEPS)
    _train(model, opt, xs[CKPT_STEPS:], ys[CKPT_STEPS:])
    return model, opt


def _one_process_worker(rank, world, out):
    _checkpoint_resume(rank, world, out, "ckpt_2")  # 2 -> 1
    _checkpoint_save(rank, world, out, "ckpt_1")


def _two_process_resume_worker(rank, world, out):
    _checkpoint_resume(rank, world, out, "ckpt_1")  # 1 -> 2


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory):
    out = run_ddp(_worker, tmp_path_factory.mktemp("fsdp"))
    run_ddp(_one_process_worker, out.parent, 1)
    run_ddp(_two_process_resume_worker, out.parent, 2)
    return out


def _reference(kind, steps=STEPS):
    model = _model()
    opt = OPTS[kind](model)
    _train(model, opt, *_data(steps))
    return model, opt


@pytest.mark.parametrize(
    "wrap, kind", [(w, k) for w in ("per_layer", "whole") for k in OPTS] + [("hsdp", "adam")]
)
def test_sharded_geometric_steps_equal_one_process_on_the_global_batch(fsdp_out, wrap, kind):
    """Per-layer + root wrapping, root only, and HSDP's 2-D mesh; Adam's defaults, SGD with
    (Nesterov) momentum and weight decay, elementwise Adam with augmentation every other step."""
    model, opt = _reference(kind)
    got = [torch.load(fsdp_out / f"{wrap}_{kind}{r}.pt", weights_only=True) for r in range(2)]
    for k, v in model.state_dict().items():
        assert torch.equal(got[0]["model"][k], got[1]["model"][k]), k
        torch.testing.assert_close(got[0]["model"][k], v, **TOL, msg=k)
    ref = unit_state(opt)
    for name, moments in ref.items():
        for key, v in moments.items():
            assert torch.equal(got[0]["units"][name][key], got[1]["units"][name][key]), (name, key)
            torch.testing.assert_close(got[0]["units"][name][key], v, **TOL, msg=f"{name} {key}")
    assert not torch.equal(model[0].U, _model()[0].U.double())  # the run did move the factors


def test_sharded_conv_layers_equal_one_process(fsdp_out):
    model = _conv_model()
    _train(model, tlr.optim.LowRankAdam(model), *_conv_data(0, 1))
    got = [torch.load(fsdp_out / f"conv{r}.pt", weights_only=True) for r in range(2)]
    for k, v in model.state_dict().items():
        assert torch.equal(got[0][k], got[1][k]), k
        torch.testing.assert_close(got[0][k], v, **TOL, msg=k)


def test_a_sharded_fixed_rank_step_reads_nothing_on_the_host(fsdp_out):
    """The all-reduces are queued like any kernel; what is left is the r x r SVD of the truncation
    (as in one process), once per shape group: two groups, three steps."""
    for r in range(2):
        assert (fsdp_out / f"syncs{r}.txt").read_text().split(",") == ["linalg_svd"] * 6


def test_layouts_the_sharded_step_cannot_take_are_refused_with_what_to_do(fsdp_out):
    for r in range(2):
        tau, mixed, rank_sharded, late = (fsdp_out / f"refusals{r}.txt").read_text().split("|")
        assert "tau > 0" in tau and "DistributedDataParallel" in tau
        assert "plain tensors" in mixed and "fully_shard" in mixed
        assert "Shard(dim=1)" in rank_sharded and "rows" in rank_sharded
        assert "after fully_shard" in late


def test_a_nonfinite_gradient_in_one_shard_stops_the_step_on_every_process(fsdp_out):
    for r in range(2):
        skip, raised = (fsdp_out / f"nonfinite{r}.txt").read_text().split("|")
        assert skip == "skipped 1 / unchanged True"
        assert raised.endswith("/ unchanged True") and "step refused" in raised
        assert ("layer '2' (factor U)" if r == 1 else "another process's shard") in raised


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_resumes_in_a_plain_process_as_an_uninterrupted_run(fsdp_out):
    model, opt = _reference("adam", 2 * CKPT_STEPS)
    got, got_opt = _resume_without_process_group(fsdp_out / "ckpt_2")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, **TOL, msg=k)
    ref, state = unit_state(opt), unit_state(got_opt)
    for name, moments in ref.items():
        for key, v in moments.items():
            torch.testing.assert_close(state[name][key], v, **TOL, msg=f"{name} {key}")


@pytest.mark.parametrize("saved, resumed", [("ckpt_2", 1), ("ckpt_1", 2)])
def test_distributed_checkpoint_resumes_on_another_world_size_as_an_uninterrupted_run(
    fsdp_out, saved, resumed
):
    model, opt = _reference("adam", 2 * CKPT_STEPS)
    ref = unit_state(opt)
    for r in range(resumed):
        got = torch.load(fsdp_out / f"resumed_{saved}_{resumed}_{r}.pt", weights_only=True)
        assert got["loaded_steps"] == [CKPT_STEPS] * 3
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got["model"][k], v, **TOL, msg=k)
        for name, moments in ref.items():
            for key, v in moments.items():
                torch.testing.assert_close(got["units"][name][key], v, **TOL, msg=f"{name} {key}")
