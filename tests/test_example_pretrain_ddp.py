"""The rank-adaptive DDP example, as a user runs it: one process and torchrun with 2 processes."""

import pytest

from example_runs import run_example

EXAMPLE = "pretrain_lowrank_ddp.py"
ARGS = ["--steps", "40", "--train-size", "4000", "--test-size", "1000", "--lr", "1e-2", "--tau", "0.15"]


def _run(out, nproc):
    pytest.importorskip("safetensors")
    result, _ = run_example(EXAMPLE, ARGS, out, nproc)
    assert (out / "model.safetensors").is_file()
    return result


@pytest.mark.ddp
def test_rank_adaptive_example_under_torchrun_rewraps_ddp_and_matches_one_process(tmp_path):
    one = _run(tmp_path / "one", 1)
    two = _run(tmp_path / "two", 2)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert (
        two["rank_changes"] >= 1 and two["ddp_rewraps"] == two["rank_changes"]
    )  # re-wrapped after each change
    assert two["max_abs_weight_diff_between_ranks"] == 0.0  # the replicas never drift apart
    assert all(r < r0 for r, r0 in zip(two["final_ranks"], two["initial_ranks"]))
    # the same global batches: the same run up to float32 rounding of the gradient mean
    assert all(abs(a - b) <= 1 for a, b in zip(one["final_ranks"], two["final_ranks"]))
    assert abs(one["test_accuracy"] - two["test_accuracy"]) <= 0.02
    assert two["status"] == "ok" and two["test_accuracy"] > 0.6
