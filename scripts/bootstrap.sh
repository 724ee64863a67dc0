#!/usr/bin/env bash
# Create .venv/ at the repository root if missing and install ureid with the pinned dependencies
# (constraints.txt). Re-running is cheap: nothing is reinstalled unless pyproject.toml or
# constraints.txt changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "[ureid] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.ureid-install-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ -f "$stamp" ]; then
    echo "[ureid] pyproject.toml or constraints.txt changed since .venv/ was installed: installing again"
  else
    echo "[ureid] installing pinned dependencies (first time: about 2-3 minutes, 6.5 GB)"
  fi
  .venv/bin/python -m pip install -q --upgrade "pip>=24"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi
