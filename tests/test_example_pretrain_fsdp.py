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
