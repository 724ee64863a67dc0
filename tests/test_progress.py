"""ureid.progress: per-stage bars on a TTY, plain one line per stage otherwise, no line printed twice."""

from __future__ import annotations

import io
import re

import pytest

from ureid.progress import StageProgress

STAGE_LINES = [f"stage {s}: mAP {10 + s}.0% rank-1 {20 + s}.0% ({100 - s} clusters)" for s in range(3)]


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drive(progress: StageProgress, warn_at: int | None = None) -> None:
    """A fake run: 3 stages of 2 epochs x 4 batches, events as the driver would receive them."""
    for s, line in enumerate(STAGE_LINES):
        progress.start_stage(s, num_stages=3, epochs=2, batches_per_epoch=4)
        for epoch in range(2):
            for batch in range(4):
                progress.update(epoch, batch, loss=6.0 - 0.1 * (epoch * 4 + batch))
                if warn_at == s and epoch == 1 and batch == 0:
                    progress.write("WARNING: something to keep visible")
        progress.update(1, 3, loss=5.3)  # a repeated event: ignored by the bar
        progress.end_stage(line)


def _screen_lines(raw: str) -> list[str]:
    """What a terminal shows: per newline-separated line, the text after its last carriage return."""
    return [seg.split("\r")[-1].rstrip() for seg in raw.split("\n") if seg.split("\r")[-1].strip()]


def test_plain_stream_gets_exactly_one_line_per_stage():
    out = io.StringIO()  # not a TTY, as in CI logs
    progress = StageProgress(out)
    assert not progress.tty
    _drive(progress, warn_at=1)
    lines = out.getvalue().splitlines()
    assert lines == [STAGE_LINES[0], "WARNING: something to keep visible", STAGE_LINES[1], STAGE_LINES[2]]
    assert "\r" not in out.getvalue()
    assert len(lines) == len(set(lines))


def test_tty_draws_bars_then_leaves_only_stage_lines():
    out = FakeTTY()
    progress = StageProgress(out, mininterval=0)
    assert progress.tty
    _drive(progress, warn_at=2)
    raw = out.getvalue()
    # The bars were drawn: stage name, position of the 8 batches, loss, epoch and an ETA ("elapsed<remaining").
    assert "stage 1 (2/3)" in raw and "8/8" in raw and "loss=" in raw and "epoch=2/2" in raw
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", raw)
    screen = _screen_lines(raw)
    # Each stage line and the warning once, and nothing else: no bar stays on screen (leave=False erases it
    # at the end of its stage), no line is printed twice.
    assert screen == [STAGE_LINES[0], STAGE_LINES[1], "WARNING: something to keep visible", STAGE_LINES[2]]
    assert all(raw.count(line + "\n") == 1 for line in STAGE_LINES)


def test_elapsed_suffix_and_errors():
    out = io.StringIO()
    progress = StageProgress(out, elapsed=True)
    with pytest.raises(RuntimeError, match="before start_stage"):
        progress.update(0, 0, 1.0)
    progress.start_stage(0, 1, 1, 1)
    progress.update(0, 0, None)
    progress.end_stage("stage 0 done\n")
    assert re.fullmatch(r"stage 0 done \[\d+s\]\n", out.getvalue())
    with pytest.raises(ValueError, match="epochs"):
        progress.start_stage(1, 2, -1, 3)


def test_a_real_run_prints_each_line_once_and_hides_ray_trains_info(ray_cluster, tiny_root, tmp_path):
    """The driver's whole output (stdout + stderr) of a 2-stage BUC run on Ray Train with 2 workers: one line
    per finished stage from the progress relay, no line twice, none of Ray Train's per-report dumps; with
    --verbose the workers' own lines and Train's INFO output come back."""
    import subprocess
    import sys

    import ray

    from conftest import TINY_SYNTH

    def run(*extra):
        out = tmp_path / f"out{len(extra)}"
        sets = [f"data.root={tiny_root}", "data.height=32", "data.width=16", "model.embedding_dim=32",
                "train.batch_size=8", "train.eval_batch_size=32", "train.first_stage_epochs=1", "train.stage_epochs=1",
                "train.max_batches_per_epoch=2", "ray.num_workers=2", "ray.cpus_per_worker=1", "schedule.max_stages=2",
                "clustering.merge_percent=0.2", f"ray.address={ray.get_runtime_context().gcs_address}",
                f"output_dir={out}", f"tracking.tracking_uri=sqlite:///{out}/mlflow.db", "tracking.pictures=false",
                *[f"data.synthetic.{k}={v}" for k, v in TINY_SYNTH.items()]]
        done = subprocess.run([sys.executable, "-m", "ureid.cli", "run", "buc", *[a for s in sets for a in ("--set", s)],
                               *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]

    lines = run()
    text = "\n".join(lines)
    stage_lines = [line for line in lines if re.search(r"\[ureid\] stage \d/2 done in", line)]
    assert len(stage_lines) == 2 and all(line.startswith("[ureid] stage") for line in stage_lines), text
    assert "Reporting training result" not in text and "Checkpoint successfully created" not in text, text
    assert "RayTrainWorker" not in text, text  # nothing forwarded from the workers' stdout
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, f"printed more than once: {repeated}"

    verbose = "\n".join(run("--verbose"))
    assert "Reporting training result" in verbose and "(RayTrainWorker" in verbose
    assert re.search(r"\[ureid\] stage 2/2 done in", verbose)
