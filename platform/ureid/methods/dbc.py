"""DBC: Ding et al., *Towards better Validity: Dispersion based Clustering for Unsupervised Person Re-ID*.

BUC's loop and loss with another merge criterion: average linkage of squared distances between unit
features (the inter-dispersion, ``d_AB = 2 - 2 mu_A . mu_B`` in closed form) plus ``intra_weight`` times
the clusters' intra-dispersions (``2 - 2 |mu|^2``). The public code freezes the linkages for a stage and
merges on plain ``d_AB`` (``update=stage``, ``intra_weight`` 0); the paper's Alg. 1 updates the proximities
after every merge (``update=merge``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .. import clustering
from . import register
from .base import Settings, Targets, UpdateContext, l2_normalise
from .buc import BUC, Fraction, NonNegFloat, num_merges


class DBCSettings(Settings):
    merge_percent: Fraction = 0.05
    intra_weight: NonNegFloat = 0.0
    update: Literal["stage", "merge"] = "stage"


class DBC(BUC):
    name = "dbc"
    Settings = DBCSettings
    key_settings = ("merge_percent", "intra_weight", "update")
    search_space = {
        "clustering.intra_weight": {"uniform": [0.0, 0.1]},
        "clustering.merge_percent": {"uniform": [0.03, 0.15]},
        "clustering.update": {"choice": ["stage", "merge"]},
    }

    def update(self, cfg, features, targets: Targets, ctx: UpdateContext) -> Targets:
        c = cfg.clustering
        labels = clustering.dispersion_merge(
            l2_normalise(features, ctx.features_writable), targets.labels, num_merges(c.merge_percent, ctx.num_real),
            c.intra_weight,
            update=c.update, map_blocks=ctx.map_blocks, device=ctx.device,
        )
        return Targets(labels=np.asarray(labels))


METHOD = register(DBC())
