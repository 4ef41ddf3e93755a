#!/usr/bin/env bash
# Fetches, on a machine with PyPI, the wheels that experiments/run_gpu.sh installs on the GPU
# machine (Python 3.12, no network): what ssd_jax imports beyond the jax, flax, optax, orbax,
# numpy, torch and torchvision already there. About 30 MB, under the 64 MiB a run may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf build/gpu_wheels
pip download --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d build/gpu_wheels grain simplejpeg tqdm matplotlib pytest hypothesis
# pytest and hypothesis run a smoke test of the box functions under the machine's jax.
# numpy and Pillow are on the GPU machine already (jax, torchvision); leave them out.
rm -f build/gpu_wheels/numpy-*.whl build/gpu_wheels/pillow-*.whl
du -sh build/gpu_wheels
