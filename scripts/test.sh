#!/usr/bin/env bash
# The whole test suite: sets up ./.venv (scripts/setup.sh) and a real ComfyUI 0.3.64 with its own venv
# (scripts/setup_comfyui.sh, from the source snapshot), then runs every test: the CPU suite, the real-ComfyUI
# integration and quantization suites, and the browser suite when Chromium and chromedriver are installed
# (scripts/setup_browser.sh; .ci/run installs them). Extra arguments go to pytest, e.g. `-m "not slow"`.
#
#   QSCHED_NO_COMFYUI=1   skip the ComfyUI set-up (the real-ComfyUI suites then skip, saying why)
#   COMFYUI_PATH / COMFYUI_PYTHON   use your own ComfyUI checkout and its interpreter instead
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh || { echo "setup failed" >&2; exit 1; }
VENV=${QSCHED_VENV:-.venv}
CACHE=${QSCHED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qsched}
if [ -z "${QSCHED_NO_COMFYUI:-}" ] && [ -z "${COMFYUI_PATH:-}" ]; then
  if ./scripts/setup_comfyui.sh "$CACHE/ComfyUI-0.3.64" "$CACHE/comfy-venv"; then
    export COMFYUI_PATH="$CACHE/ComfyUI-0.3.64" COMFYUI_PYTHON="$CACHE/comfy-venv/bin/python"
  elif [ -n "${QSCHED_REQUIRE_COMFYUI:-}" ]; then
    echo "ComfyUI set-up failed and QSCHED_REQUIRE_COMFYUI is set" >&2; exit 1
  else
    echo "ComfyUI set-up failed: the real-ComfyUI suites will skip" >&2
  fi
fi
# the tiny random models in ComfyUI's formats are built once (~45 s) and reused while their recipe is unchanged
recipe=$(sha256sum tests/data/build_tiny_comfy_models.py | cut -c1-12)
export QSCHED_TINY_MODELS=${QSCHED_TINY_MODELS:-$CACHE/tiny-comfy-models-$recipe}
"$VENV/bin/python" -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests (exit 5): treating as a failure" >&2
  exit 1
fi
exit $rc
