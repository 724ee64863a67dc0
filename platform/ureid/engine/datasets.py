"""Torch datasets over :class:`~ureid.data.records.Record` lists, transforms and deterministic loaders.

Determinism: :func:`make_loader` fixes the sample order from ``(seed, epoch)`` and hands the same pair to
the dataset, which seeds each sample's random augmentation (crop, flip, video frame draw) from
``(seed, epoch, index)``. A batch's content therefore depends only on ``(seed, epoch)``, not on the number
of loader workers or on which worker loaded it.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from ureid.data.records import Record

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transforms(height: int, width: int, train: bool, color_jitter: float = 0.0) -> Callable:
    """BUC's preprocessing. Train: random-sized crop + horizontal flip; test: resize. Both ImageNet-normalised.

    BUC's ``RandomSizedRectCrop`` takes 64-100 % of the area at height/width ratio 2-3 and resizes to
    (height, width); torchvision's ``RandomResizedCrop`` with ``ratio`` = width/height in (1/3, 1/2) is the
    same family of crops.

    ``color_jitter`` > 0 (train only; not in BUC) adds ``ColorJitter`` with that brightness, contrast and
    saturation strength: a randomly initialised backbone otherwise learns each camera's colour cast.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be > 0, got {height}x{width}")
    if not 0.0 <= color_jitter < 1.0:
        raise ValueError(f"color_jitter must be in [0, 1) (brightness/contrast/saturation factor spread), got {color_jitter}")
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return T.Compose([
            T.RandomResizedCrop((height, width), scale=(0.64, 1.0), ratio=(1 / 3, 1 / 2),
                                interpolation=T.InterpolationMode.BILINEAR),
            T.RandomHorizontalFlip(),
            *([T.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter > 0 else []),
            *norm,
        ])
    return T.Compose([T.Resize((height, width), interpolation=T.InterpolationMode.BILINEAR), *norm])


def pad_crop_erase_transforms(height: int, width: int, color_jitter: float = 0.0) -> Callable:
    """Cluster Contrast's (and SpCL's) training preprocessing: resize (bicubic), horizontal flip, pad 10 and
    random crop back, ImageNet normalisation, then random erasing (p 0.5, area 2-40 %, aspect 0.3-3.3) that
    fills with the numbers of the ImageNet mean *in the normalised image*, as that code does.
    ``color_jitter`` as in :func:`build_transforms` (not in Cluster Contrast)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be > 0, got {height}x{width}")
    if not 0.0 <= color_jitter < 1.0:
        raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
    return T.Compose([
        T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.Pad(10),
        T.RandomCrop((height, width)),
        *([T.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter > 0 else []),
        T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        T.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 1 / 0.3), value=list(IMAGENET_MEAN)),
    ])


def load_image(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


# Domain tags keep the seeds of different uses apart (SeedSequence pads short key lists with zeros).
_ORDER, _AUGMENT, _FRAMES, _WORKERS = range(4)


def _derive_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer keys, the first one a domain tag."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


class _Seeded(Dataset):
    """Base: per-sample seeding of torch's RNG (torchvision transforms draw from it) without side effects."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.seed, self.epoch = int(seed), int(epoch)

    def _run_seeded(self, index: int, fn: Callable):
        # fork_rng restores the global RNG afterwards: with num_workers=0 this runs in the training
        # process, whose dropout must not depend on how many images were loaded.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_derive_seed(_AUGMENT, self.seed, self.epoch, index))
            return fn()


def _check_labels(labels, n: int):
    if labels is None:
        return None
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,):
        raise ValueError(f"labels must have one entry per record ({n}), got shape {labels.shape}")
    return labels


