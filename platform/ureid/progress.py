"""Driver-side progress output: one tqdm bar per stage (epochs x batches, loss, ETA), one line per finished stage.

Fed from events (the driver receives them from the training workers)::

    progress = StageProgress(sys.stderr)
    progress.start_stage(0, num_stages=9, epochs=15, batches_per_epoch=20)
    progress.update(epoch=0, batch=0, loss=6.19)          # after each batch (or every few)
    ...
    progress.end_stage("stage 0: mAP 4.0% rank-1 3.8% (812 clusters, 95 s)")

On a terminal the bar redraws in place and disappears when the stage ends, leaving only the stage line. When
the stream is not a TTY (CI logs, files, `ray job logs`) no bar is drawn at all - a redrawn bar would leave
every redraw in the log - and the output is one line per finished stage, plus, in a stage that runs longer
than ``heartbeat`` seconds, one line of where it stands every ``heartbeat`` seconds (a stage on real data runs
for many minutes, and a log silent that long reads as a hung job). After its training a stage evaluates,
extracts features and updates its labels (:meth:`StageProgress.phase`): a bar of images, or of the seconds
spent where nothing is counted, on a terminal; the same heartbeat lines in a log. Messages that must stay
visible while a bar is shown (warnings, errors) go through :meth:`StageProgress.write`, which keeps the bar
intact.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class StageProgress:
    """Per-stage progress bar on ``stream`` (default ``sys.stderr``).

    Args:
        stream: where bars and lines go.
        tty: draw bars (``True``) or print plain lines only (``False``); default: ``stream.isatty()``.
        mininterval: least seconds between two redraws of a bar (tqdm's ``mininterval``).
        elapsed: append the stage's wall time to its line, e.g. ``"... [1m35s]"``.
        heartbeat: without bars, least seconds between two lines of a stage's progress (None: none).
        prefix: put before those lines (the stage lines come whole from the caller).
    """

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, mininterval: float = 0.5,
                 elapsed: bool = False, heartbeat: float | None = 120.0, prefix: str = ""):
        self.stream = sys.stderr if stream is None else stream
        self.tty = _isatty(self.stream) if tty is None else bool(tty)
        self.mininterval, self.elapsed = mininterval, elapsed
        self.heartbeat, self.prefix = heartbeat, prefix
        self._bar = None
        self._stage = None
        self._t0 = 0.0
        self._said_at = 0.0
        self._done = 0
        self._phase = None  # after the training: dict(name, done, total, t0), see phase()

    @property
    def in_stage(self) -> bool:
        """Between :meth:`start_stage` and :meth:`end_stage`."""
        return self._stage is not None

    # -- events --------------------------------------------------------------------------------------
    def start_stage(self, stage: int, num_stages: int, epochs: int, batches_per_epoch: int,
                    label: str | None = None) -> None:
        """A stage of ``epochs`` epochs of ``batches_per_epoch`` batches begins (``stage`` counts from 0).
        ``label``: a job of iterations, not a stage of a run (``"StarGAN"``: one epoch of ``batches_per_epoch``
        iterations), named so in the bar and the lines."""
        if epochs < 0 or batches_per_epoch < 0:
            raise ValueError(f"epochs and batches_per_epoch must be >= 0, got {epochs}, {batches_per_epoch}")
        self._close_bar()  # a stage that never ended (a retry), or the work before the first: no line for it
        self._stage = dict(stage=stage, num_stages=num_stages, epochs=epochs, batches=batches_per_epoch, label=label)
        self._phase = None
        self._t0 = self._said_at = time.perf_counter()
        self._done = 0
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=epochs * batches_per_epoch, desc=self._where(), unit="it" if label else "batch",
                file=self.stream, leave=False, dynamic_ncols=True, mininterval=self.mininterval,
                miniters=1,  # events come irregularly (StarGAN's every log step): tqdm's own guess skipped some
            )

    def update(self, epoch: int, batch: int, loss: float | None = None, shown: dict | None = None) -> None:
        """Batch ``batch`` (from 0) of epoch ``epoch`` (from 0) of the current stage is done, with its loss;
        ``shown``: other values to show beside it (``{"g_loss": 5.6}``)."""
        if self._stage is None:
            raise RuntimeError("update() before start_stage()")
        if self._phase is not None:  # a late event of the training, which is over
            return
        if self._bar is None:
            self._beat(epoch, batch, loss, shown)
            return
        done = min(epoch * self._stage["batches"] + batch + 1, self._bar.total)
        postfix = {} if self._stage["label"] else {"epoch": f"{epoch + 1}/{self._stage['epochs']}"}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        postfix.update({name: f"{value:.4f}" for name, value in (shown or {}).items()})
        self._bar.set_postfix(postfix, refresh=False)
        if done > self._bar.n:  # events may arrive out of order or repeat; the bar only moves forward
            self._bar.update(done - self._bar.n)

    def _beat(self, epoch: int, batch: int, loss: float | None, shown: dict | None = None) -> None:
        """Without a bar: a line of where the stage stands, once ``heartbeat`` seconds have passed since the
        stage began or since the last such line, and only when it moved on (events may repeat)."""
        st = self._stage
        total = st["epochs"] * st["batches"]
        done = min(epoch * st["batches"] + batch + 1, total)
        now = time.perf_counter()
        if self.heartbeat is None or done <= self._done or now - self._said_at < self.heartbeat:
            return
        self._done, self._said_at = done, now
        took = now - self._t0
        if st["label"]:
            line = f"{self.prefix}{st['label']}: iteration {done}/{total} ({done / max(total, 1):.0%})"
        else:
            line = (f"{self.prefix}{self._where()}: epoch {epoch + 1}/{st['epochs']}, batch {batch + 1}/"
                    f"{st['batches']} ({done / max(total, 1):.0%} of its training)")
        if loss is not None:
            line += f", loss {loss:.4f}"
        line += "".join(f", {name} {value:.4f}" for name, value in (shown or {}).items())
        line += f", {_fmt_seconds(took)} in"
        if done < total:
            line += f", about {_fmt_seconds(took * (total - done) / done)} of {'it' if st['label'] else 'training'} left"
        self.stream.write(line + "\n")
        self.stream.flush()

    def phase(self, name: str) -> None:
        """The current stage's training is over and ``name`` begins (``"evaluating"``, ``"updating the
        labels"``; also before the first stage, where a run clusters its starting features). Its images are
        counted by :meth:`items` where it reports them; :meth:`tick` keeps time where it does not."""
        self._close_bar()
        now = time.perf_counter()
        self._phase = dict(name=name, done=0, total=None, t0=now)
        if self._stage is None:  # the run's first output: its heartbeat counts from here
            self._said_at = now
        if self.tty:
            from tqdm import tqdm

            # no count yet: the seconds spent, redrawn by tick()
            self._bar = tqdm(total=None, desc=f"{self._where(phase=True)}, {name}", file=self.stream, leave=False,
                             dynamic_ncols=True, bar_format="{desc}: {elapsed}")

    def items(self, done: int, total: int) -> None:
        """``done`` of ``total`` images of the current phase are through; a count that restarts or changes its
        total is the phase's next set (the gallery after the queries)."""
        ph = self._phase
        if ph is None:
            return
        fresh = ph["total"] != total or done < ph["done"]
        ph["done"], ph["total"] = done, total
        if not self.tty:
            self._phase_beat()
            return
        if fresh:
            from tqdm import tqdm

            self._close_bar()
            self._bar = tqdm(total=total, desc=f"{self._where(phase=True)}, {ph['name']}", unit="img", file=self.stream,
                             leave=False, dynamic_ncols=True, mininterval=self.mininterval, miniters=1)
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)

    def tick(self) -> None:
        """Time passes (the driver calls it a few times a second): in a phase, a terminal's clock is redrawn and
        a log gets its heartbeat line, even where nothing is counted (a label update runs for minutes)."""
        if self._phase is None:
            return
        if not self.tty:
            self._phase_beat()
        elif self._bar is not None and self._phase["total"] is None:
            self._bar.refresh()

    def _where(self, phase: bool = False) -> str:
        """The stage, or the labelled job; for a phase, a labelled job's (PUL's source pre-training: the
        evaluation and clustering after it belong to the first stage) is "before the first stage"."""
        st = self._stage
        if st is None or (phase and st["label"]):
            return "before the first stage"
        return st["label"] or f"stage {st['stage']} ({st['stage'] + 1}/{st['num_stages']})"

    def _phase_beat(self) -> None:
        """Without a bar: a line of the phase once ``heartbeat`` seconds have passed since the last line."""
        now = time.perf_counter()
        if self.heartbeat is None or now - self._said_at < self.heartbeat:
            return
        self._said_at = now
        ph = self._phase
        line = f"{self.prefix}{self._where(phase=True)}: {ph['name']}"
        if ph["total"]:
            line += f", {ph['done']}/{ph['total']} images"
        self.stream.write(f"{line}, {_fmt_seconds(now - ph['t0'])} so far\n")
        self.stream.flush()

    def end_stage(self, summary_line: str) -> None:
        """The current stage is over: remove its bar and print ``summary_line`` once."""
        took = time.perf_counter() - self._t0
        self._close_bar()
        self._stage = self._phase = None
        line = summary_line.rstrip("\n")
        if self.elapsed:
            line += f" [{_fmt_seconds(took)}]"
        self.stream.write(line + "\n")
        self.stream.flush()

    def write(self, message: str) -> None:
        """Print a line (a warning, an error) without breaking the bar being drawn."""
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(message.rstrip("\n"), file=self.stream)
        else:
            self.stream.write(message.rstrip("\n") + "\n")
            self.stream.flush()

    def close(self) -> None:
        self._close_bar()
        self._stage = self._phase = None

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()  # leave=False: the bar is erased from the terminal
            self._bar = None


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s"


