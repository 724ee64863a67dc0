"""Backbone + heads (:mod:`.backbone`) and the memory-table / classifier losses (:mod:`.losses`).

Names are resolved lazily so that ``ureid.models.losses`` can be imported without torchvision (whose
import pulls in torch._dynamo and costs seconds in every spawned DDP/Ray worker).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ReidNet": "backbone", "imagenet_weights_path": "backbone",
    "MemoryTable": "losses", "RepelledLoss": "losses", "SoftenedMemoryLoss": "losses", "ClassifierHead": "losses",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ureid.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ureid.models' has no attribute {name!r}")
