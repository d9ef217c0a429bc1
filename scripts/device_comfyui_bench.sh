#!/usr/bin/env bash
# The real-ComfyUI GPU benchmark in one device call per part; what runs ON the device.
# Here, once, in the root of the checkout the device tool sends: scripts/prep_comfyui_bench.sh (fills .dev-comfy/).
# Then: run(command="scripts/device_comfyui_bench.sh A", carry=[".dev-comfy"], timeout_s=600), the same with B.
#   A: FLUX (file write ~40 s; eager core bf16 / w8a8-fp8 / w4a8-fp8, compiled + CUDA graph of those three, then
#      eager core fp8_fast / w4a8 / w8a8 as time allows). B: SDXL (every format eager, compiled, fast path).
# Writes $OUT/comfyui_h200_part<PART>.json (saved after every stage: a call cut short keeps what it measured),
# $OUT/bench_part<PART>.log and $OUT/env_part<PART>.txt. KERNELS (optional): arguments of
# benchmarks/bench_kernels_gpu.py, run first in the same environment (log: $OUT/kernels_part<PART>.log). BUDGET_S (default 540) = the benchmark's own time budget;
# a config starts only if its estimate fits. Extra arguments go to bench_comfyui_gpu.py; PART "only" takes the list
# from them: device_comfyui_bench.sh only --only sdxl/w8a8/compiled,flux/w4a8-fp8/eager
# PART "families": benchmarks/bench_families_gpu.py instead (Qwen-Image, SD3.5 Large, Wan 2.2 5B, Chroma, Wan A14B on
# a simulated 24 GiB card; BUDGET_S default 520; extra arguments go to it, e.g. --only wan5b,chroma --compile chroma);
# writes $OUT/families_gpu.json and $OUT/bench_families.log.
set -uo pipefail
PART=${1:?usage: device_comfyui_bench.sh A|B|only|families [bench args]}
shift
OUT=${OUT:-/tmp/qsb_out}
T=${QSB_TMP:-/tmp}   # scratch: wheels' site dir, the package link, the model files (FLUX ~24 GB)
mkdir -p "$OUT" "$T/site" "$T/pp" "$T/qsb"
[ -d .dev-comfy/src/comfy ] || { echo "no .dev-comfy/src: run scripts/prep_comfyui_bench.sh here and carry .dev-comfy"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$T/site" .dev-comfy/whl/*.whl \
    || exit 3
ln -sfn "$PWD" "$T/pp/qsched_pack"   # the repo root is the package qsched_pack
export PYTHONPATH="$T/site:$T/pp" PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  python3 -m pip list 2>/dev/null | grep -i -E '^(transformers|torchaudio|torchvision|safetensors) '; df -h /tmp; } \
    > "$OUT/env_part$PART.txt" 2>&1
cat "$OUT/env_part$PART.txt"
if [ -n "${KERNELS:-}" ]; then   # kernel micro-benchmarks first, e.g. KERNELS="--sections attention,onepass --name X"
    # shellcheck disable=SC2086
    python3 benchmarks/bench_kernels_gpu.py --out "$OUT" $KERNELS 2>&1 | tee "$OUT/kernels_part$PART.log"
fi
if [ "$PART" = families ]; then
    python3 benchmarks/bench_families_gpu.py --comfy .dev-comfy/src --out "$OUT" --budget-s "${BUDGET_S:-520}" "$@" \
        2>&1 | tee "$OUT/bench_families.log"
    exit "${PIPESTATUS[0]}"
fi
PARTARG=(--part "$PART"); [ "$PART" = only ] && PARTARG=()   # "only": the list comes in --only KEY,...
python3 benchmarks/bench_comfyui_gpu.py --comfy .dev-comfy/src --work "$T/qsb" --out "$OUT" "${PARTARG[@]}" \
    --budget-s "${BUDGET_S:-540}" "$@" 2>&1 | tee "$OUT/bench_part$PART.log"
rc=${PIPESTATUS[0]}
rm -rf "$T/qsb"   # model files (FLUX ~24 GB): the next call may find the same machine
exit "$rc"
