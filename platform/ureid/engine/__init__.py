"""One training stage and feature extraction, pure torch (DDP-aware): datasets, loaders, extract, train."""

from ureid.engine.datasets import ReidImageDataset, ReidVideoDataset, build_transforms, make_loader
from ureid.engine.extract import extract_features
from ureid.engine.train import build_optimizer, forward_batch, step_lr, train_epoch

__all__ = ["ReidImageDataset", "ReidVideoDataset", "build_transforms", "make_loader", "extract_features",
           "train_epoch", "build_optimizer", "step_lr", "forward_batch"]
