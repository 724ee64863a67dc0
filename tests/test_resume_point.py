"""Where a resumed run starts: after the last stage that has both its checkpoint and its history line
(a kill between Ray Train persisting a checkpoint and the driver recording the report leaves a checkpoint
without metrics; that stage runs again), and a history line cut short by a kill is not a stage; a resume
runs on the training set the run started on."""

import json
from pathlib import Path

import pytest

from ureid.runtime.callbacks import read_history
from ureid.runtime.experiment import _resume_point
from ureid.runtime.job import Job
from ureid.runtime.stage_loop import STATE_FILE


def _checkpoint(run_dir, attempt, stage):
    d = run_dir / "ray" / f"run-attempt{attempt}" / f"stage_{stage:03d}"
    d.mkdir(parents=True)
    (d / STATE_FILE).write_bytes(b"x")
    return d


def test_resume_after_the_last_recorded_and_checkpointed_stage(tmp_path):
    job = Job(tmp_path, "sqlite:///unused.db", "run")
    assert _resume_point(job) == (0, None)
    first = _checkpoint(tmp_path, 1, 0)
    assert _resume_point(job) == (0, None)  # a checkpoint whose report was never recorded
    job.history_path.write_text(json.dumps({"stage": 0, "mAP": 0.1}) + "\n")
    assert _resume_point(job) == (1, str(first))
    _checkpoint(tmp_path, 1, 1)
    with job.history_path.open("a") as f:
        f.write('{"stage": 1, "mA')  # killed mid-write
    assert [h["stage"] for h in read_history(job.history_path)] == [0]
    assert _resume_point(job) == (1, str(first))
    job.history_path.write_text(json.dumps({"stage": 0}) + "\n" + json.dumps({"stage": 1}) + "\n")
    assert _resume_point(job)[0] == 2


def test_a_resume_runs_on_the_training_set_the_run_started_on(tmp_path):
    """The first attempt records the training set (count, digest of the paths below the root) in run.json; a
    resume on the same files moved elsewhere passes, on fewer files or the same count in another order fails."""
    job = Job(tmp_path, "sqlite:///unused.db", "run0")
    first = [(str(tmp_path / "d" / f"{i:04d}.jpg"),) for i in range(5)]
    job.check_training_set(str(tmp_path / "d"), first)
    recorded = json.loads((tmp_path / "run.json").read_text())["training_set"]
    assert recorded["num_samples"] == 5 and recorded["root"] == str(tmp_path / "d")

    def resumed():
        return Job(tmp_path, "sqlite:///unused.db", "run0", 2, json.loads((tmp_path / "run.json").read_text())["training_set"])

    moved = [(p.replace(f"{tmp_path}/d/", f"{tmp_path}/e/"),) for (p,) in first]
    resumed().check_training_set(str(tmp_path / "e"), moved)
    with pytest.raises(ValueError, match=r"4 training images under .*/e, the run's stages trained on 5 under .*/e"):
        resumed().check_training_set(str(tmp_path / "e"), moved[:4])
    with pytest.raises(ValueError, match=r"\(as many, but other files or another order\)"):
        resumed().check_training_set(str(tmp_path / "e"), moved[::-1])


def test_a_run_in_use_is_not_resumed_beside_it(tmp_path):
    """--resume of a run whose driver still runs it (another terminal, a second job submit) trained the same
    stages into the same checkpoints and MLflow run beside it: the run folder is locked while a driver holds
    it, the second is refused before it touches anything (with the holder named, also from another process),
    and the lock goes with the block, or with the holder's death (the kernel drops it; a SIGKILLed driver's
    run resumes: tests/test_faults.py)."""
    import os
    import subprocess
    import sys
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from ureid.runtime.job import RunInUse

    from ureid.config import CONFIG_DIR, load_config, save_config

    cfg = load_config(CONFIG_DIR / "buc_cpu.yaml", [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'out'}",
                                                    f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    tracking_cfg = cfg.tracking
    job = Job.start("buc", tmp_path / "out", tracking_cfg, params={}, tags={},
                    write_config=lambda d: save_config(cfg, d / "config.yaml"))
    run_dir = job.run_dir
    with job.failing_loudly():
        with pytest.raises(RunInUse, match=rf"{run_dir} is in use: pid {os.getpid()} on .* since .*Stop that one "
                                           rf"first .*then --resume {run_dir}"):
            Job.reopen(run_dir)
        # experiments/buc.py (what `ray job submit` runs): one error line, as `ureid run` (it printed a traceback)
        script = Path(__file__).resolve().parents[1] / "experiments" / "buc.py"
        other = subprocess.run([sys.executable, str(script), "--resume", str(run_dir)],
                               capture_output=True, text=True, timeout=120,
                               env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert other.returncode == 2 and other.stderr.startswith(f"ureid: error: {run_dir} is in use: pid {os.getpid()}"), \
            other.stderr[-2000:]
        assert "Traceback" not in other.stderr
        assert "Started a local Ray instance" not in other.stdout + other.stderr
        assert json.loads((run_dir / "run.json").read_text())["attempts"] == 1  # nothing touched
        assert MlflowClient(tracking_cfg.tracking_uri).get_run(job.run_id).info.status == "RUNNING"
        job.finish()
    again = Job.reopen(run_dir)  # the block ended: the lock went with it
    assert again.attempt == 2
    # a sweep trial resumed after its driver died waits for the dead driver's trial process to let go
    import threading
    import time

    threading.Timer(1.0, again.release).start()
    start = time.monotonic()
    waited = Job.reopen(run_dir, lock_wait_s=30.0)
    assert 0.9 <= time.monotonic() - start < 30 and waited.attempt == 3
    waited.release()


def test_a_sweep_in_use_is_not_resumed_beside_it(tmp_path):
    """`ureid tune --resume` of a sweep whose driver still runs restored the same Tune state and ran its trials
    a second time beside it: refused before Ray starts, naming the holder."""
    import os

    from ureid.runtime.job import RunInUse, hold_folder
    from ureid.runtime.tune import run_sweep

    (tmp_path / "sweep.json").write_text("{}")
    held = hold_folder(tmp_path)
    try:
        with pytest.raises(RunInUse, match=rf"{tmp_path} is in use: pid {os.getpid()} on "):
            run_sweep(None, "buc", resume=str(tmp_path), quiet=True)
    finally:
        held.close()
