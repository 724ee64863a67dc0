"""PUL: Fan et al., *Unsupervised Person Re-identification: Clustering and Fine-tuning*, TOMM 2018.

Starts from an *original model*: the backbone trained with a classifier on a labeled source dataset
(:meth:`PUL.begin`). Every iteration clusters the target's raw pooled features with k-means into K
clusters, keeps the reliable samples (cosine similarity to a cluster centre, the sample nearest its
centroid, above ``threshold``; the public code accepts any centre, the paper the sample's own), and
fine-tunes afresh *from the original model* with a new classifier over the selected samples only.
The semi-supervised variant adds ``labeled_ids_per_iteration`` known identities each iteration, as
classes of their own.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from .. import clustering
from ..config import DataConfig
from . import register
from .base import Method, Preparation, Recipe, RunData, Settings, Targets, UpdateContext, Worker, labeled_dataset

PosInt = Annotated[int, Field(ge=1)]


class PULSettings(Settings):
    num_clusters: PosInt = 750
    threshold: Annotated[float, Field(ge=-1, le=1)] = 0.85
    match: Literal["any", "own"] = "any"
    iterations: PosInt = 20
    source: DataConfig | None = None
    pretrain_epochs: PosInt = 60
    # The source pre-training may need other rates than the fine-tuning (train.lr, train.backbone_lr_mult),
    # e.g. a randomly initialised trunk learns at the full rate, a fine-tuned one at a tenth; null: the train.* value.
    pretrain_lr: Annotated[float, Field(gt=0)] | None = None
    pretrain_backbone_lr_mult: Annotated[float, Field(ge=0)] | None = None
    labeled_ids_per_iteration: Annotated[int, Field(ge=0)] = 0


def labeled_identities(identity_pool: np.ndarray, per_iteration: int, iteration: int, seed: int) -> np.ndarray:
    """The identities whose labels are known by ``iteration`` (0-based), ``per_iteration`` more each time,
    in a fixed order drawn from ``seed``."""
    pool = np.unique(identity_pool[identity_pool > 0])
    order = np.random.default_rng(seed).permutation(pool)
    return order[: min(pool.size, per_iteration * (iteration + 1))]


def pretrain_rates(cfg) -> tuple[float, float]:
    """Source pre-training's (lr, backbone_lr_mult): ``clustering.pretrain_*``, else the ``train.*`` value."""
    c = cfg.clustering
    lr = cfg.train.lr if c.pretrain_lr is None else c.pretrain_lr
    mult = cfg.train.backbone_lr_mult if c.pretrain_backbone_lr_mult is None else c.pretrain_backbone_lr_mult
    return lr, mult


