"""Backbone + heads (:mod:`.backbone`) and the memory-table / classifier losses (:mod:`.losses`)."""

from ureid.models.backbone import ReidNet, imagenet_weights_path
from ureid.models.losses import ClassifierHead, MemoryTable, RepelledLoss, SoftenedMemoryLoss

__all__ = ["ReidNet", "imagenet_weights_path", "MemoryTable", "RepelledLoss", "SoftenedMemoryLoss",
           "ClassifierHead"]
