#!/usr/bin/env bash
# The whole GPU benchmark (issue 14) in one command on the GPU machine, from the repository
# root, with build/gpu_wheels carried (experiments/gpu_wheels.sh):
#     bash experiments/run_gpu.sh "$OUT"
# Installs the carried wheels where the packages are missing (no index, no network), then
# runs experiments.bench_gpu without installing the project (the machine's jax stays).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: run_gpu.sh OUT [bench_gpu options, e.g. --tiny]}; shift
python -c "import grain, simplejpeg, tqdm, matplotlib, pytest, hypothesis" 2>/dev/null ||
    pip install -q --no-index --find-links build/gpu_wheels grain simplejpeg tqdm matplotlib pytest hypothesis
mkdir -p "$out"
# The box functions' and model's tests under this machine's jax (setup.cfg's pins name only
# the versions tested): a minute, before the benchmark.
PYTHONPATH=$PWD timeout 300 python -m pytest -q -x -p no:cacheprovider tests/test_boxes.py \
    tests/test_encoding.py tests/test_matching.py tests/test_nms.py tests/test_loss.py \
    tests/test_model.py > "$out/tests.log" 2>&1 || echo "tests failed or timed out: $out/tests.log"
tail -1 "$out/tests.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" || true
PYTHONPATH=$PWD python -m experiments.bench_gpu --out "$out" "$@" 2>&1 | tee "$out/bench_gpu.log"
