"""Which stage a run keeps, decided in one place as the stages come in (and early stopping with it).

The criterion is ``schedule.select`` (see :class:`ureid.config.ScheduleConfig`); the test-set-mAP oracle is
tracked beside it, always, so every table can show both.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Best:
    metric: str
    higher: bool = True
    score: float | None = None
    stage: int | None = None

    def observe(self, stage: int, metrics: dict) -> bool:
        value = metrics.get(self.metric)
        if value is None:
            return False
        better = self.score is None or (value > self.score if self.higher else value < self.score)
        if better:  # the first of equals is kept
            self.score, self.stage = float(value), stage
        return better


@dataclass
class Selection:
    """``criterion``: (metric, higher is better), or None to keep the last stage. ``patience`` stages without a
    new best under the criterion stop the run."""

    criterion: tuple[str, bool] | None
    patience: int | None = None
    chosen: _Best | None = None
    oracle: _Best = field(default_factory=lambda: _Best("mAP"))
    last: int | None = None
    stale: int = 0

    def __post_init__(self):
        if self.criterion is not None and self.chosen is None:
            self.chosen = _Best(*self.criterion)

    @classmethod
    def from_schedule(cls, schedule) -> "Selection":
        return cls(schedule.criterion(), schedule.patience)

    def observe(self, stage: int, metrics: dict) -> bool:
        """Record ``stage``'s metrics; True when the run should stop."""
        self.last = stage
        self.oracle.observe(stage, metrics)
        if self.chosen is None:
            return False
        self.stale = 0 if self.chosen.observe(stage, metrics) else self.stale + 1
        return bool(self.patience and self.stale >= self.patience)

    @property
    def selected_stage(self) -> int | None:
        """The stage the criterion keeps (the last one until a stage has the criterion's metric)."""
        if self.chosen is not None and self.chosen.stage is not None:
            return self.chosen.stage
        return self.last

    @property
    def oracle_stage(self) -> int | None:
        return self.oracle.stage if self.oracle.stage is not None else self.last
