#!/usr/bin/env bash
# The shape world's experiment in one GPU call, with the shipped weights (no training; docs/shape_world.md):
# LCM, TCD and flow x W8A8/W4A8/W4A4 x 2/4/8 steps x 3 seeds, 20 images per prompt: FP, FP + Q-Sched, naive, PTQD,
# Q-Sched zoom with its three guards (+accept, +heldout, +trust) and Algorithm 1's full grid (qsched-grid), every
# search evaluating many points per network call (world.PointBatched; the same images up to float error).
#
# One worker process per family x format x step group (groups "2,4" and "8" by default: 18 workers sharing the
# GPU; the W8A8 workers also compute the FP rows). Every worker gets a deadline (SW_SECONDS - SW_MARGIN after the
# start): settings not started by then are skipped and a running grid search stops there; at SW_SECONDS the
# workers are killed. Whatever they saved is merged: results.json lists what is missing (config.missing: settings
# without rows; config.grid_skipped: grid searches without a row).
#
# Writes into $OUT (at most 6 files): results.json, table.md, workers.log (every worker's log), gpu.log (nvidia-smi
# every 10 s), run.log (this script's log with timings) and, when >= 45 s are left after the merge, bench_gpu.md
# (benchmarks/bench_shapeworld_batch.py on the idle GPU: a 2-step grid one point at a time vs batched).
# Device call:  run(command="scripts/shapeworld_gpu_experiment.sh", carry=[".whl/extra"], timeout_s=420)
# SW_BENCH=0 skips the batch benchmark. The reference-anchored methods (--reference, default all four) run with
# the others; the reference-objective run: SW_ARGS="--strategies zoom --guards --no-fp-search" (docs/shape_world.md)
# CPU dry run:  SW_DEVICE=cpu SW_STEP_GROUPS=2 SW_FORMATS="w8a8 w4a4" SW_ARGS="--seeds 0 --per-prompt 2 --points 5" \
#               PYTHON=/work/main/.venv/bin/python OUT=/tmp/sw-dry scripts/shapeworld_gpu_experiment.sh
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/shapeworld-exp}
PY=${PYTHON:-python3}
SECONDS_LIMIT=${SW_SECONDS:-355}
MARGIN=${SW_MARGIN:-35}
FAMILIES=${SW_FAMILIES:-lcm tcd flow}
FORMATS=${SW_FORMATS:-w8a8 w4a8 w4a4}
STEP_GROUPS=${SW_STEP_GROUPS:-2,4 8}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sw-exp.XXXXXX")
mkdir -p "$OUT" "$WORK/parts" "$WORK/site" "$WORK/pp"
LOG="$OUT/run.log"
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }

if [ -d .whl/extra ]; then  # the wheels the device lacks (it has torch, safetensors, tqdm, numpy)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
    .whl/extra/open_clip_torch-*.whl .whl/extra/ftfy-*.whl .whl/extra/wcwidth-*.whl .whl/extra/regex-*.whl \
    >> "$LOG" 2>&1 || { say "pip install failed"; exit 1; }
  "$PY" -c "import tqdm" 2>/dev/null || "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target "$WORK/site" .whl/extra/tqdm-*.whl >> "$LOG" 2>&1
fi
ln -sfn "$PWD" "$WORK/pp/qsched_pack"  # the repository root is the package qsched_pack
export PYTHONPATH="$WORK/site:$WORK/pp" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
say "wheels installed; $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no GPU')"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 > "$OUT/gpu.log" 2>&1 &
  SMI=$!
fi

DEADLINE=$(( T0 + SECONDS_LIMIT - MARGIN ))
DEV=${SW_DEVICE:+--device $SW_DEVICE}
pids=()
for fam in $FAMILIES; do
  for fmt in $FORMATS; do
    for group in $STEP_GROUPS; do
      fp=--no-fp; [ "$fmt" = "$(echo $FORMATS | cut -d' ' -f1)" ] && fp=
      name="$fam-$fmt-s${group//,/-}"
      left=$(( T0 + SECONDS_LIMIT - $(date +%s) ))
      timeout -k 5 "$left" "$PY" -m qsched_pack.calibration.shapeworld.experiment --out "$WORK/parts" \
        --families "$fam" --formats "$fmt" $fp --steps ${group//,/ } --deadline "$DEADLINE" --name "$name" \
        $DEV ${SW_ARGS:-} > "$WORK/parts/$name.log" 2>&1 &
      pids+=($!)
    done
  done
done
say "${#pids[@]} workers started (deadline +$(( DEADLINE - T0 )) s, hard limit +$SECONDS_LIMIT s)"
for p in "${pids[@]}"; do wait "$p" || say "a worker ended with status $? (killed at the limit: 124/137)"; done
say "workers done"
for f in "$WORK"/parts/*.log; do echo "=== $(basename "$f")"; cat "$f"; done > "$OUT/workers.log"
if ls "$WORK"/parts/*.json > /dev/null 2>&1; then
  "$PY" -m qsched_pack.calibration.shapeworld.experiment --out "$OUT" --merge "$WORK"/parts/*.json \
    > /dev/null 2>> "$LOG" || say "merge failed"
  "$PY" -c "
import json, sys
r = json.load(open(sys.argv[1]))
c = r['config']
print(f\"rows {len(r['rows'])}; settings done {len(r['done'])}/{len(r['plan'])}; grids done \"
      f\"{len(r['grid_done'])}/{len(r['grid_plan'])}; slowest worker {r['seconds']:.0f} s\")
g = [x['search_seconds'] for x in r['rows'] if x['method'] == 'qsched-grid']
if g:
    print(f'grid search seconds: min {min(g):.1f} mean {sum(g) / len(g):.1f} max {max(g):.1f}')
" "$OUT/results.json" 2>&1 | tee -a "$LOG"
else
  say "no worker saved a result"
fi
left=$(( T0 + SECONDS_LIMIT - $(date +%s) ))
if [ -z "${SW_DEVICE:-}" ] && [ "${SW_BENCH:-1}" = 1 ] && [ "$left" -ge 45 ]; then  # time to spare: the speed-up measured on this GPU, alone
  say "batch benchmark (${left} s left)"
  timeout -k 5 "$left" "$PY" benchmarks/bench_shapeworld_batch.py --device cuda --points 21 --families flow tcd \
    --batch 1280 --out "$OUT/bench_gpu.md" > /dev/null 2>> "$LOG" || say "batch benchmark stopped (status $?)"
fi
[ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null
rm -rf "$WORK"
say "all done"
