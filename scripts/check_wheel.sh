#!/usr/bin/env bash
# ureid works installed, without the checkout: build a wheel, install it (non-editable, --no-deps) into a
# scratch venv that borrows .venv's dependencies but not its editable ureid, then run one BUC stage
# with the `ureid` command from a folder outside the checkout. Called by .ci/run after the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -m venv --without-pip "$scratch/venv"
site=$("$scratch/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
deps=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# A plain path entry: .venv's own .pth files (the editable install of this checkout) are not read.
echo "$deps" > "$site/ureid-deps.pth"
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$scratch/dist" "$repo"
.venv/bin/python -m pip --python "$scratch/venv/bin/python" install -q --no-deps --no-compile "$scratch"/dist/ureid-*.whl
mkdir "$scratch/work"
cd "$scratch/work"
export RAY_AUTH_MODE=disabled
"$scratch/venv/bin/python" - "$repo" <<'PY'
import sys
import ureid, ureid.config
repo = sys.argv[1]
checkout = [p for p in sys.path if (p == repo or p.startswith(repo + "/")) and not p.startswith(repo + "/.venv/")]
assert not checkout, f"the checkout is on sys.path: {checkout}"
assert not ureid.__file__.startswith(repo) and (ureid.config.CONFIG_DIR / "buc_cpu.yaml").is_file(), ureid.__file__
print(f"[check_wheel] ureid {ureid.__version__} from {ureid.__file__}, configs from the package")
PY
# One epoch of one stage: what is checked is that the installed package finds its configs and data and
# runs (the preset's numbers are the test suite's and the README's business); 10 epochs cost 80 s more.
# A small synthetic set (40 training identities, generated here as the default is): the default adds ~40 s.
"$scratch/venv/bin/ureid" run buc --set schedule.max_stages=1 --set train.first_stage_epochs=1 \
    --set data.root=data/small --set data.synthetic.num_train_ids=40 --set data.synthetic.num_test_ids=20 \
    --set data.synthetic.num_distractors=50 2>&1 | tee run.log
# A clean run prints no error line of Ray's own (e.g. the PreemptionWatcher's, before job_env turned it off).
if grep -E "[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:,]+ E [0-9]+ [0-9]+\]" run.log; then
    echo "[check_wheel] failed: the run above printed a Ray error line" >&2
    exit 1
fi
test -f "$(ls -d runs/buc-*/ | head -1)summary.json"
echo "[check_wheel] ok: one BUC stage from the installed wheel in $scratch/work"
