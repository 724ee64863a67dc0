"""Which stage a run keeps, decided in one place as the stages come in (and early stopping with it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Selection:
    """Keeps the stage with the highest ``metric`` (the first of equals); ``patience`` stages without a
    new best stop the run. A stage without the metric keeps the last stage seen until one has it."""

    metric: str
    patience: int | None = None
    best_score: float | None = None
    best: int | None = None
    last: int | None = None
    stale: int = 0

    def observe(self, stage: int, metrics: dict) -> bool:
        """Record ``stage``'s metrics; True when the run should stop."""
        self.last = stage
        score = metrics.get(self.metric)
        if score is not None and (self.best_score is None or score > self.best_score):
            self.best_score, self.best, self.stale = float(score), stage, 0
        else:
            self.stale += 1
        return bool(self.patience and self.stale >= self.patience)

    @property
    def best_stage(self) -> int | None:
        return self.best if self.best is not None else self.last
