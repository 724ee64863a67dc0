"""camstyle: Lin et al., *Unsupervised Person Re-ID via Cross-camera Similarity Exploration*, TIP 2020.

BUC over real images and their camera-style fakes (one per other camera, files named by
:mod:`ureid.data.camstyle`). The fakes come from a StarGAN over the training set's cameras
(``style_transfer: stargan``, trained and generated once per dataset and GAN config, then reused:
:mod:`ureid.runtime.stargan`) or from the colour-statistics stand-in (``style_transfer: colour``). A real
image and its fakes form its *support set*: they start as one cluster and always share a label. Each
epoch still draws N samples, one member of every support set (a camera drawn uniformly; the image's own
camera gives the real image). The merge uses real-real and real-fake distances only, never fake-fake
(``fake_fake: use`` is the paper's ablation); evaluation uses real images only.

Eq. 8 of the TIP text reads either ``D(A, B) + lambda R(A, B)`` (lambda on the diversity term, BUC's form:
``lambda_on: diversity``) or ``lambda D(A, B) + R(A, B)`` (``lambda_on: distance``). Scaling a score by
``1 / lambda`` keeps its order and its ties, so the second is exactly BUC's merge with a size penalty of
``1 / lambda``. The text gives lambda as 0.03 and Fig. 6 peaks at 0.003: both are ``size_penalty`` values.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import model_validator

from ..config import Text
from ..data.camstyle import default_fake_folder, load_fakes
from . import register
from .base import RunData, Targets, labeled_dataset
from .buc import BUC, BUCSettings


class CamstyleSettings(BUCSettings):
    """BUC's keys, plus where the fakes come from and the paper's two readings and one ablation.

    ``style_transfer``: ``stargan`` (a StarGAN trained from the ``stargan`` config file, with ``stargan_set``
    dotted overrides; its ``data`` block is this run's) or ``colour`` (the stand-in). ``fake_root``: a folder
    of fakes to use as they are, whichever wrote them (null: the StarGAN's cache, or
    ``<data.root>/bounding_box_train_camstyle`` for colour). ``fake_fake``: ``ignore`` (the paper) or ``use``
    (its Table I ablation). ``lambda_on``: where eq. 8 puts ``size_penalty`` (see the module docstring).
    """

    path_fields = ("fake_root",)
    style_transfer: Literal["stargan", "colour"] = "stargan"
    stargan: Text = "stargan.yaml"
    stargan_set: list[str] = []
    fake_root: Text | None = None
    fake_fake: Literal["ignore", "use"] = "ignore"
    lambda_on: Literal["diversity", "distance"] = "diversity"

    @model_validator(mode="after")
    def _lambda_on_distance_needs_lambda(self):
        if self.lambda_on == "distance" and self.size_penalty == 0:
            raise ValueError("lambda_on: distance scales the distance by size_penalty, which must then be > 0")
        return self

    @property
    def merge_penalty(self) -> float:
        """BUC's size penalty giving eq. 8's order: lambda, or 1 / lambda when lambda scales the distance."""
        return self.size_penalty if self.lambda_on == "diversity" else 1.0 / self.size_penalty

    @property
    def ignore_fake_pairs(self) -> bool:
        return self.fake_fake == "ignore"


def stargan_config(cfg):
    """The StarGAN job that makes this run's fakes: the ``stargan`` file and ``stargan_set`` overrides, on this
    run's dataset, Ray cluster, MLflow experiment and output folder."""
    from ..config import load_gan_config

    c = cfg.clustering
    gcfg = load_gan_config(c.stargan, list(c.stargan_set))
    gcfg.data = cfg.data.model_copy(deep=True)
    gcfg.ray = cfg.ray.model_copy(deep=True)
    gcfg.tracking = cfg.tracking.model_copy(update={"run_name": None})
    gcfg.output_dir = cfg.output_dir
    return gcfg


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

    def prepare(self, cfg) -> None:
        """With StarGAN fakes: train the GAN and generate its fakes unless the cache has them (the driver)."""
        c = cfg.clustering
        if c.style_transfer == "stargan" and c.fake_root is None:
            from .. import jobs
            from ..data.run_data import load_split_dataset

            jobs.run("stargan_fakes", stargan_config(cfg), load_split_dataset(cfg.data).train)

    def fake_folder(self, cfg, real) -> str:
        c = cfg.clustering
        if c.fake_root:
            return c.fake_root
        if c.style_transfer == "colour":
            return str(default_fake_folder(cfg.data.root))
        from ..data.camstyle import stargan_fake_folder, stargan_key

        gcfg = stargan_config(cfg).with_absolute_paths()
        return str(stargan_fake_folder(gcfg.data.root, stargan_key(gcfg, real)))

    def load_data(self, cfg, data: RunData) -> RunData:
        folder = self.fake_folder(cfg, data.train[: data.num_real])
        train = list(data.train)
        support = [[i] for i in range(data.num_real)]
        owner = list(range(data.num_real))
        d = cfg.data
        hint = d.root + ("" if d.name in ("synthetic", "market1501") else f" --format {d.name}")
        hint += f" --pattern '{d.pattern}'" if d.pattern else ""
        for src, rec in load_fakes(folder, train[: data.num_real], root_hint=hint):
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
