#!/usr/bin/env bash
# Set up ./.venv (if needed) and run the demo. Extra arguments go to `qsched demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV=${QSCHED_VENV:-.venv}
exec "$VENV/bin/qsched" demo "$@"
