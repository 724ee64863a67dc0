"""Cluster Contrast: Dai et al., *Cluster Contrast for Unsupervised Person Re-Identification*, 2021
(public code alibaba/cluster-contrast-reid), the modern baseline the five seed methods are compared with.

Every epoch (here: every stage) extracts features of all training images, computes the k-reciprocal
Jaccard distance (Zhong et al., CVPR 2017; k1 = 30, k2 = 6) and clusters it with DBSCAN (``eps``,
``min_samples`` 4); outliers sit the epoch out. A cluster memory starts from the L2-normalised
centroids; training minimises ClusterNCE, ``-log softmax(q . V^T / tau)[y]`` (eq. 2), and moves the
batch's cluster rows with momentum (eq. 3; ``use_hard``: towards each cluster's hardest sample).
Batches are ``P`` clusters x ``num_instances`` images (other cameras first); Adam at ``train.lr``,
divided by 10 every ``step_size`` epochs, its moments kept across epochs. Exactness and memory: the
Jaccard distance is sparse (only pairs within ``eps``), DBSCAN a closed form on it; no N x N matrix.

Names: the ``clustering`` block uses the code's argument names (``eps``, ``k1``, ``k2``, ``momentum``,
``num_instances``, ``iters``, ``epochs``, ``step_size``, ``use_hard``); its ``--temp`` is
``loss.temperature``, ``--lr`` / ``--weight-decay`` are ``train.lr`` / ``train.weight_decay``, ``-b`` is the
global batch ``train.batch_size x ray.num_workers``, ``--pooling-type`` is ``model.pooling``.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field

from .. import clustering
from . import register
from .base import Method, Recipe, RunData, Settings, Targets, UpdateContext, Worker, l2_normalise, pair_precision

PosInt = Annotated[int, Field(ge=1)]


class ClusterContrastSettings(Settings):
    """Defaults: the code's argparse, except where its Market-1501 run script sets otherwise (see
    ``cluster_contrast.yaml``)."""

    eps: Annotated[float, Field(gt=0, lt=1)] = 0.6          # DBSCAN radius on the Jaccard distance
    min_samples: PosInt = 4                                  # DBSCAN core size (fixed at 4 in the code)
    k1: Annotated[int, Field(ge=2)] = 30                     # k-reciprocal neighbourhood
    k2: PosInt = 6                                           # query expansion
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.2     # memory update (eq. 3)
    use_hard: bool = False
    num_instances: PosInt = 4                                # images per cluster in a batch
    iters: PosInt = 400                                      # batches per epoch
    epochs: PosInt = 50                                      # = stages: one clustering per epoch
    step_size: PosInt = 20                                   # lr / 10 every step_size epochs


def cluster_centroids(features: np.ndarray, labels: np.ndarray, num_clusters: int) -> np.ndarray:
    """Mean feature of each cluster 0..C-1 (outliers, label -1, left out), in one pass: (C, d) float32."""
    from ..clustering._common import group_sums

    keep = labels >= 0
    sums = group_sums(features, labels, num_clusters)  # the sums np.add.at would give, 20x faster
    counts = np.bincount(labels[keep], minlength=num_clusters).astype(np.float64)
    sums /= counts[:, None]  # in place: no second (C, d) float64 array
    return sums.astype(np.float32)


class ClusterContrast(Method):
    name = "cluster_contrast"
    Settings = ClusterContrastSettings
    key_settings = ("eps", "k1", "momentum")
    persistent_optimizer = True  # one Adam for the whole run, as the code's
    search_space = {
        "clustering.eps": {"uniform": [0.4, 0.7]},         # the run scripts' range over datasets
        "clustering.k1": {"randint": [15, 41]},
        "loss.temperature": {"uniform": [0.03, 0.1]},      # tau
    }

    # -- driver --------------------------------------------------------------------------------
    def prepare(self, cfg) -> None:
        if cfg.data.is_video:
            raise ValueError(f"cluster_contrast trains on images; data.name={cfg.data.name!r} holds tracklets "
                             "(use buc with buc_video.yaml for video)")

    def load_data(self, cfg, data: RunData) -> RunData:
        if cfg.clustering.k1 > len(data.train):  # what the update refuses, said before Ray starts
            raise ValueError(f"clustering.k1={cfg.clustering.k1} exceeds the {len(data.train)} training images of "
                             f"{cfg.data.name} at {cfg.data.root!r}: the k-reciprocal lists need k1 <= N")
        return data

    def num_stages(self, cfg, data: RunData) -> int:
        return cfg.clustering.epochs

    def embedding_dim(self, cfg) -> int:
        return 0  # the memory sits on the (BN-necked) pooled feature; an unused head would break DDP

    def initial_targets(self, cfg, data: RunData) -> None:
        return None  # epoch 0 clusters the features of the starting (ImageNet) model

    # -- train workers -------------------------------------------------------------------------
    def recipe(self, cfg, stage: int) -> Recipe:
        """One epoch per stage; ``StepLR(step_size, gamma 0.1)`` over the epochs."""
        return Recipe(1, cfg.train.lr * 0.1 ** (stage // cfg.clustering.step_size), None)

    def build_loss(self, cfg, targets: Targets, num_samples: int, feature_dim: int):
        from ..models.losses import ClusterMemory

        c = cfg.clustering
        loss = ClusterMemory(feature_dim, temperature=cfg.loss.temperature, momentum=c.momentum,
                             use_hard=c.use_hard)
        loss.reset(targets.centroids)
        return loss

    def train_dataset(self, cfg, data: RunData, targets: Targets):
        from ..engine.datasets import ReidImageDataset, pad_crop_erase_transforms

        keep = np.flatnonzero(targets.selected)  # outliers sit the epoch out; cluster ids stay 0..C-1
        tf = pad_crop_erase_transforms(cfg.data.height, cfg.data.width, cfg.data.color_jitter)
        return ReidImageDataset([data.train[i] for i in keep], tf, labels=targets.labels[keep])

    def build_optimizer(self, worker: Worker, loss_fn, recipe: Recipe, stage: int, previous: dict | None = None):
        """Adam (``train.weight_decay``) over every trainable parameter, the trunk at
        ``train.backbone_lr_mult`` (1 in the code); ``previous``: the last epoch's moments."""
        import torch

        from ..engine.train import param_groups

        t = worker.cfg.train
        extra = [p for p in loss_fn.parameters() if p.requires_grad]  # none: the memory is a buffer
        opt = torch.optim.Adam(param_groups(worker.net, extra, recipe.lr, t.backbone_lr_mult), lr=recipe.lr,
                               weight_decay=t.weight_decay)
        if previous is not None:
            opt.load_state_dict(previous)
        return opt

    def train_loader(self, worker: Worker, dataset, stage: int, epoch: int):
        from ..engine.datasets import cluster_instance_batches, make_batch_loader

        cfg, c = worker.cfg, worker.cfg.clustering
        cameras = np.array([r.camid for r in dataset.records], dtype=np.int64)
        seed = (cfg.seed * 1000 + stage) * 1000 + epoch
        batches = cluster_instance_batches(dataset.labels, cameras, c.num_instances,
                                           cfg.train.batch_size * worker.world_size, c.iters, seed)
        return make_batch_loader(dataset, batches, seed=cfg.seed * 1000 + stage, epoch=epoch,
                                 num_workers=cfg.data.num_workers, rank=worker.rank, world_size=worker.world_size)

    # -- feature store ---------------------------------------------------------------------------
    def update(self, cfg, features, targets: Targets | None, ctx: UpdateContext) -> Targets:
        """Jaccard distance (sparse, pairs within ``eps``) -> DBSCAN -> centroids. Outliers get a singleton
        class each after the clusters (so every sample has a label) and are not ``selected``."""
        c = cfg.clustering
        feats = l2_normalise(features, ctx.features_writable)
        n = len(feats)
        if c.k1 > n:
            raise ValueError(f"clustering.k1={c.k1} exceeds the {n} training samples")
        dist = clustering.kreciprocal_jaccard(feats, k1=c.k1, k2=min(c.k2, c.k1), max_distance=c.eps,
                                              map_blocks=ctx.map_blocks, device=ctx.device)
        found = clustering.dbscan(dist, c.eps, c.min_samples)
        num_clusters = int(found.max()) + 1
        if num_clusters == 0:
            raise ValueError(f"DBSCAN found no cluster at clustering.eps={c.eps} (min_samples {c.min_samples}): "
                             "every sample is an outlier; raise eps")
        outliers = found < 0
        batch = cfg.train.batch_size * cfg.ray.num_workers
        if n - int(outliers.sum()) < batch:  # what the train loader would refuse, after a worker-group start each
            raise ValueError(f"DBSCAN at clustering.eps={c.eps} (min_samples {c.min_samples}) kept "
                             f"{n - int(outliers.sum())} of {n} samples in clusters, fewer than one global batch of "
                             f"{batch} (train.batch_size {cfg.train.batch_size} x ray.num_workers "
                             f"{cfg.ray.num_workers}): raise eps or lower the batch")
        labels = found.copy()
        labels[outliers] = num_clusters + np.arange(int(outliers.sum()))
        return Targets(labels=labels, selected=~outliers,
                       centroids=cluster_centroids(feats, found, num_clusters))

    def diagnostics(self, cfg, old: Targets, new: Targets, truth: np.ndarray) -> dict[str, float]:
        sel = new.selected
        # of all sample pairs put in one cluster, the share of one identity: the pairs a clustering of
        # singletons would newly join (each epoch clusters afresh, so the previous labels do not matter)
        precision = pair_precision(np.arange(int(sel.sum())), new.labels[sel], truth[sel])
        return {"outlier_fraction": float(1.0 - sel.mean()),
                **({} if precision is None else {"cluster_pair_precision": precision})}


METHOD = register(ClusterContrast())
