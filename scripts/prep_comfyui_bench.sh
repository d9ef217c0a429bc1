#!/usr/bin/env bash
# Prepare (here, on the CPU machine) what scripts/device_comfyui_bench.sh needs on the device, in the ignored folder
# .dev-comfy/ of the checkout the device tool sends (run from that checkout's root, e.g. /work/main):
#   .dev-comfy/src/  a trimmed copy of ComfyUI's source: the Python files of comfy/ and comfy_api/ (+ their small
#                    json configs, no tokenizer vocabularies, tests, frontend or server) and the few top-level modules
#                    comfy.sd / comfy.sample / comfy_api.torch_helpers import; ComfyUI's LICENSE beside them.
#   .dev-comfy/whl/  py3.12 wheels of what that import chain needs and the device image lacks (torchsde, trampoline),
#                    and sageattention (Triton-only; ComfyUI registers its "sage" attention when it imports).
# The folder must be git-ignored (main's .git/info/exclude has /.dev-*/) and stays out of every commit.
#   scripts/prep_comfyui_bench.sh [COMFY_DIR=/work/comfy]
set -euo pipefail
COMFY=${1:-/work/comfy}
[ -f "$COMFY/comfy/sd.py" ] || { echo "COMFY_DIR $COMFY: no comfy/sd.py (a ComfyUI 0.3.64 checkout)"; exit 2; }
git check-ignore -q .dev-comfy/x || { echo ".dev-comfy/ is not git-ignored here: add /.dev-*/ to .git/info/exclude"; exit 2; }
rm -rf .dev-comfy/src && mkdir -p .dev-comfy/src .dev-comfy/whl
(cd "$COMFY" && find comfy comfy_api -path '*/__pycache__' -prune -o -type f \( -name '*.py' -o \( -name '*.json' \
    -size -100k \) \) -print0 | tar --null -T - -cf -) | tar -xf - -C .dev-comfy/src
cp "$COMFY"/{folder_paths.py,node_helpers.py,comfyui_version.py,LICENSE} .dev-comfy/src/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .dev-comfy/whl \
    torchsde==0.2.6 trampoline==0.1.2 sageattention==1.0.6
du -sh .dev-comfy/src .dev-comfy/whl
echo "transfer (tracked files + .dev-comfy): $(( ( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) \
    + $(du -sb .dev-comfy | cut -f1) ) / 1048576 )) MiB (limit 64)"
