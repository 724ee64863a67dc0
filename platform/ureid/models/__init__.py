"""Backbone + heads (:mod:`.backbone`) and the memory-table / classifier losses (:mod:`.losses`).

Names are resolved lazily so that ``ureid.models.losses`` can be imported without torchvision (whose
import pulls in torch._dynamo and costs seconds in every spawned DDP/Ray worker).
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_EXPORTS = {
    "ReidNet": "backbone", "imagenet_weights_path": "backbone", "mobilenet_imagenet_weights_path": "backbone",
    "MemoryTable": "losses", "RepelledLoss": "losses", "SoftenedMemoryLoss": "losses", "ClassifierHead": "losses",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
