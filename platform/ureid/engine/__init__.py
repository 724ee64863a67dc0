"""One training stage and feature extraction, pure torch (DDP-aware): datasets, loaders, extract, train.

Names are resolved lazily: :mod:`ureid.engine.train` needs only torch, while datasets/extraction import
torchvision (seconds per spawned worker, as it pulls in torch._dynamo).
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_EXPORTS = {
    "ReidImageDataset": "datasets", "ReidVideoDataset": "datasets", "build_transforms": "datasets",
    "make_loader": "datasets", "extract_features": "extract", "evaluate_model": "evaluate",
    "seed_everything": "seeding",
    "train_epoch": "train", "build_optimizer": "train", "step_lr": "train", "forward_batch": "train",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
