#!/usr/bin/env bash
# Regenerates the README's screenshots (docs/img/*.png) and the templates' thumbnails (workflows/*.jpg) by running
# the browser suite with QSCHED_UPDATE_SCREENSHOTS=1 (a normal test run writes them to a temporary folder only).
#
#   COMFYUI_PATH=/work/comfy COMFYUI_PYTHON=/work/comfy-venv/bin/python QSCHED_TINY_MODELS=/tmp/qs_models \
#       scripts/update_screenshots.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${QSCHED_PYTHON:-.venv/bin/python}
QSCHED_UPDATE_SCREENSHOTS=1 "$PY" -m pytest -m comfyui tests/test_comfyui_browser.py "$@"
