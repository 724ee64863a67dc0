#!/usr/bin/env bash
# Install (if needed) and run the whole test suite. pytest's exit code is returned as is, so a
# run that collected no test (exit 5) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Ray 2.60 turns token auth on for clusters it starts; the tests' local clusters run without it.
export RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest "$@"
