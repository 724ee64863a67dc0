"""`ray job submit --working-dir . -- python experiments/sweep.py buc ...` against a local `ray start --head`
cluster with token auth: the sweep runs end to end, and a client without the token is refused.

Slow, and it starts a Ray head of its own: run it alone (two Ray instances on one machine confuse Train's
placement-group cleaner), ``scripts/test.sh -m slow tests/test_job_submit.py``. The head is started with
``--block`` and ended by its PID, never with ``ray stop``."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_SYNTH, _free_port
from ureid.runtime.tasks import SLOT

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_sweep_through_ray_job_submit_with_token_auth(tiny_root, tmp_path):
    venv_bin = str(Path(sys.executable).parent)
    token = secrets.token_hex(32)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    port, dash = _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="ureid-ray-", dir="/tmp")
    head = subprocess.Popen(
        [f"{venv_bin}/ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         f"--resources={json.dumps({SLOT: 2})}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--include-dashboard=true", f"--temp-dir={ray_tmp}"],  # short: Ray's socket paths must fit 107 bytes
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while subprocess.run([f"{venv_bin}/ray", "job", "list", f"--address={address}"], env=env,
                             capture_output=True).returncode != 0:
            assert time.time() < deadline and head.poll() is None, (tmp_path / "head.log").read_text()
            time.sleep(2)
        anonymous = {**env, "RAY_AUTH_MODE": "disabled"}
        anonymous.pop("RAY_AUTH_TOKEN")
        refused = subprocess.run([f"{venv_bin}/ray", "job", "list", f"--address={address}"], env=anonymous,
                                 capture_output=True, text=True)
        assert refused.returncode != 0, "a client without the token must be refused"
        wrong = subprocess.run([f"{venv_bin}/ray", "job", "list", f"--address={address}"],
                               env={**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}, capture_output=True, text=True)
        assert wrong.returncode != 0, "a client with another token must be refused"

        out = tmp_path / "out"
        sets = [f"data.root={tiny_root}", "data.height=32", "data.width=16", "model.embedding_dim=32",
                "train.batch_size=8", "train.eval_batch_size=32", "train.first_stage_epochs=1",
                "train.stage_epochs=1", "train.max_batches_per_epoch=2", "ray.num_workers=1",
                "ray.cpus_per_worker=1", "schedule.max_stages=2", "ray.address=auto", f"output_dir={out}",
                f"tracking.tracking_uri=sqlite:///{out}/mlflow.db", "tracking.experiment=job-submit",
                *[f"data.synthetic.{k}={v}" for k, v in TINY_SYNTH.items()]]
        space = tmp_path / "space.yaml"
        space.write_text("space:\n  clustering.merge_percent: {grid: [0.2, 0.3]}\n")
        submit = subprocess.run(
            [f"{venv_bin}/ray", "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--",
             "python", "experiments/sweep.py", "buc", "--space", str(space), "--search", "grid",
             "--name", "submitted", *[a for s in sets for a in ("--set", s)]],
            env=env, capture_output=True, text=True, timeout=600)
        log = submit.stdout + submit.stderr
        assert "succeeded" in log, log[-4000:]
        summary = json.loads((out / "submitted" / "summary.json").read_text())
        assert [t["status"] for t in summary["trials"]] != [] and len(summary["trials"]) == 2
        assert all(t["status"] in ("finished", "early_stopped") for t in summary["trials"])
        assert (out / "submitted" / "best.yaml").is_file()
        parent = MlflowClient(summary["tracking_uri"]).get_run(summary["parent_run_id"])
        assert parent.info.status == "FINISHED"
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # the head's process group only: never `ray stop`
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
