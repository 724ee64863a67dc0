"""One training stage and feature extraction, pure torch (DDP-aware): datasets, loaders, extract, train.

Names are resolved lazily: :mod:`ureid.engine.train` needs only torch, while datasets/extraction import
torchvision (seconds per spawned worker, as it pulls in torch._dynamo).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ReidImageDataset": "datasets", "ReidVideoDataset": "datasets", "build_transforms": "datasets",
    "make_loader": "datasets", "extract_features": "extract",
    "train_epoch": "train", "build_optimizer": "train", "step_lr": "train", "forward_batch": "train",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ureid.engine.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ureid.engine' has no attribute {name!r}")
