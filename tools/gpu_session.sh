#!/usr/bin/env bash
# Every GPU check in one go, for a CUDA machine borrowed for a few minutes: the GPU tests, a
# time-boxed launch-config sweep for this GPU, then the peer benchmark on the tuned configs.
#
#   OUT=gpu-out tools/gpu_session.sh [tuning budget in seconds, default 160]
#
# Runs with the machine's own python3 (PyTorch + Triton), this checkout on PYTHONPATH: no
# install. Each step's log, kernels/tuning.json and the benchmark's json and figure land in
# $OUT; a step that fails does not stop the next. Commit the tuning entry and
# reports/bench_gpu.json (+ figure) afterwards.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${1:-160}

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: rc=$rc in $(($(date +%s) - start)) s"
    tail -n 12 "$OUT/$name.log"
}

step env 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    '"$PY"' -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"'
step tests 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_pack.py
step tune $((BUDGET + 150)) "$PY" -m ptqflow.kernels.tune --budget-s "$BUDGET"
cp kernels/tuning.json "$OUT/"
step bench 300 "$PY" -c '
import yaml
from ptqflow.pipeline.bench_gpu import run
cfg = yaml.safe_load(open("params.yaml"))
cfg["model"]["device"] = "cuda"
run(cfg)'
cp reports/bench_gpu.json reports/figures/bench_gpu.png "$OUT/" 2>/dev/null
