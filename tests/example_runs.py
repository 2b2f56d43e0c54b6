"""Run a script of examples/ as a user does: ``python script.py ...`` or ``torchrun`` with N processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, args: list[str], out: Path, nproc: int = 1) -> tuple[dict, str]:
    """Run ``examples/<script>`` with ``args + --out out`` on ``nproc`` processes (torchrun for > 1).

    Returns (the ``result.json`` it wrote, its stdout); fails the test with the output's tail if it
    exits non-zero. One thread per process: the CI machine has two cores.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "TLR_PROGRESS": "0"}
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    r = subprocess.run(
        [sys.executable, *launch, str(ROOT / "examples" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads((Path(out) / "result.json").read_text()), r.stdout
