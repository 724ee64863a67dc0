"""Progress of a stage-loop run on the driver's terminal: rank 0's events travel through a small actor to
a thread of the driver that draws them with :class:`ureid.progress.StageProgress` (a tqdm bar per stage on a
terminal, one line per finished stage; in a log file only the lines).

Without this, what a person reads is whatever Ray forwards from the workers' stdout: every line prefixed
with the worker's pid, interleaved with Ray Train's own INFO lines (the whole metrics dict of every
report, every checkpoint path). Those stay available with ``--verbose``, where the workers print their
lines themselves and no relay is used.

Events are tuples, sent fire-and-forget (an actor runs one caller's calls in order):
``("start", stage, num_stages, epochs, batches_per_epoch[, label])`` (a label: a job of iterations, StarGAN's),
``("batch", epoch, batch, loss[, shown])`` (shown: other values by name),
``("phase", name)`` (the training is over, e.g. the evaluation begins), ``("items", done, total)`` (images of
the phase through), ``("line", text)`` (a message between bars), ``("end", text)`` (the stage's one line).
"""

from __future__ import annotations

import sys
import threading

import ray

from ..progress import StageProgress


@ray.remote(num_cpus=0)
class ProgressRelay:
    def __init__(self):
        self.events: list[tuple] = []

    def push(self, *events: tuple) -> None:
        self.events.extend(events)

    def drain(self) -> list[tuple]:
        out, self.events = self.events, []
        return out


class DriverProgress:
    """``with DriverProgress(relay): trainer.fit()``: pumps the relay's events into a StageProgress."""

    def __init__(self, relay, stream=None, interval: float = 0.25, tty: bool | None = None):
        self.relay, self.interval = relay, interval
        self.view = StageProgress(sys.stderr if stream is None else stream, tty=tty, elapsed=False,
                                  prefix="[ureid] ")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="ureid-progress", daemon=True)

    def __enter__(self) -> "DriverProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._apply_all()  # what arrived after the last poll
        self.view.close()

    def _pump(self) -> None:
        while not self._stop.wait(self.interval):
            self._apply_all()
            self.view.tick()

    def _apply_all(self) -> None:
        try:
            events = ray.get(self.relay.drain.remote(), timeout=30)
        except Exception as exc:  # never let the display take the run down
            self.view.write(f"[ureid] progress display: {type(exc).__name__}: {exc}")
            return
        for event in events:
            kind, *args = event
            if kind == "start":
                self.view.start_stage(*args)
            elif kind == "batch":
                if self.view.in_stage:  # PUL's source pre-training reports batches outside any stage
                    self.view.update(*args)
            elif kind == "phase":
                self.view.phase(*args)
            elif kind == "items":
                self.view.items(*args)
            elif kind == "end":
                self.view.end_stage(args[0])
            else:
                self.view.write(args[0])
