#!/usr/bin/env bash
# Set up a ComfyUI checkout + its own venv (CPU torch) so the real-ComfyUI suites can run
# (tests/test_comfyui_integration.py, tests/test_comfyui_quant.py, tests/test_comfyui_browser.py):
#
#   scripts/setup_comfyui.sh [COMFY_DIR] [VENV_DIR]
#   COMFYUI_PATH=COMFY_DIR COMFYUI_PYTHON=VENV_DIR/bin/python .venv/bin/python -m pytest -m comfyui
#
# scripts/test.sh calls it (defaults below) and sets those variables itself.
# Source of ComfyUI, first found:
#  1. an existing checkout in COMFY_DIR (then nothing is extracted);
#  2. the ComfyUI 0.3.64 source snapshot (QSCHED_COMFYUI_SNAPSHOT, default: ComfyUI-0.3.64-*.tar.gz in
#     ../shared/comfyui/ beside this checkout; every development machine and CI has it);
#  3. a git dir of Comfy-Org/ComfyUI (COMFYUI_GIT_DIR, default: the `fetch` mirror), at COMFYUI_REF (default: the
#     0.3.64 commit, not the newest: newer cores need what this machine lacks).
# Known problems it works around on CPU-only Linux with torch 2.13 (docs/comfyui.md, "Integration test"):
#  - the snapshot lacks one tokenizer file (comfy/text_encoders/llama_tokenizer/tokenizer.json; only the Llama-based
#    text encoders need it; the git mirror lacks the same blob: excluded from the archive);
#  - the only torchvision wheel for torch 2.13 is a CUDA build whose import fails on a CPU torch
#    ("operator torchvision::nms does not exist"): its two fake-kernel registrations are guarded (sed);
#  - ComfyUI imports `requests` but does not list it;
#  - torchaudio has no working wheel for CPU torch 2.13: left out (audio nodes show IMPORT FAILED; harmless).
# Idempotent: a second run only re-checks that ComfyUI's server modules import.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
CACHE=${QSCHED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qsched}
COMFY_DIR=${1:-${COMFYUI_PATH:-$CACHE/ComfyUI-0.3.64}}
VENV=${2:-${COMFYUI_VENV:-$CACHE/comfy-venv}}
GIT_DIR=${COMFYUI_GIT_DIR:-/work/.mirror/Comfy-Org+ComfyUI/repo}
REF=${COMFYUI_REF:-a125cd84b054a57729b5eecab930ca9408719832}  # ComfyUI 0.3.64, the version the suites are written for
PY=${PYTHON:-python3}
TORCH=${COMFYUI_TORCH:-torch==2.13.0}
TORCHVISION=${COMFYUI_TORCHVISION:-torchvision==0.28.0}
SNAPSHOT=${QSCHED_COMFYUI_SNAPSHOT:-$(ls "$HERE"/../shared/comfyui/ComfyUI-0.3.64-*.tar.gz 2>/dev/null | head -n1 || true)}

if [ ! -f "$COMFY_DIR/main.py" ]; then
  mkdir -p "$COMFY_DIR"
  if [ -n "$SNAPSHOT" ] && [ -f "$SNAPSHOT" ]; then
    # the archive holds one top folder (ComfyUI/): strip it so COMFY_DIR is the checkout itself
    tar -xzf "$SNAPSHOT" -C "$COMFY_DIR" --strip-components=1
  elif [ -d "$GIT_DIR" ]; then
    # git prints "error: invalid object" for the excluded blob's tree entry on some mirrors; rc is what counts.
    git -C "$GIT_DIR" archive "$REF" -- . ':(exclude)comfy/text_encoders/llama_tokenizer/tokenizer.json' \
      | tar -x -C "$COMFY_DIR"
  else
    echo "no ComfyUI in $COMFY_DIR, no snapshot (../shared/comfyui/ComfyUI-0.3.64-*.tar.gz or" \
         "QSCHED_COMFYUI_SNAPSHOT) and no git dir $GIT_DIR (COMFYUI_GIT_DIR)" >&2
    exit 1
  fi
  [ -f "$COMFY_DIR/main.py" ] || { echo "extracting ComfyUI into $COMFY_DIR failed" >&2; exit 1; }
fi

stamp="$VENV/.qsched-comfy-installed"
want="$(cat "$COMFY_DIR/requirements.txt" "$HERE/requirements.txt" "$HERE/scripts/setup_comfyui.sh" | sha256sum | cut -d' ' -f1) $TORCH $TORCHVISION"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  "$VENV/bin/python" -c "import sys; sys.path.insert(0, '$COMFY_DIR'); import torchvision, requests, aiohttp" \
    && { echo "ComfyUI ready: $COMFY_DIR (python: $VENV/bin/python)"; exit 0; }
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --disable-pip-version-check "$TORCH"
echo "$TORCH" > "$VENV/constraints.txt"
grep -vE '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$COMFY_DIR/requirements.txt" > "$VENV/req-nontorch.txt"
# The pack's own runtime requirements go into the same venv (ComfyUI users do `pip install -r requirements.txt`).
PACK_REQ="$HERE/requirements.txt"
"$PIP" install -q --disable-pip-version-check -c "$VENV/constraints.txt" -r "$VENV/req-nontorch.txt" \
  -r "$PACK_REQ" "open_clip_torch>=2.24" matplotlib "comfy-kitchen==0.2.40" requests "$TORCHVISION"  # + the extras the tests exercise
TV=$("$VENV/bin/python" -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("torchvision").origin))')
if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$TV/_meta_registrations.py"
fi
"$VENV/bin/python" -c "import torchvision, requests, aiohttp"
echo "$want" > "$stamp"
echo "ComfyUI ready: $COMFY_DIR (python: $VENV/bin/python)"
