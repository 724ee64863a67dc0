#!/usr/bin/env bash
# Install (if needed) and run the main job: BUC on the synthetic default dataset, CPU preset.
# Extra arguments go to experiments/buc.py (e.g. --set clustering.size_penalty=0.003).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec .venv/bin/python experiments/buc.py "$@"
