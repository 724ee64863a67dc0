"""Where a resumed run starts: after the last stage that has both its checkpoint and its history line
(a kill between Ray Train persisting a checkpoint and the driver recording the report leaves a checkpoint
without metrics; that stage runs again), and a history line cut short by a kill is not a stage."""

import json

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
