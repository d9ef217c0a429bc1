#!/usr/bin/env bash
# The shape world's GPU run (docs/shape_world.md): train every part (in parallel processes, each for its share of
# train.GPU_SECONDS; the flow teacher first, then the LCM/TCD students), assemble the weight files, run the
# experiment (one worker per family x format), merge. The shipped weights came from two calls of this pipeline's
# parts (flow/clip/ref in the first, the students in the second): docs/shape_world.md.
# Writes into $OUT: weights/shapeworld.safetensors, weights/shapeworld_clip.safetensors, results.json, table.md, logs.
# Wheels (open_clip_torch, ftfy, wcwidth) travel in .whl/shapeworld; see scripts/device_gpu_tests.sh for how.
# The experiment alone with the shipped weights (all families, the full grid, point batching, deadlines):
# scripts/shapeworld_gpu_experiment.sh.
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/shapeworld-out}
W=/tmp/sw-parts; E=/tmp/sw-exp
mkdir -p /tmp/site /tmp/pp "$OUT/weights" "$W" "$E"
if [ -d .whl/shapeworld ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/shapeworld/*.whl
fi
ln -sfn "$PWD" /tmp/pp/qsched_pack
export PYTHONPATH=/tmp/site:/tmp/pp PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
M="python3 -m qsched_pack.calibration.shapeworld"
nvidia-smi -L
# training length: --timed (GPU_SECONDS per part), or the step counts of an earlier run (reproduce), or --reduced
if [ -n "${SHAPEWORLD_STEPS_FROM:-}" ]; then TIMED="--steps-from $SHAPEWORLD_STEPS_FROM"
elif [ -n "${SHAPEWORLD_REDUCED:-}" ]; then TIMED="--reduced"
else TIMED="--timed"; fi
# the flow model is the teacher: the LCM and TCD students start once it is written
{
  ( $M.train --out $W --parts flow $TIMED > $W/flow.log 2>&1 &&
    { $M.train --out $W --parts lcm $TIMED > $W/lcm.log 2>&1 &
      $M.train --out $W --parts tcd $TIMED > $W/tcd.log 2>&1 & wait; } ) &
  $M.train --out $W --parts clip $TIMED > $W/clip.log 2>&1 &
  $M.train --out $W --parts ref $TIMED > $W/ref.log 2>&1 &
  wait
}
cat $W/*.log > "$OUT/train.log"; cat $W/*.steps.json >> "$OUT/train.log"
python3 -c "
from qsched_pack.calibration.shapeworld.world import assemble
from qsched_pack.calibration.shapeworld.train import FULL, GPU_SECONDS
print(assemble('$W', '$OUT/weights', dict(FULL, seconds=GPU_SECONDS)))" >> "$OUT/train.log" 2>&1 || exit 1
echo "training done at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/train.log"
EXP_SECONDS=${EXP_SECONDS:-160}
DEADLINE=$(( $(date +%s) + EXP_SECONDS - 40 ))
for fam in lcm tcd flow; do
  for fmt in w8a8 w4a8 w4a4; do
    fp=--no-fp; [ $fmt = w8a8 ] && fp=
    timeout $EXP_SECONDS $M.experiment --out $E --families $fam --formats $fmt $fp --weights "$OUT/weights" \
      --deadline $DEADLINE --name $fam-$fmt ${EXP_ARGS:-} > $E/$fam-$fmt.log 2>&1 &
  done
done
wait
cat $E/*.log > "$OUT/exp.log"
$M.experiment --out "$OUT" --merge $E/*.json >> "$OUT/exp.log" 2>&1
echo "all done at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/exp.log"
