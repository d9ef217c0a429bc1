#!/usr/bin/env bash
# Create (or reuse) ./.venv with CPU torch and everything the pack, its CLI and its tests need.
# Idempotent: a second run only checks that the install is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${QSCHED_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
stamp="$VENV/.qsched-installed"
want="$(cat constraints.txt requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# torch first: on CPU machines pip finds the local CPU wheel; the constraints file keeps every later
# resolve from replacing it with a CUDA build (several GB).
"$PIP" install -q --disable-pip-version-check torch==2.13.0
"$PIP" install -q --disable-pip-version-check -c constraints.txt -r requirements-dev.txt
# pyiqa (optional CLIP-IQA backend, non-commercial licence) without its heavy dev/data dependencies, so its
# backend is tested too; the pack itself never needs it.
"$PIP" install -q --disable-pip-version-check --no-deps pyiqa==0.1.16 openai-clip==1.0.1
"$PIP" install -q --disable-pip-version-check -c constraints.txt addict einops future opencv-python-headless \
    scikit-image scipy sentencepiece
"$PIP" install -q --disable-pip-version-check -c constraints.txt --no-deps --no-build-isolation -e .
# The only torchvision 0.28 wheel on some machines is the CUDA build; with CPU torch its C ops do not load and its
# fake-op registration then raises at import (open_clip imports torchvision). Same guard as setup_comfyui.sh.
if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  TV=$("$VENV/bin/python" -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("torchvision").origin))')
  sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$TV/_meta_registrations.py"
fi
"$VENV/bin/python" -c "import torchvision"
echo "$want" > "$stamp"