class ReidImageDataset(_Seeded):
    """Images of ``records``; item ``(image, label, index, camid)``.

    ``label`` is ``labels[index]`` (the pseudo label) when given, else the record's ``pid``.
    """

    def __init__(self, records: Sequence[Record], transform: Callable, labels=None):
        self.records = list(records)
        self.transform = transform
        self.labels = _check_labels(labels, len(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        # ``(index, draw)``: a sample drawn more than once per epoch (a clusters x instances sampler) gets
        # the augmentation of its draw, not the same crop every time.
        index, draw = index if isinstance(index, tuple) else (index, index)
        rec = self.records[index]
        img = self._run_seeded(draw, lambda: self.transform(load_image(rec.path)))
        label = int(self.labels[index]) if self.labels is not None else rec.pid
        return img, label, index, rec.camid


def select_test_frames(n: int, max_frames: int | None) -> np.ndarray:
    """All ``n`` frames, or ``max_frames`` evenly spaced ones for very long tracklets."""
    if max_frames is None or n <= max_frames:
        return np.arange(n)
    return np.linspace(0, n - 1, max_frames).round().astype(np.int64)


def select_train_frames(n: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """``seq_len`` frames in temporal order, drawn with replacement only when the tracklet is shorter (BUC)."""
    return np.sort(rng.choice(n, size=seq_len, replace=n < seq_len))


class ReidVideoDataset(_Seeded):
    """Tracklets of ``records`` (one record = one tracklet, ``paths`` = frames in temporal order).

    ``mode="train"``: ``seq_len`` frames per item, temporal order kept, -> (seq_len, C, H, W).
    ``mode="test"``: all frames (at most ``max_frames``, evenly spaced) -> (T, C, H, W), T varies per item.
    Item ``(frames, label, index, camid)`` as :class:`ReidImageDataset`.
    """

    def __init__(self, records: Sequence[Record], transform: Callable, seq_len: int = 16, mode: str = "train",
                 max_frames: int | None = 256, labels=None):
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        if max_frames is not None and max_frames <= 0:
            raise ValueError(f"max_frames must be > 0 or None, got {max_frames}")
        self.records = list(records)
        empty = [i for i, r in enumerate(self.records) if not r.paths]
        if empty:
            raise ValueError(f"{len(empty)} tracklet(s) have no frames, e.g. record indices {empty[:5]}")
        self.transform, self.seq_len, self.mode, self.max_frames = transform, seq_len, mode, max_frames
        self.labels = _check_labels(labels, len(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def frame_indices(self, index: int) -> np.ndarray:
        n = len(self.records[index].paths)
        if self.mode == "test":
            return select_test_frames(n, self.max_frames)
        rng = np.random.default_rng(_derive_seed(_FRAMES, self.seed, self.epoch, index))
        return select_train_frames(n, self.seq_len, rng)

    def __getitem__(self, index: int):
        rec = self.records[index]
        idx = self.frame_indices(index)
        # Each frame gets its own random crop/flip, as BUC's video preprocessing transforms frames one by one.
        frames = self._run_seeded(index, lambda: torch.stack([self.transform(load_image(rec.paths[i])) for i in idx]))
        label = int(self.labels[index]) if self.labels is not None else rec.pid
        return frames, label, index, rec.camid


class ShardSampler(Sampler[int]):
    """A fixed list of indices (this rank's shard of this epoch's order)."""

    def __init__(self, indices: Sequence[int]):
        self.indices = list(indices)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's sample order for ``epoch``: a permutation seeded from ``(seed, epoch)``, sharded like
    ``DistributedSampler`` (padded by wrapping around so every rank gets the same number of samples,
    hence the same number of batches and of memory all-gathers)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if shuffle:
        g = torch.Generator().manual_seed(_derive_seed(_ORDER, seed, epoch))
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    if world_size > 1:
        per_rank = -(-n // world_size)
        pad = per_rank * world_size - n
        order = order + (order * (pad // max(n, 1) + 1))[:pad]
        order = order[rank::world_size]
    return order


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator (base_seed + worker_id); mirror it into numpy and
    # random so that any third-party transform is deterministic too.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                num_workers: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                pin_memory: bool = False, collate_fn=None) -> DataLoader:
    """A loader whose order (and, for ureid datasets, augmentation) depends only on ``(seed, epoch)``.

    Build a new loader each epoch. With ``world_size > 1`` this rank gets every ``world_size``-th sample of
    the shared epoch order (see :func:`epoch_order`).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(seed, epoch)
    order = epoch_order(len(dataset), shuffle, seed, epoch, rank, world_size)
    g = torch.Generator().manual_seed(_derive_seed(_WORKERS, seed, epoch, rank))
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(order), num_workers=num_workers,
                      drop_last=drop_last, pin_memory=pin_memory, worker_init_fn=_worker_init, generator=g,
                      collate_fn=collate_fn, persistent_workers=False)


def cluster_instance_batches(labels, cameras, num_instances: int, batch_size: int, num_batches: int,
                             seed: int) -> np.ndarray:
    """Cluster Contrast's batches: ``RandomMultipleGallerySampler`` passes cut into full batches by an
    ``IterLoader`` of ``num_batches`` (its ``--iters``), as ``(num_batches, batch_size)`` sample indices.

    One pass visits every cluster once, in a random order: a random anchor, then ``num_instances - 1``
    members from *other cameras* than the anchor's (drawn without replacement only when there are at least
    ``num_instances`` of them, the code's condition), else other members of its own camera, else the anchor
    alone. A pass's last short batch is dropped (``drop_last``) and the next pass starts a new order.
    When a pass is shorter than one batch (fewer clusters than ``batch_size / num_instances``; the code
    stops there) the next pass continues it. ``labels`` are the pseudo labels of the training samples
    (>= 0), ``cameras`` their cameras; the draws depend only on ``seed``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    cameras = np.asarray(cameras, dtype=np.int64)
    if labels.ndim != 1 or labels.shape != cameras.shape:
        raise ValueError(f"labels and cameras must be 1-D of one length, got {labels.shape} and {cameras.shape}")
    if labels.size == 0 or labels.min() < 0:
        raise ValueError("cluster_instance_batches needs at least one sample and labels >= 0 (outliers removed)")
    if num_instances < 1 or batch_size < 1 or num_batches < 1:
        raise ValueError(f"num_instances, batch_size and num_batches must be >= 1, got "
                         f"{num_instances}, {batch_size}, {num_batches}")
    rng = np.random.default_rng(_derive_seed(_ORDER, seed))
    order = np.argsort(labels, kind="stable")
    clusters, starts = np.unique(labels[order], return_index=True)
    members = np.split(order, starts[1:])
    if len(labels) < batch_size:
        raise ValueError(f"{len(labels)} training samples cannot fill one batch of {batch_size}")
    batches: list[np.ndarray] = []
    carry: list = []
    while len(batches) < num_batches:
        draws = carry
        for c in rng.permutation(len(clusters)):
            idx = members[c]
            anchor = idx[rng.integers(len(idx))]
            draws.append(anchor)
            others = idx[cameras[idx] != cameras[anchor]]
            if others.size == 0:
                others = idx[idx != anchor]
            if others.size:
                draws.extend(rng.choice(others, size=num_instances - 1, replace=others.size < num_instances))
        full = len(draws) // batch_size
        if full == 0:
            # Fewer clusters than a batch needs (the code's IterLoader would stop here): the next pass
            # continues this one instead of being dropped.
            carry = draws
            continue
        carry = []
        draws = np.asarray(draws, dtype=np.int64)
        batches.extend(draws[: full * batch_size].reshape(full, batch_size))
    return np.stack(batches[:num_batches])


def make_batch_loader(dataset: Dataset, batches: np.ndarray, seed: int = 0, epoch: int = 0, num_workers: int = 0,
                      rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """A loader over fixed global ``batches`` (``(num_batches, global_batch)`` indices): rank ``r`` takes the
    ``r``-th contiguous slice of every batch, so the global batch is the same for any worker count. Each
    draw gets its own augmentation (seeded from ``(seed, epoch, position of the draw)``)."""
    batches = np.asarray(batches, dtype=np.int64)
    if batches.ndim != 2 or batches.shape[1] % world_size:
        raise ValueError(f"batches must be (num_batches, global_batch) with global_batch divisible by "
                         f"world_size={world_size}, got {batches.shape}")
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(seed, epoch)
    per = batches.shape[1] // world_size
    keys = np.arange(batches.size).reshape(batches.shape)
    mine = [list(zip(b[rank * per:(rank + 1) * per].tolist(), k[rank * per:(rank + 1) * per].tolist()))
            for b, k in zip(batches, keys)]
    g = torch.Generator().manual_seed(_derive_seed(_WORKERS, seed, epoch, rank))
    return DataLoader(dataset, batch_sampler=mine, num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=_worker_init, generator=g, persistent_workers=False)
