"""What a method is: the hooks the runtime calls, and the typed contracts between them.

A method is one module under :mod:`ureid.methods` holding one :class:`Method` subclass, registered in
:data:`ureid.methods.METHODS` with :func:`ureid.methods.register`. The runtime
(:mod:`ureid.runtime`) knows no method: it calls these hooks, in this order, and nothing else.

Driver, once per run:
    ``Settings``                 pydantic model of the config's ``clustering`` block
    ``prepare(cfg)``             before anything is read (e.g. generate a synthetic source set)
    ``load_data(cfg, data)``     add what the method trains on besides the real images (fakes, a source)
    ``num_stages(cfg, data)``    the schedule's length
Train workers, once, then every stage:
    ``build_model(cfg)``         the network (default: the ``model`` block's ReidNet)
    ``begin(worker)``            before stage 0 (PUL: source pre-training); returns a checkpointed state
    ``start_stage(worker, ...)`` before each stage's training (PUL: restart from the original model)
    ``recipe(cfg, stage)``       epochs, learning rate and its step for this stage
    ``build_loss(...)``          the stage's loss module (a fresh memory table, a new classifier)
    ``train_dataset(...)``       the samples the stage trains on, with their pseudo labels
    ``build_optimizer(...)``     the stage's optimizer (default: SGD afresh; ``persistent_optimizer``
                                 hands it the previous stage's state, also across a resume)
    ``train_loader(...)``        each epoch's batches (default: a seeded shuffle sharded over ranks)
Feature store, after each stage:
    ``update(cfg, features, targets, ctx)``  the new targets: pure, calls :mod:`ureid.clustering`
    ``diagnostics(old, new, truth)``          metrics from the ground truth; never reaches ``update``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
from ..config import MethodSettings as Settings  # unknown keys are errors; path_fields are made absolute
from ..data.records import Record, known_identities


@dataclass(frozen=True)
class Targets:
    """What a stage trains on, as produced by an update (or the method's initial targets).

    ``labels`` (N,) int64: one class per training sample; ``neighbors`` (N, k) int64: each sample's reliable
    neighbours (SSL); ``selected`` (N,) bool: the samples trained on (PUL; None = all); ``centroids``
    (C, d) float32: cluster centres for a memory initialised from them.
    """

    labels: np.ndarray
    neighbors: np.ndarray | None = None
    selected: np.ndarray | None = None
    centroids: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        labels = self.labels if self.selected is None else self.labels[self.selected]
        return int(np.unique(labels).size)


@dataclass(frozen=True, slots=True)
class UpdateContext:
    """Everything an update may use besides features and targets. Ground-truth identities are not here:
    ``known_labels`` is -1 everywhere unless the method asked for known identities (PUL's semi-supervised
    variant), and then holds the true identity only for the samples of those identities."""

    stage: int
    seed: int
    num_real: int                       # N0: real training samples (camstyle fakes come after them)
    cameras: np.ndarray                 # (N,) 0-based camera of each sample (free with the files)
    is_fake: np.ndarray | None = None   # (N,) bool, camstyle fakes; None when there are none
    parts: np.ndarray | None = None     # (N, p, C) stripe features when the method needs parts
    known_labels: np.ndarray | None = None
    map_blocks: Callable | None = None  # runs independent row blocks in parallel (see ureid.clustering)
    # the update may overwrite ``features`` and ``parts`` (the store's gathered copies, which it reads again
    # from the shard files afterwards): l2_normalise(..., overwrite=True) then needs no second copy
    features_writable: bool = False
    # the torch device the update computes on (the clustering code's torch path: "cuda" in a store with a GPU
    # share, ``ray.store_gpus``); None: the CPU path (NumPy/faiss, row blocks through ``map_blocks``)
    device: str | None = None


@dataclass
class RunData:
    """The samples of one run, read and checked once in the driver and shipped to the workers.

    ``train`` holds the real training images first (indices ``0..num_real-1``), then whatever
    :meth:`Method.load_data` added (camstyle fakes). ``extra`` is the method's own (support sets, a source).
    """

    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    num_real: int
    extra: dict[str, Any] = field(default_factory=dict)
    validation_query: list[Record] = field(default_factory=list)    # schedule.validation: another labeled
    validation_gallery: list[Record] = field(default_factory=list)  # dataset, to select stages on

    def __len__(self) -> int:
        return len(self.train)

    @property
    def cameras(self) -> np.ndarray:
        return np.array([r.camid for r in self.train], dtype=np.int64)

    @property
    def is_fake(self) -> np.ndarray | None:
        fake = np.array([r.is_fake for r in self.train], dtype=bool)
        return fake if fake.any() else None

    def identities(self) -> np.ndarray | None:
        """Ground truth from the file names: for diagnostics and evaluation only. None when some training
        image's identity is unknown (an unlabeled folder; camstyle's fakes carry their source's): no diagnostic
        is then measured."""
        return known_identities(self.train)


@dataclass(frozen=True)
class Recipe:
    """One stage's optimisation: ``epochs`` at ``lr``, divided by 10 every ``lr_step`` epochs (None: constant)."""

    epochs: int
    lr: float
    lr_step: int | None


@dataclass
class Worker:
    """What the runtime hands a method inside a train worker."""

    cfg: Any                 # ureid.config.Config
    model: Any               # the (DDP-wrapped) ReidNet
    device: Any
    rank: int
    world_size: int
    data: RunData
    log: Callable[[str], None]            # prints once (rank 0)
    progress: Callable[[dict], None]      # train_epoch's progress callback
    log_every: int                        # batches between progress calls
    evaluate: Callable[[], dict]          # mAP/rank-k on query/gallery, the same numbers on every rank
    # announce(label, epochs, batches_per_epoch): training outside the stages (PUL's source pre-training) shown
    # on the driver as a bar named label, fed by ``progress``; nothing where the driver draws no progress
    announce: Callable[[str, int, int], None] = lambda label, epochs, batches: None

    @property
    def net(self):
        return self.model.module if hasattr(self.model, "module") else self.model


@dataclass
class Preparation:
    """What :meth:`Method.begin` returns: ``state`` is checkpointed and handed back to :meth:`Method.start_stage`
    (also after a resume); ``metrics`` are logged with stage 0."""

    state: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


class Method:
    """Defaults for a method that trains on every sample with a memory-table loss; override what differs."""

    name: ClassVar[str]
    Settings: ClassVar[type[Settings]]
    #: Ray Tune search space over dotted config keys, e.g. ``{"clustering.size_penalty": {"loguniform": [1e-4, 0.05]}}``.
    search_space: ClassVar[dict[str, dict]] = {}
    #: ``clustering`` keys shown in comparison tables.
    key_settings: ClassVar[tuple[str, ...]] = ()
    #: Whether the update uses stripe (part) features.
    needs_parts: ClassVar[bool] = False
    #: Whether the optimizer's state (e.g. Adam's moments) carries over from stage to stage, and so is
    #: checkpointed with the model; False: every stage starts a fresh optimizer (BUC's recipe).
    persistent_optimizer: ClassVar[bool] = False

    # -- driver ------------------------------------------------------------------------------------
    def prepare(self, cfg) -> None:
        """Before any data is read, in the driver (checked paths, generated inputs)."""

    def load_data(self, cfg, data: RunData) -> RunData:
        return data

    def num_stages(self, cfg, data: RunData) -> int:
        raise NotImplementedError

    def embedding_dim(self, cfg) -> int:
        """Size of the model's embedding head; 0 for none."""
        return cfg.model.embedding_dim

    def initial_targets(self, cfg, data: RunData) -> Targets | None:
        """Stage 0's targets; None: cluster the features of the prepared model first (see :meth:`begin`)."""
        return Targets(labels=np.arange(len(data), dtype=np.int64))

    def known_identities(self, cfg, stage: int, seed: int, identity_pool: np.ndarray) -> np.ndarray:
        """Identities whose labels the user gives the update at ``stage`` (semi-supervised variants); none."""
        return np.empty(0, dtype=np.int64)

    # -- train workers ---------------------------------------------------------------------------
    def build_model(self, cfg, **overrides):
        """The network every worker trains, from the ``model`` block (``overrides``: single keys, e.g.
        ``weights="none"`` before a checkpoint is loaded)."""
        from ..models.backbone import ReidNet

        return ReidNet.from_config(cfg.model, embedding_dim=self.embedding_dim(cfg), **overrides)

    def begin(self, worker: Worker) -> Preparation:
        return Preparation()

    def start_stage(self, worker: Worker, stage: int, state: dict) -> None:
        pass

    def recipe(self, cfg, stage: int) -> Recipe:
        t = cfg.train
        if stage == 0:
            return Recipe(t.first_stage_epochs, t.lr, t.first_stage_lr_step)
        return Recipe(t.stage_epochs, t.stage_lr, None)

    def build_loss(self, cfg, targets: Targets, num_samples: int, feature_dim: int):
        from ..models.losses import MemoryTable

        loss = MemoryTable(cfg.model.embedding_dim, temperature=cfg.loss.temperature)
        loss.reset(int(targets.labels.max()) + 1)
        return loss

    def train_dataset(self, cfg, data: RunData, targets: Targets):
        return labeled_dataset(cfg, data.train, targets.labels)

    def build_optimizer(self, worker: Worker, loss_fn, recipe: Recipe, stage: int, previous: dict | None = None):
        """The stage's optimizer over the model and the loss module's own parameters (PUL's classifier).

        Default: BUC's SGD (``train.momentum``, ``nesterov``, ``weight_decay``), the trunk at
        ``train.backbone_lr_mult``, built afresh every stage. ``previous`` is the state dict of the
        previous stage's optimizer (also after a resume) when :attr:`persistent_optimizer` is set, else None.
        The runtime sets each group's rate every epoch from ``recipe`` times the group's ``lr_mult``.
        """
        from ..engine.train import build_optimizer

        t = worker.cfg.train
        extra = [p for p in loss_fn.parameters() if p.requires_grad]
        return build_optimizer(worker.net, extra, recipe.lr, t.backbone_lr_mult, t.momentum, t.weight_decay,
                               t.nesterov)

    def train_loader(self, worker: Worker, dataset, stage: int, epoch: int):
        """One epoch's batches ``(images, targets, indices, camids)`` for this rank; needs ``len()``.

        Default: a permutation seeded from ``(seed, stage, epoch)``, every ``world_size``-th sample per rank,
        the last short batch dropped when every rank has a full one."""
        from ..engine.datasets import make_loader

        cfg = worker.cfg
        return make_loader(dataset, cfg.train.batch_size, shuffle=True, seed=cfg.seed * 1000 + stage, epoch=epoch,
                           num_workers=cfg.data.num_workers, rank=worker.rank, world_size=worker.world_size,
                           drop_last=len(dataset) >= cfg.train.batch_size * worker.world_size)

    # -- feature store ---------------------------------------------------------------------------
    def update(self, cfg, features: np.ndarray, targets: Targets, ctx: UpdateContext) -> Targets:
        raise NotImplementedError

    def diagnostics(self, cfg, old: Targets, new: Targets, truth: np.ndarray) -> dict[str, float]:
        """Label-quality metrics against the ground truth (logged, never used for training)."""
        precision = pair_precision(old.labels, new.labels, truth)
        return {} if precision is None else {"merge_precision": precision}


# ----------------------------------------------------------------------------- shared pieces


def l2_normalise(x: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """``x`` scaled to unit length along the last axis (float32), in row blocks; ``overwrite`` (an update
    whose ``ctx.features_writable``): in ``x`` itself when it is a writable C-contiguous float32 array."""
    from ..clustering._common import unit_rows

    return unit_rows(x, overwrite)


def pair_precision(old: np.ndarray, new: np.ndarray, pids: np.ndarray) -> float | None:
    """Fraction of the sample pairs newly joined by an update that share an identity.

    A diagnostic of merge quality: pairs in one new cluster minus pairs already together before, counted
    in O(N) from contingency counts. None when the update joined no pair.
    """

    def pairs(*keys):
        _, counts = np.unique(np.stack(keys, 1), axis=0, return_counts=True)
        return float((counts * (counts - 1) // 2).sum())

    joined = pairs(new) - pairs(old)
    if joined <= 0:
        return None
    same = pairs(new, pids) - pairs(old, pids)
    return same / joined


def labeled_dataset(cfg, records: list[Record], labels: np.ndarray, train: bool = True):
    """Images (or tracklets: ``seq_len`` ordered frames a draw) with their labels, the config's transforms."""
    from ..engine.datasets import ReidImageDataset, ReidVideoDataset, build_transforms

    d = cfg.data
    tf = build_transforms(d.height, d.width, train=train, color_jitter=d.color_jitter if train else 0.0)
    if d.is_video:
        return ReidVideoDataset(records, tf, labels=labels, seq_len=d.seq_len, mode="train")
    return ReidImageDataset(records, tf, labels=labels)