class ItemsBar:
    """A bar over ``total`` items (images embedded, say) on ``stream`` when it is a terminal; without one (the
    module's rule: no redrawn bar in a log), a line every ``heartbeat`` seconds of where it stands (a large
    gallery embeds for many minutes). Call it as ``progress(done, total)`` (what
    ``engine.extract.extract_features`` takes); :meth:`close` removes the bar. A context manager."""

    def __init__(self, desc: str, stream: TextIO | None = None, tty: bool | None = None, unit: str = "img",
                 mininterval: float = 0.5, heartbeat: float | None = 120.0, prefix: str = "[ureid] "):
        self.stream = sys.stderr if stream is None else stream
        self.tty = _isatty(self.stream) if tty is None else bool(tty)
        self.desc, self.unit, self.mininterval = desc, unit, mininterval
        self.heartbeat, self.prefix = heartbeat, prefix
        self._bar = None
        self._t0 = self._said_at = None

    def __call__(self, done: int, total: int) -> None:
        if not self.tty:
            self._beat(done, total)
            return
        if self._bar is not None and (total != self._bar.total or done < self._bar.n):
            self.close()  # the next set (the gallery after the queries): a bar of its own
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=self.stream, leave=False,
                             mininterval=self.mininterval, miniters=1, dynamic_ncols=True)
        self._bar.update(done - self._bar.n)

    def _beat(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = self._said_at = now
        if self.heartbeat is None or now - self._said_at < self.heartbeat:
            return
        self._said_at = now
        noun = {"img": "images"}.get(self.unit, f"{self.unit}s")
        self.stream.write(f"{self.prefix}{self.desc}: {done}/{total} {noun}, {_fmt_seconds(now - self._t0)} so far\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ItemsBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
