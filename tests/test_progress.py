"""ureid.progress: per-stage bars on a TTY, plain one line per stage otherwise, no line printed twice."""

from __future__ import annotations

import io
import re

import pytest

from ureid.progress import ItemsBar, StageProgress

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


def test_plain_stream_says_where_a_long_stage_stands_every_heartbeat(monkeypatch):
    """A stage on real data trains for many minutes; a log (`ray job logs`, a file) got nothing between its
    stage lines. Without bars a line of progress comes every ``heartbeat`` seconds, none for a repeated event."""
    clock = iter(range(0, 10_000, 50))  # every call to the clock: 50 s later
    monkeypatch.setattr("ureid.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    progress = StageProgress(out, heartbeat=100, prefix="[ureid] ")
    _drive(progress)
    lines = out.getvalue().splitlines()
    beats = [line for line in lines if line not in STAGE_LINES]
    assert [line for line in lines if line in STAGE_LINES] == STAGE_LINES
    # start at t=0; updates at 50, 100, ... : one line every second update, i.e. batches 2, 4, 6, 8 of a stage
    assert beats[:4] == [
        "[ureid] stage 0 (1/3): epoch 1/2, batch 2/4 (25% of its training), loss 5.9000, 1m40s in, about 5m00s of "
        "training left",
        "[ureid] stage 0 (1/3): epoch 1/2, batch 4/4 (50% of its training), loss 5.7000, 3m20s in, about 3m20s of "
        "training left",
        "[ureid] stage 0 (1/3): epoch 2/2, batch 2/4 (75% of its training), loss 5.5000, 5m00s in, about 1m40s of "
        "training left",
        "[ureid] stage 0 (1/3): epoch 2/2, batch 4/4 (100% of its training), loss 5.3000, 6m40s in"]
    assert len(beats) == 12 and len(set(lines)) == len(lines)  # the repeated last event said nothing
    quiet = io.StringIO()
    _drive(StageProgress(quiet, heartbeat=None))
    assert quiet.getvalue().splitlines() == STAGE_LINES


def _drive_phases(progress: StageProgress) -> None:
    """A stage's life after its training, as the driver receives it: the starting features clustered before
    stage 0, then training, evaluation (query, then gallery), extraction and the label update."""
    progress.phase("updating the labels")
    for _ in range(3):
        progress.tick()
    progress.start_stage(0, num_stages=2, epochs=1, batches_per_epoch=2)
    progress.update(0, 0, loss=6.0)
    progress.update(0, 1, loss=5.0)
    progress.phase("evaluating (query, then gallery images)")
    for done in (4, 8):
        progress.items(done, 8)
    progress.update(0, 1, loss=5.0)  # a late batch event: the training is over, nothing drawn or said
    for done in (10, 20):
        progress.items(done, 20)  # the gallery
    progress.phase("extracting the training features")
    progress.items(30, 30)
    progress.phase("updating the labels")
    for _ in range(3):
        progress.tick()
    progress.end_stage(STAGE_LINES[0])
    progress.tick()  # between stages: nothing


def test_plain_stream_says_what_a_stage_does_after_its_training(monkeypatch):
    """Evaluation, feature extraction and the label update run for minutes on real data after the last
    batch, where the log said nothing: the heartbeat goes on through them, counting images where there are,
    and where there are none (the update) the driver's ticks keep it going."""
    clock = iter(range(0, 10_000, 50))
    monkeypatch.setattr("ureid.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    _drive_phases(StageProgress(out, heartbeat=100, prefix="[ureid] "))
    # the clock moves 50 s per reading, each call below reads it once: a line when 100 s have passed since
    # the last one (the late batch event reads nothing)
    assert out.getvalue().splitlines() == [
        "[ureid] before the first stage: updating the labels, 1m40s so far",
        "[ureid] stage 0 (1/2): epoch 1/1, batch 2/2 (100% of its training), loss 5.0000, 1m40s in",
        "[ureid] stage 0 (1/2): evaluating (query, then gallery images), 4/8 images, 50s so far",
        "[ureid] stage 0 (1/2): evaluating (query, then gallery images), 10/20 images, 2m30s so far",
        "[ureid] stage 0 (1/2): extracting the training features, 30/30 images, 50s so far",
        "[ureid] stage 0 (1/2): updating the labels, 50s so far",
        "[ureid] stage 0 (1/2): updating the labels, 2m30s so far",
        STAGE_LINES[0]]
    quiet = io.StringIO()
    _drive_phases(StageProgress(quiet, heartbeat=None))
    assert quiet.getvalue().splitlines() == [STAGE_LINES[0]]


def test_tty_draws_a_bar_for_each_phase_and_leaves_only_the_stage_line():
    out = FakeTTY()
    _drive_phases(StageProgress(out, mininterval=0))
    raw = out.getvalue()
    assert "stage 0 (1/2), evaluating (query, then gallery images)" in raw and "8/8" in raw and "20/20" in raw
    assert "10/8" not in raw and "stage 0 (1/2), extracting the training features" in raw and "30/30" in raw
    assert re.search(r"stage 0 \(1/2\), updating the labels: \d\d:\d\d", raw)  # the seconds, no count
    assert "before the first stage, updating the labels" in raw
    assert _screen_lines(raw) == [STAGE_LINES[0]]


def test_a_labelled_job_of_iterations_gets_its_own_bar_and_lines(monkeypatch):
    """StarGAN's training: one "stage" of iterations, named, with its losses; from where a resumed job stands."""
    out = FakeTTY()
    progress = StageProgress(out, mininterval=0)
    progress.start_stage(0, 1, 1, 100, label="StarGAN")
    progress.update(0, 49)  # resumed at iteration 50
    progress.update(0, 59, None, {"d_loss": 1.75, "g_loss": 5.64})
    # what follows such a job in a run (PUL's source pre-training, then its model's evaluation) is not the job's
    progress.phase("evaluating (query, then gallery images)")
    progress.close()
    raw = out.getvalue()
    assert "StarGAN:  60%" in raw and "60/100" in raw and "it/s" in raw and "d_loss=1.7500, g_loss=5.6400" in raw
    assert "epoch" not in raw and "stage 0" not in raw and _screen_lines(raw) == []
    assert "before the first stage, evaluating" in raw and "StarGAN, evaluating" not in raw
    clock = iter(range(0, 10_000, 50))
    monkeypatch.setattr("ureid.progress.time.perf_counter", lambda: next(clock))
    log = io.StringIO()
    progress = StageProgress(log, heartbeat=100, prefix="[ureid] ")
    progress.start_stage(0, 1, 1, 100, label="StarGAN")
    for done in (10, 20, 30):
        progress.update(0, done - 1, None, {"d_loss": 2.0, "g_loss": 6.0})
    assert log.getvalue().splitlines() == [
        "[ureid] StarGAN: iteration 20/100 (20%), d_loss 2.0000, g_loss 6.0000, 1m40s in, about 6m40s of it left"]


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


# A real run's output, with and without --verbose: tests/test_faults.py, the killed-driver test (its drivers
# are real `experiments/buc.py` and `ureid run --resume` processes).


def test_items_bar_on_a_terminal_only_and_one_per_set():
    """``ItemsBar`` (ureid embed / search / evaluate): a bar of images on a terminal, erased when closed; a new
    set (the gallery after the queries) gets a bar of its own; nothing on a plain stream for a short job."""
    out = FakeTTY()
    with ItemsBar("embedding", out, mininterval=0) as bar:
        for done in (3, 6, 8):
            bar(done, 8)
        bar(4, 20)  # the next set
        bar(20, 20)
    raw = out.getvalue()
    assert "embedding" in raw and "8/8" in raw and "20/20" in raw and "6/20" not in raw
    assert _screen_lines(raw) == []  # nothing left on screen
    plain = io.StringIO()
    with ItemsBar("embedding", plain) as bar:
        bar(8, 8)
    assert plain.getvalue() == ""


def test_items_bar_in_a_log_says_where_it_stands_every_heartbeat(monkeypatch):
    """A large gallery embeds for many minutes; a log (a batch job's) got nothing until the end."""
    clock = iter(range(0, 10_000, 50))
    monkeypatch.setattr("ureid.progress.time.perf_counter", lambda: next(clock))
    plain = io.StringIO()
    with ItemsBar("embedding", plain, heartbeat=100) as bar:
        for done in range(64, 64 * 6, 64):
            bar(done, 19732)
    assert plain.getvalue().splitlines() == ["[ureid] embedding: 192/19732 images, 1m40s so far",
                                             "[ureid] embedding: 320/19732 images, 3m20s so far"]

