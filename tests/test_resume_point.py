"""Where a resumed run starts: after the last stage that has both its checkpoint and its history line
(a kill between Ray Train persisting a checkpoint and the driver recording the report leaves a checkpoint
without metrics; that stage runs again), and a history line cut short by a kill is not a stage; a resume
runs on the training set the run started on."""

import json

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
