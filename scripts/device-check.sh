#!/usr/bin/env bash
# The GPU check of a session lent the device machine, as one command (see CONTRIBUTING.md):
# the CUDA tests, then the GPU benchmarks, logs and result files under $OUT.
#   run(command="bash scripts/device-check.sh", carry=[".whl"], timeout_s=540)
# .whl holds the wheels the device image lacks (galore-torch for the side-by-side benchmark),
# downloaded here with the device README's `pip download` line.
set -uo pipefail
OUT=${OUT:-/tmp/tlr-device}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD/tests:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs \
    tests/test_devices.py tests/test_optim_geometric.py tests/test_optim_galore.py tests/test_layers.py \
    -k "cuda or host or device" 2>&1 | tee "$OUT/cuda-tests.log"
timeout 300 python3 benchmarks/run.py optim layers --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
cp "$OUT"/bench/*.json "$OUT/" 2>/dev/null || true
