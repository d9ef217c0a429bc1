#!/usr/bin/env bash
# Install what tests/test_comfyui_browser.py needs to drive the real ComfyUI frontend in a headless browser:
# Chromium and its WebDriver from the OS packages (Debian/Ubuntu: chromium, chromium-driver), and selenium in the
# test venv. Playwright's bundled browser download is not used (it needs network access to a CDN).
#
#   scripts/setup_browser.sh [VENV_DIR]      # default .venv
#
# The test itself skips cleanly when COMFYUI_PATH, chromium or chromedriver is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${QSCHED_VENV:-.venv}}
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update
    $SUDO apt-get install -y chromium chromium-driver
  else
    echo "install Chromium and its chromedriver with your OS package manager" >&2
    exit 1
  fi
fi
"$VENV/bin/python" -m pip install "selenium>=4.20"
chromium --version
chromedriver --version
