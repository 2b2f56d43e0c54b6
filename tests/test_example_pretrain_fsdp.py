"""The FSDP2 example, as a user runs it: one process and torchrun with 2 processes (gloo on CPU)."""

import pytest

from example_runs import run_example

EXAMPLE = "pretrain_fsdp.py"
ARGS = ["--steps", "3", "--batch-size", "4", "--seq-len", "16", "--hidden", "32", "--intermediate", "64"]
ARGS += ["--rank", "4"]


def _run(out, nproc):
    pytest.importorskip("transformers")
    result, stdout = run_example(EXAMPLE, ARGS, out, nproc)
    assert stdout.count("loss") == 3  # printed once per step, by rank 0 only
    assert (out / "checkpoint" / ".metadata").is_file()
    return result


@pytest.mark.ddp
def test_fsdp_example_under_torchrun_trains_as_one_process_does(tmp_path):
    one = _run(tmp_path / "one", 1)
    two = _run(tmp_path / "two", 2)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["lowrank_layers"] == 14 and two["nonfinite_steps"] == 0  # 7 projections x 2 layers
    assert two["losses"][-1] < two["losses"][0]
    # the same global batches: the same run up to float32 rounding of the sums over processes
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= 1e-4


@pytest.mark.ddp
def test_fsdp_example_rank_adaptive_under_torchrun_trains_as_one_process_does(tmp_path):
    """--tau: the ranks change at step 2 and the loop calls the re-shard point (2 processes); the
    same ranks and, up to float32 rounding, the same losses as one process."""
    pytest.importorskip("transformers")
    adaptive = ARGS + ["--tau", "0.6", "--rank-every", "2"]
    one, _ = run_example(EXAMPLE, adaptive, tmp_path / "one", 1)
    two, stdout = run_example(EXAMPLE, adaptive, tmp_path / "two", 2)
    assert stdout.count("loss") == 3 and (tmp_path / "two" / "checkpoint" / ".metadata").is_file()
    assert two["rank_changes"] == one["rank_changes"] == 1
    assert two["ranks"] == one["ranks"] and max(two["ranks"]) < 4  # from rank 4
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= 1e-4
