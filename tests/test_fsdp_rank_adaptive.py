"""Rank-adaptive LowRankAdam / LowRankSGD under FSDP2 (``fully_shard``, 2 gloo processes on CPU):
ranks decided from the replicated core and applied at the re-shard point
``reshard_after_rank_change``; the run equals one process's rank-adaptive run on the global batch in
float64 (ranks, weights, moments), and what cannot work is refused with a ValueError."""

import pytest
import torch
from torch import nn

import torchlowrank as tlr
from ddp import run_ddp
from sharded_state import refusal, unit_state, whole_state

pytestmark = pytest.mark.ddp
fsdp = pytest.importorskip("torch.distributed.fsdp")

STEPS, BATCH, TOL = 9, 8, dict(atol=1e-10, rtol=1e-10)  # 9 steps: the step-8 re-orthonormalisation too

OPTS = {  # rank decisions every other step; one process: 2, 4 and 3 changes (SGD: growth, then shrink)
    "adam": lambda m: tlr.optim.LowRankAdam(m, lr=0.2, tau=0.3, rank_every=2, reshard=True),
    "adam_elementwise": lambda m: tlr.optim.LowRankAdam(
        m, lr=0.2, tau=0.4, rank_every=2, second_moment="elementwise", reshard=True
    ),
    "sgd": lambda m: tlr.optim.LowRankSGD(m, lr=5.0, momentum=0.9, tau=0.1, rank_every=2, reshard=True),
    # ranks 2 -> 4 -> 6 (full): more than the 3 rows of U each process holds
    "narrow": lambda m: tlr.optim.LowRankAdam(m, lr=0.1, tau=0.01, reshard=True),
}
RUNS = (("per_layer", "adam"), ("whole", "adam_elementwise"), ("hsdp", "sgd"), ("whole", "narrow"))


def _data(steps=STEPS):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(steps, BATCH, 12, generator=g, dtype=torch.float64),
        torch.randint(0, 4, (steps, BATCH), generator=g),
    )


