"""camstyle: Lin et al., *Unsupervised Person Re-ID via Cross-camera Similarity Exploration*, TIP 2020.

BUC over real images and their camera-style fakes (one per other camera, files named by
:mod:`ureid.data.camstyle`). A real image and its fakes form its *support set*: they start as one
cluster and always share a label. Each epoch still draws N samples, one member of every support set
(a camera drawn uniformly; the image's own camera gives the real image). The merge uses real-real and
real-fake distances only, never fake-fake; evaluation uses real images only.
"""

from __future__ import annotations

import numpy as np

from ..data.camstyle import default_fake_folder, load_fakes
from . import register
from .base import RunData, Targets, labeled_dataset
from .buc import BUC, BUCSettings


class CamstyleSettings(BUCSettings):
    """BUC's keys, plus the folder of fakes (null: ``<data.root>/bounding_box_train_camstyle``)."""

    path_fields = ("fake_root",)
    fake_root: str | None = None


class SupportSetDataset:
    """Each epoch draws one member of each real image's support set (the image or one of its fakes),
    chosen by a seeded RNG per (epoch, image). A map-style dataset for torch's DataLoader."""

    def __init__(self, base, support: list[list[int]], seed: int):
        self.base, self.support, self.seed, self.epoch = base, support, seed, 0

    def set_epoch(self, seed: int, epoch: int) -> None:  # called by make_loader every epoch
        self.seed, self.epoch = seed, epoch
        self.base.set_epoch(seed, epoch)

    def __len__(self):
        return len(self.support)

    def __getitem__(self, i):
        members = self.support[i]
        pick = members[np.random.default_rng((self.seed, self.epoch, i)).integers(len(members))]
        return self.base[pick]


class Camstyle(BUC):
    name = "camstyle"
    Settings = CamstyleSettings

    def load_data(self, cfg, data: RunData) -> RunData:
        folder = cfg.clustering.fake_root or default_fake_folder(cfg.data.root)
        train = list(data.train)
        support = [[i] for i in range(data.num_real)]
        owner = list(range(data.num_real))
        for src, rec in load_fakes(folder, train[: data.num_real], root_hint=cfg.data.root):
            support[src].append(len(train))
            owner.append(src)
            train.append(rec)
        data.train = train
        data.extra["support"] = support
        data.extra["support_labels"] = np.asarray(owner, dtype=np.int64)
        return data

    def initial_targets(self, cfg, data: RunData) -> Targets:
        return Targets(labels=data.extra["support_labels"].copy())

    def train_dataset(self, cfg, data: RunData, targets: Targets):
        return SupportSetDataset(labeled_dataset(cfg, data.train, targets.labels), data.extra["support"], cfg.seed)


METHOD = register(Camstyle())
