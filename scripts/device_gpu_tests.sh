#!/usr/bin/env bash
# Run the GPU-marked tests (and the core parity tests) on the lent GPU machine, which has torch/triton/transformers
# but no diffusers, bitsandbytes, open_clip or hypothesis and no network. Wheels travel in .whl/ (git-ignored).
#
# Here, once (python 3.12 wheels for the device):
#   d="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform any"
#   $d -d .whl/quant diffusers==0.42.1 bitsandbytes==0.50.2 importlib_metadata
#   $d -d .whl/extra open_clip_torch==3.3.0 ftfy regex wcwidth tqdm hypothesis==6.155.7 sortedcontainers attrs \
#      pytest pluggy iniconfig packaging
# Then with the device tool: run(command="scripts/device_gpu_tests.sh", carry=[".whl/quant", ".whl/extra"])
set -euo pipefail
mkdir -p /tmp/site /tmp/pp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/quant/*.whl \
    .whl/extra/*.whl
ln -sfn "$PWD" /tmp/pp/qsched_pack   # the repo root is the package qsched_pack
export PYTHONPATH=/tmp/site:/tmp/pp PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pytest -q -p no:cacheprovider -rs tests/test_quant_gpu.py tests/test_jaq.py tests/test_samplers.py \
    tests/test_schedules.py tests/test_coefficients.py tests/test_ptqd.py tests/test_diffusers_wrapper.py \
    tests/test_denoisers.py tests/test_quant.py tests/test_quant_fp8w4.py tests/test_cudagraph.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_tests.log"
