"""SSL: Lin et al., *Unsupervised Person Re-identification via Softened Similarity Learning*, CVPR 2020.

No clustering: every image is its own class over an N-row memory. Stage 0 trains with hard labels;
afterwards each image's target puts ``soft_weight`` (lambda) on itself and ``(1 - lambda) / k`` on each of
its k reliable images, the smallest ``(1 - lambda_p) d_global + lambda_p d_part + CCE`` (eq. 4), where
``d_part`` averages p horizontal stripes and ``CCE = camera_penalty`` for same-camera pairs.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field

from .. import clustering
from . import register
from .base import Method, RunData, Settings, Targets, UpdateContext, l2_normalise


class SSLSettings(Settings):
    num_neighbors: Annotated[int, Field(ge=1)] = 4
    part_weight: Annotated[float, Field(ge=0, le=1)] = 0.5
    camera_penalty: Annotated[float, Field(ge=0)] = 0.02
    soft_weight: Annotated[float, Field(gt=0, le=1)] = 0.6
    num_stages: Annotated[int, Field(ge=1)] = 10


class SSL(Method):
    name = "ssl"
    Settings = SSLSettings
    key_settings = ("num_neighbors", "part_weight", "camera_penalty")
    needs_parts = True
    search_space = {
        "clustering.num_neighbors": {"randint": [2, 9]},      # k
        "clustering.soft_weight": {"uniform": [0.4, 0.9]},    # lambda
        "clustering.part_weight": {"uniform": [0.0, 1.0]},
        "clustering.camera_penalty": {"uniform": [0.0, 0.05]},
        "loss.temperature": {"uniform": [0.05, 0.2]},         # tau
    }

    def num_stages(self, cfg, data: RunData) -> int:
        return cfg.clustering.num_stages

    def build_loss(self, cfg, targets: Targets, num_samples: int, feature_dim: int):
        from ..models.losses import SoftenedMemoryLoss

        loss = SoftenedMemoryLoss(cfg.model.embedding_dim, num_samples, temperature=cfg.loss.temperature,
                                  soft_weight=cfg.clustering.soft_weight)
        if targets.neighbors is not None:
            loss.set_neighbors(targets.neighbors)
        return loss

    def update(self, cfg, features, targets: Targets, ctx: UpdateContext) -> Targets:
        """Eq. 4's reliable sets: each image keeps its class, its k most similar images get the softened share."""
        c = cfg.clustering
        part_feats = None
        if ctx.parts is not None and c.part_weight > 0:
            part_feats = l2_normalise(ctx.parts, ctx.features_writable)  # each stripe to unit length
        neighbors = clustering.reliable_neighbors(
            l2_normalise(features, ctx.features_writable), part_feats, ctx.cameras, c.num_neighbors,
            c.part_weight if part_feats is not None else 0.0, c.camera_penalty, map_blocks=ctx.map_blocks,
            device=ctx.device,
        )
        return Targets(labels=targets.labels, neighbors=neighbors)

    def diagnostics(self, cfg, old: Targets, new: Targets, truth: np.ndarray) -> dict[str, float]:
        return {"neighbor_precision": float((truth[new.neighbors] == truth[:, None]).mean())}


METHOD = register(SSL())