def _model():
    """Odd m, n and r: the row blocks and s's slices differ in size between the processes; a
    buffer (carried by the re-shard point) and a frozen parameter (not in the optimizer)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        tlr.LowRankLinear(12, 17, 5),
        nn.Tanh(),
        tlr.LowRankLinear(17, 17, 3),
        nn.Tanh(),
        tlr.LowRankLinear(17, 17, 3, bias=False),
        nn.Tanh(),
        nn.Linear(17, 4),
    ).double()
    model.register_buffer("calls", torch.zeros((), dtype=torch.float64))
    model[2].bias.requires_grad_(False)
    return model


def _narrow_model():
    """U (6, r): 3 rows per process, the rank grows beyond them (the rank bound is global)."""
    torch.manual_seed(0)
    model = nn.Sequential(tlr.LowRankLinear(12, 6, 2), nn.Tanh(), nn.Linear(6, 4)).double()
    model.register_buffer("calls", torch.zeros((), dtype=torch.float64))
    return model


BUILD = {"narrow": _narrow_model}  # the others: _model
STEPS_OF = {"narrow": 4}


def _shard(model, wrap):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if wrap == "hsdp":  # a 2-D mesh, placements (Replicate(), Shard(0)): rows sharded over mesh dim 1
        mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("replicate", "shard"))
        for layer in _lowrank(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if wrap == "per_layer":
        for layer in _lowrank(model):
            fully_shard(layer)
    fully_shard(model)
    return model


def _other_state(opt, model):
    """AdamW / SGD state of the ordinary parameters, whole, by parameter name."""
    from torch.distributed.tensor import DTensor

    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).clone()
            for k, v in opt.state[p].items()
            if torch.is_tensor(v)
        }
        for g in opt.param_groups
        if g["unit"] is None
        for p in g["params"]
        if p in opt.state
    }


def _step(model, opt, x, y):
    opt.zero_grad()
    model.calls += 1
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _lowrank(model):
    return [m for m in model if isinstance(m, tlr.LowRankLinear)]


def _ranks(model):
    return [m.rank for m in _lowrank(model)]


def _local_batches(rank, world, steps=STEPS):
    xs, ys = _data(steps)
    half = BATCH // world
    return xs[:, rank * half : (rank + 1) * half], ys[:, rank * half : (rank + 1) * half]


# ----- the 2-process jobs, in one launch ------------------------------------------------------------
def _worker(rank, world, out):
    for wrap, kind in RUNS:
        _adaptive_worker(rank, world, out, wrap, kind)
    _refusals_worker(rank, world, out)


def _adaptive_worker(rank, world, out, wrap, kind):
    build = BUILD.get(kind, _model)
    model = _shard(build(), wrap)
    opt = OPTS[kind](model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)  # holds the same optimizer
    ranks, pending, same_opt = [], [], True
    for x, y in zip(*_local_batches(rank, world, STEPS_OF.get(kind, STEPS))):
        _step(model, opt, x, y)
        sched.step()
        if opt.ranks_changed:
            pending.append(opt.pending_ranks)
            new = tlr.optim.reshard_after_rank_change(model, opt, build, lambda m: _shard(m, wrap))
            assert new is not model and not opt.pending_ranks
            model = new
        ranks.append(_ranks(model))
        same_opt &= sched.optimizer is opt
    torch.save(
        {
            "model": whole_state(model),
            "units": unit_state(opt),
            "others": _other_state(opt, model),
            "ranks": ranks,
            "pending": pending,
            "lr": [g["lr"] for g in opt.param_groups],
            "same_opt": same_opt,
            "dtensor": type(model[0].U).__name__,
        },
        out / f"{wrap}_{kind}{rank}.pt",
    )
    if (wrap, kind) == RUNS[0]:  # a distributed checkpoint written after the rank changes
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=out / "ckpt")


def _refusals_worker(rank, world, out):
    messages = []

    def refused(call):
        messages.append(refusal(call))

    def pending_run():
        """One rank change awaiting the re-shard point."""
        model = _shard(_model(), "per_layer")
        opt = OPTS["adam"](model)
        xs, ys = _local_batches(rank, world, 2)
        for x, y in zip(xs, ys):
            _step(model, opt, x, y)
        assert opt.ranks_changed and opt.pending_ranks
        return model, opt, (xs[0], ys[0])

    refused(lambda: tlr.optim.LowRankAdam(_shard(_model(), "per_layer"), tau=0.2))  # no reshard=True
    model, opt, (x, y) = pending_run()
    before = whole_state(model)
    refused(lambda: _step(model, opt, x, y))  # the next step without the re-shard point
    refused(opt.state_dict)  # its moments are at the new ranks, the model's factors at the old

    def other_architecture():
        m = _model()
        m[4] = nn.Linear(17, 17)
        return m

    refused(
        lambda: tlr.optim.reshard_after_rank_change(
            model, opt, other_architecture, lambda m: _shard(m, "per_layer")
        )
    )
    refused(lambda: tlr.optim.reshard_after_rank_change(model, opt, _model, lambda m: m))  # not sharded
    unchanged = all(torch.equal(before[k], v) for k, v in whole_state(model).items() if k != "calls")
    new = tlr.optim.reshard_after_rank_change(model, opt, _model, lambda m: _shard(m, "per_layer"))
    _step(new, opt, x, y)  # after the refusals, the re-shard point still works
    messages.append(f"unchanged {unchanged}")
    (out / f"refusals{rank}.txt").write_text("|".join(messages))


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory):
    return run_ddp(_worker, tmp_path_factory.mktemp("fsdp_rank"))


def _reference(kind):
    """One process, the global batch, the same optimizer (reshard=True does nothing on plain layers)."""
    model = BUILD.get(kind, _model)()
    opt = OPTS[kind](model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    ranks, changes = [], []
    for x, y in zip(*_data(STEPS_OF.get(kind, STEPS))):
        _step(model, opt, x, y)
        sched.step()
        changes.append(opt.ranks_changed)
        ranks.append(_ranks(model))
    return model, opt, ranks, changes


@pytest.mark.parametrize("wrap, kind", RUNS)
def test_rank_changes_under_fsdp_equal_one_process_rank_adaptive_run(fsdp_out, wrap, kind):
    """Per-layer + root, root only and HSDP wrapping; Adam (unit and elementwise second moment),
    SGD with momentum (ranks growing, then shrinking), a rank above the rows a process holds: the
    same ranks at every step (two changes at least), the same weights, unit
    moments and AdamW / momentum state of the other parameters, bit-identical on both processes."""
    model, opt, ranks, changes = _reference(kind)
    initial = _ranks(BUILD.get(kind, _model)())
    assert sum(changes) >= 2 and len({tuple(r) for r in [initial] + ranks}) >= 3  # two changes at least
    assert not opt.pending_ranks  # unsharded: applied inside step()
    got = [torch.load(fsdp_out / f"{wrap}_{kind}{r}.pt", weights_only=True) for r in range(2)]
    for g in got:
        assert g["ranks"] == ranks
        assert len(g["pending"]) == sum(changes)
        assert g["same_opt"] and g["lr"] == [pg["lr"] for pg in opt.param_groups]
        assert g["dtensor"] == "DTensor"  # still sharded after the re-shard points
    assert [list(p.values()) for p in got[0]["pending"]] == [
        [r for r, old in zip(new, prev) if r != old]
        for new, prev, changed in zip(ranks, [initial] + ranks, changes)
        if changed
    ]
    for k, v in model.state_dict().items():
        assert torch.equal(got[0]["model"][k], got[1]["model"][k]), k
        torch.testing.assert_close(got[0]["model"][k], v, **TOL, msg=k)
    for name, moments in unit_state(opt).items():
        assert moments.keys() == got[0]["units"][name].keys()
        for key, v in moments.items():
            assert torch.equal(got[0]["units"][name][key], got[1]["units"][name][key]), (name, key)
            torch.testing.assert_close(got[0]["units"][name][key], v, **TOL, msg=f"{name} {key}")
    others = _other_state(opt, model)
    assert others and others.keys() == got[0]["others"].keys()
    for name, st in others.items():
        for key, v in st.items():
            torch.testing.assert_close(got[0]["others"][name][key], v, **TOL, msg=f"{name} {key}")
    assert got[0]["model"]["calls"] == STEPS_OF.get(kind, STEPS)  # buffers carried over


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_checkpoint_written_after_rank_changes_resumes_in_a_model_built_at_the_saved_ranks(fsdp_out):
    """The saved ranks from the checkpoint's metadata, resize_to_state_dict, then DCP's loading
    (here in one plain process): the weights and moments of the sharded run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = dcp.FileSystemReader(fsdp_out / "ckpt").read_metadata().state_dict_metadata
    model = _model()
    tlr.optim.resize_to_state_dict(
        model, {k: torch.empty(meta[f"model.{k}"].size) for k in ("0.S", "2.S", "4.S")}
    )
    opt = OPTS["adam"](model)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=fsdp_out / "ckpt")
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    got = torch.load(fsdp_out / f"{RUNS[0][0]}_{RUNS[0][1]}0.pt", weights_only=True)
    assert _ranks(model) == got["ranks"][-1] != _ranks(_model())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, got["model"][k], atol=0, rtol=0, msg=k)
    for name, moments in unit_state(opt).items():
        for key, v in moments.items():
            torch.testing.assert_close(v, got["units"][name][key], atol=0, rtol=0, msg=f"{name} {key}")


def test_what_the_re_shard_point_cannot_take_is_refused_with_what_to_do(fsdp_out):
    for r in range(2):
        no_flag, step, state, arch, unsharded, unchanged = (
            (fsdp_out / f"refusals{r}.txt").read_text().split("|")
        )
        assert "tau > 0" in no_flag and "reshard=True" in no_flag and "DistributedDataParallel" in no_flag
        for refused in (step, state):
            assert "reshard_after_rank_change" in refused and "['0'" in refused
        assert step.startswith("step() refused") and state.startswith("state_dict() refused")
        assert "same architecture" in arch
        assert "shard the rebuilt model as the original" in unsharded
        assert unchanged == "unchanged True"


def test_without_a_pending_rank_change_the_re_shard_point_returns_the_model():
    model = _model()
    opt = OPTS["adam"](model)
    assert tlr.optim.reshard_after_rank_change(model, opt, _model, lambda m: m) is model
    with pytest.raises(ValueError, match="LowRankSGD / LowRankAdam"):
        tlr.optim.reshard_after_rank_change(model, torch.optim.SGD(model.parameters(), lr=0.1), _model, None)