class PUL(Method):
    name = "pul"
    Settings = PULSettings
    key_settings = ("num_clusters", "threshold", "match")
    search_space = {
        "clustering.num_clusters": {"randint": [40, 160]},   # k (the synthetic default has 80 identities)
        "clustering.threshold": {"uniform": [0.8, 0.95]},    # lambda
    }

    # -- driver --------------------------------------------------------------------------------
    def prepare(self, cfg) -> None:
        from ..data.run_data import ensure_synthetic

        if cfg.clustering.source is None:
            raise ValueError("pul needs clustering.source: the labeled source dataset of its original model")
        cfg.clustering.source.check_paths("clustering.source")
        ensure_synthetic(cfg.clustering.source, "clustering.source")

    def load_data(self, cfg, data: RunData) -> RunData:
        from ..data.run_data import load_split_dataset

        source_cfg = cfg.clustering.source
        data.extra["source"] = [r for r in load_split_dataset(source_cfg).train if r.pid >= 0]
        if not data.extra["source"]:
            raise ValueError(f"clustering.source: no training image of {source_cfg.name} at {source_cfg.root!r} has an "
                             "identity; PUL's original model is a classifier trained on a labeled source")
        if cfg.clustering.num_clusters > len(data.train):  # the update's k-means would quietly run with K = N
            raise ValueError(f"clustering.num_clusters={cfg.clustering.num_clusters} is more than the "
                             f"{len(data.train)} training images of {cfg.data.name} at {cfg.data.root!r}: k-means "
                             "needs K <= N, and PUL wants K near the identity count (750 on Market-1501)")
        if cfg.clustering.labeled_ids_per_iteration and data.identities() is None:
            raise ValueError("clustering.labeled_ids_per_iteration: the training images have no identities to give "
                             f"(data.name={cfg.data.name!r} without a pid); set it to 0 for unlabeled data")
        return data

    def num_stages(self, cfg, data: RunData) -> int:
        return cfg.clustering.iterations

    def embedding_dim(self, cfg) -> int:
        return 0  # the classifier sits on the pooled feature; an unused head would break DDP

    def initial_targets(self, cfg, data: RunData) -> None:
        return None  # the first clustering runs on the original model's features

    def known_identities(self, cfg, stage: int, seed: int, identity_pool: np.ndarray) -> np.ndarray:
        per = cfg.clustering.labeled_ids_per_iteration
        if not per:
            return np.empty(0, dtype=np.int64)
        return labeled_identities(identity_pool, per, stage + 1, seed)

    # -- train workers -------------------------------------------------------------------------
    def begin(self, worker: Worker) -> Preparation:
        """The original model: the backbone fine-tuned with a classifier on the labeled source."""
        from ..engine.datasets import make_loader
        from ..engine.train import build_optimizer, step_lr, train_epoch
        from ..models.losses import ClassifierHead

        cfg, net = worker.cfg, worker.net
        source = worker.data.extra["source"]
        _, labels = np.unique([r.pid for r in source], return_inverse=True)
        ds = labeled_dataset(cfg, source, labels)
        head = ClassifierHead(net.feature_dim, int(labels.max()) + 1, dropout=cfg.model.dropout).to(worker.device)
        lr, mult = pretrain_rates(cfg)
        opt = build_optimizer(net, head.parameters(), lr, mult, cfg.train.momentum, cfg.train.weight_decay,
                              cfg.train.nesterov)
        epochs = cfg.clustering.pretrain_epochs
        for epoch in range(epochs):
            step_lr(opt, epoch, lr, max(1, int(epochs * 0.8)))
            loader = make_loader(ds, cfg.train.batch_size, shuffle=True, seed=cfg.seed, epoch=1000 + epoch,
                                 num_workers=cfg.data.num_workers, rank=worker.rank, world_size=worker.world_size,
                                 drop_last=True)
            if epoch == 0:
                worker.announce("pre-training on the source", epochs,
                                min(len(loader), cfg.train.max_batches_per_epoch or len(loader)))
            out = train_epoch(worker.model, head, loader, opt, device=worker.device, epoch=epoch,
                              progress=worker.progress, log_every=worker.log_every,
                              max_batches=cfg.train.max_batches_per_epoch)
            worker.log(f"source pre-training epoch {epoch + 1}/{epochs} loss {out['loss']:.4f}")
        state = {"original_model": {k: v.detach().clone() for k, v in net.state_dict().items()}}
        metrics = {}
        if worker.data.query:  # the direct-transfer baseline PUL starts from, logged with stage 0
            scores = worker.evaluate()
            worker.log(f"source model on the target: mAP {scores['mAP']:.4f} rank1 {scores['rank1']:.4f}")
            metrics = {f"source_model_{k}": v for k, v in scores.items()}
        return Preparation(state=state, metrics=metrics)

    def start_stage(self, worker: Worker, stage: int, state: dict) -> None:
        worker.net.load_state_dict(state["original_model"])  # every iteration fine-tunes the original model

    def recipe(self, cfg, stage: int) -> Recipe:
        t = cfg.train  # each iteration is a first stage: it starts again from the original model
        return Recipe(t.first_stage_epochs, t.lr, t.first_stage_lr_step)

    def build_loss(self, cfg, targets: Targets, num_samples: int, feature_dim: int):
        from ..models.losses import ClassifierHead

        return ClassifierHead(feature_dim, targets.num_classes, dropout=cfg.model.dropout)

    def train_dataset(self, cfg, data: RunData, targets: Targets):
        keep = np.flatnonzero(targets.selected)  # the selected samples only, classes made contiguous
        _, labels = np.unique(targets.labels[keep], return_inverse=True)
        return labeled_dataset(cfg, [data.train[i] for i in keep], labels)

    # -- feature store ---------------------------------------------------------------------------
    def update(self, cfg, features, targets: Targets, ctx: UpdateContext) -> Targets:
        """k-means on raw pooled features, then keep the samples close to a cluster centre; known identities
        (semi-supervised variant) join under their own label, one class each after the cluster classes."""
        c = cfg.clustering
        k = min(c.num_clusters, len(features))
        raw = np.asarray(features, dtype=np.float32)
        labels = clustering.kmeans(raw, k, seed=ctx.seed + ctx.stage + 1, map_blocks=ctx.map_blocks, device=ctx.device)
        selected = clustering.select_reliable(raw, labels, c.threshold, match=c.match)
        if ctx.known_labels is not None and (ctx.known_labels >= 0).any():
            is_known = ctx.known_labels >= 0
            known = np.unique(ctx.known_labels[is_known])
            labels = labels.copy()
            labels[is_known] = k + np.searchsorted(known, ctx.known_labels[is_known])
            selected = selected | is_known
        if not selected.any():  # nothing to fine-tune on: refused here once, not in every train worker
            raise ValueError(f"no sample lies within clustering.threshold={c.threshold} (cosine) of its k-means "
                             f"centre ({k} clusters of {len(features)} samples): lower the threshold")
        return Targets(labels=labels, selected=selected)

    def diagnostics(self, cfg, old: Targets, new: Targets, truth: np.ndarray) -> dict[str, float]:
        return {"selected_fraction": float(new.selected.mean())}


METHOD = register(PUL())
