"""Ray Train callbacks of a run: they run in the Train controller after every ``ray.train.report``, so
workers on other nodes never talk to MLflow or write the run folder."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ray.train import UserCallback

from .. import tracking


def stage_metrics(metrics: list[dict]) -> dict:
    """Rank 0's numeric metrics, plus ``memory_replicas_identical`` when the workers report memory checksums."""
    m = {k: v for k, v in metrics[0].items()
         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    sums = [w.get("memory_checksum") for w in metrics if w.get("memory_checksum")]
    if sums:
        m["memory_replicas_identical"] = float(len(set(sums)) == 1)
    return m


class MlflowStageCallback(UserCallback):
    """Logs every report's metrics to the run with ``step = stage``."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        m = stage_metrics(metrics)
        stage = int(m.pop("stage", 0))
        tracking.log_stage(self.uri, self.run_id, stage, m, timestamp_ms=int(time.time() * 1000))


class HistoryCallback(UserCallback):
    """Appends every report's metrics as one JSON line to ``path``: the run's history, read by the driver."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(stage_metrics(metrics)) + "\n")


def read_history(path: str | Path, before: int | None = None) -> list[dict]:
    """The stages in a history file, one per stage (the last line of a stage wins), in stage order;
    with ``before``, only the stages before it (and the file is rewritten so: a resume recomputes the rest)."""
    path = Path(path)
    by_stage: dict[int, dict] = {}
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        for i, line in enumerate(lines):
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # cut short by a kill mid-write: that stage was not recorded
                    break
                raise
            by_stage[int(m["stage"])] = m
    history = [by_stage[s] for s in sorted(by_stage) if before is None or s < before]
    if before is not None:
        path.write_text("".join(json.dumps(m) + "\n" for m in history))
    return history
