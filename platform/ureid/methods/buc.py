"""BUC: Lin et al., *A Bottom-Up Clustering Approach to Unsupervised Person Re-identification*, AAAI 2019.

Every image starts as its own cluster. Each stage trains the repelled loss over a memory table of the
current clusters (eq. 2; the table is zeroed every stage), then merges ``m = int(mp * N0)`` cluster pairs
by the minimum sample distance plus the diversity penalty ``lambda * (|A| + |B|)`` (eqs. 5-6), so the run
has ``int(1 / mp) - 1`` stages. The public code is the authority where it differs from the paper: squared
Euclidean distance between unit pooled features, sizes frozen at the start of the stage.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from .. import clustering
from . import register
from .base import Method, RunData, Settings, Targets, UpdateContext, l2_normalise

Fraction = Annotated[float, Field(gt=0, lt=1)]
NonNegFloat = Annotated[float, Field(ge=0)]


class BUCSettings(Settings):
    """``merge_percent`` is mp; ``size_penalty`` the diversity weight lambda (paper 0.005, fixed code 0.003)."""

    merge_percent: Fraction = 0.05
    size_penalty: NonNegFloat = 0.005
    metric: Literal["sqeuclidean", "euclidean"] = "sqeuclidean"

    @property
    def merge_penalty(self) -> float:
        """The diversity weight the merge uses (camstyle's eq. 8 may put lambda elsewhere)."""
        return self.size_penalty

    @property
    def ignore_fake_pairs(self) -> bool:
        """Fake-fake pairs never merge (camstyle; its ablation uses them)."""
        return True


def num_merges(merge_percent: float, num_real: int) -> int:
    """``m = int(mp * N0)``, at least one."""
    return max(1, int(merge_percent * num_real))


class BUC(Method):
    name = "buc"
    Settings = BUCSettings
    key_settings = ("merge_percent", "size_penalty")
    search_space = {
        "clustering.size_penalty": {"loguniform": [1e-4, 0.05]},   # lambda
        "clustering.merge_percent": {"uniform": [0.03, 0.15]},    # mp
        "loss.temperature": {"uniform": [0.05, 0.2]},             # tau
    }

    def num_stages(self, cfg, data: RunData) -> int:
        """``int(1 / mp) - 1``, the paper's schedule, unless the clusters run out first: every update merges
        ``num_merges`` pairs, at least one, so a set of fewer than ``1 / mp`` images (one merge a stage) reaches a
        single cluster sooner, and the next update had nothing left to merge (measured: 5 crops at mp 0.1 failed
        in stage 5 of 9). Unchanged wherever ``int(mp N0) >= 1``."""
        mp = cfg.clustering.merge_percent
        return max(1, min(int(1 / mp) - 1, (data.num_real - 1) // num_merges(mp, data.num_real)))

    def update(self, cfg, features, targets: Targets, ctx: UpdateContext) -> Targets:
        """Eqs. (5)-(6): merge ``int(mp * N0)`` pairs by minimum distance + diversity penalty."""
        c = cfg.clustering
        labels = clustering.bottom_up_merge(
            l2_normalise(features, ctx.features_writable), targets.labels, num_merges(c.merge_percent, ctx.num_real),
            c.merge_penalty,
            is_fake=ctx.is_fake if c.ignore_fake_pairs else None, metric=c.metric, map_blocks=ctx.map_blocks,
            device=ctx.device, backend="auto" if ctx.device is None else "torch",
        )
        return Targets(labels=np.asarray(labels))


METHOD = register(BUC())
