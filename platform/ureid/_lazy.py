"""Lazy package exports: a name is imported from its submodule on first access (PEP 562), so importing
a light submodule (e.g. ``ureid.models.losses``) does not pay for torchvision in every spawned worker."""

from __future__ import annotations

import importlib


def lazy_getattr(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` resolving ``exports`` (name -> submodule of ``package``)."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
