#!/usr/bin/env bash
# Set up ./.venv (if needed) and run the test suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh || { echo "setup failed" >&2; exit 1; }
VENV=${QSCHED_VENV:-.venv}
"$VENV/bin/python" -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests (exit 5): treating as a failure" >&2
  exit 1
fi
exit $rc
