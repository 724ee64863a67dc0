#!/usr/bin/env bash
# Install (if needed) and run the main job: BUC on the synthetic default dataset, CPU preset.
# Extra arguments go to experiments/buc.py (e.g. --set clustering.size_penalty=0.003).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Ray 2.60 keeps its token auth on for the local instance (its default; the token is made private first,
# see ureid.runtime.job.private_local_token). RAY_AUTH_MODE=disabled opts out.
exec .venv/bin/python experiments/buc.py "$@"
