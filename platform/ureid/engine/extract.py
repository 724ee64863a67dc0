"""Feature extraction: the unnormalised pooled trunk features (and SSL stripe features) of a record list.

Clustering and evaluation in BUC use the pooled ResNet output, L2-normalised by the caller. For video a
tracklet's feature is the mean of its frame features (BUC video code); frames of all tracklets are
batched together (so long tracklets are chunked for free) and averaged on the CPU in float64 with a
sequential ``index_add`` - deterministic, unlike atomics on a GPU.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ureid.data.records import Record
from ureid.engine.datasets import build_transforms, load_image, select_test_frames
from ureid.engine.train import unwrap


class _FrameDataset(Dataset):
    """Flat list of (image path, owner index) pairs."""

    def __init__(self, items: list[tuple[str, int]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, owner = self.items[i]
        return self.transform(load_image(path)), owner


@torch.no_grad()
def extract_features(model: torch.nn.Module, records: Sequence[Record], *, height: int, width: int,
                     batch_size: int = 64, num_workers: int = 0, device="cpu", video: bool = False,
                     max_frames: int | None = 256, parts: bool = False, progress=None) -> dict:
    """Return ``dict(pooled=(N, D) float32, parts=(N, p, C) float32 or None)``, unnormalised, one row per record.

    Image records use their first path; video records (``video=True``) average all their frames (at most
    ``max_frames``, evenly spaced). The model runs in eval mode without gradients; its previous train/eval
    mode is restored afterwards. ``progress``: optional ``progress(done, total)`` after each batch, counting
    images (frames for video records).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    net = unwrap(model)  # the bare model: a DDP forward would broadcast buffers and expect a backward
    if parts and getattr(net, "num_stripes", 0) <= 0:
        raise ValueError("parts=True needs a model built with num_stripes > 0")
    records = list(records)
    items = []
    for i, rec in enumerate(records):
        if not rec.paths:
            raise ValueError(f"record {i} has no image paths")
        if video:
            items += [(rec.paths[j], i) for j in select_test_frames(len(rec.paths), max_frames)]
        else:
            items.append((rec.path, i))
    loader = DataLoader(_FrameDataset(items, build_transforms(height, width, train=False)),
                        batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda")

    n = len(records)
    pooled_sum = part_sum = None
    counts = torch.zeros(n, dtype=torch.float64)
    was_training = net.training
    net.eval()
    done = 0
    try:
        for imgs, owner in loader:
            out = net(imgs.to(device, non_blocking=True))
            feats = out["pooled"].float().cpu()
            if pooled_sum is None:
                pooled_sum = torch.zeros(n, feats.shape[1], dtype=torch.float64)
            if video:
                pooled_sum.index_add_(0, owner, feats.double())
            else:
                pooled_sum[owner] = feats.double()
            if parts:
                p = out["parts"].float().cpu()
                if part_sum is None:
                    part_sum = torch.zeros(n, *p.shape[1:], dtype=torch.float64)
                if video:
                    part_sum.index_add_(0, owner, p.double())
                else:
                    part_sum[owner] = p.double()
            counts.index_add_(0, owner, torch.ones(len(owner), dtype=torch.float64))
            done += len(owner)
            if progress is not None:
                progress(done, len(items))
    finally:
        net.train(was_training)

    if pooled_sum is None:  # no records
        dim = getattr(net, "feature_dim", 0)
        return {"pooled": np.zeros((0, dim), np.float32), "parts": None}
    pooled = (pooled_sum / counts[:, None]).float().numpy()
    part_arr = (part_sum / counts[:, None, None]).float().numpy() if parts else None
    return {"pooled": pooled, "parts": part_arr}
