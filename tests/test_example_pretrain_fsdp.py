"""The FSDP2 example, as a user runs it: one process and torchrun with 2 processes (gloo on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pretrain_fsdp.py"
ARGS = ["--steps", "3", "--batch-size", "4", "--seq-len", "16", "--hidden", "32", "--intermediate", "64"]
ARGS += ["--rank", "4"]


def _run(out, nproc):
    pytest.importorskip("transformers")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "TLR_PROGRESS": "0"}
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    r = subprocess.run(
        [sys.executable, *launch, str(EXAMPLE), *ARGS, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert r.stdout.count("loss") == 3  # printed once per step, by rank 0 only
    assert (out / "checkpoint" / ".metadata").is_file()
    return json.loads((out / "result.json").read_text())


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
