#!/usr/bin/env bash
# Run every method's CPU preset on the synthetic default into one MLflow store, then compare them
# (tables, per-stage plots and label-free score rankings under OUT, default runs/comparison).
# About 30 minutes on a 2-core machine (plus 12 the first time, for camstyle's StarGAN). Usage: bash scripts/compare_methods.sh [OUT_DIR] [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Ray 2.60 keeps its token auth on for the local instance (its default; the token is made private first,
# see ureid.runtime.job.private_local_token). RAY_AUTH_MODE=disabled opts out.
out=${1:-runs/comparison}
runs=${2:-runs}
experiment=${UREID_EXPERIMENT:-ureid-compare}
methods=${UREID_METHODS:-buc camstyle dbc pul ssl cluster_contrast}
for method in $methods; do
  echo "== $method"
  # camstyle's preset trains its StarGAN (stargan_cpu.yaml, about 12 minutes) the first time, then reuses it
  # from data/synthetic/camstyle_stargan/<key>/ with its fakes
  .venv/bin/python "experiments/$method.py" --set "output_dir=$runs" --set "tracking.experiment=$experiment"
done
.venv/bin/ureid compare --tracking-uri "sqlite:///$(realpath "$runs")/mlflow.db" --experiment "$experiment" --out "$out"
