"""The methods, one module each, in a plain dict registry.

``METHODS[name]`` is an instance of a :class:`~ureid.methods.base.Method` subclass; its module holds all
of the method: settings schema, default search space, schedule, targets, update, loss, what it trains on,
its per-stage recipe and diagnostics. Add a method by writing a module and calling :func:`register`
(the runtime needs no edit)::

    from ureid.methods import Method, register
    register(MyMethod())
"""

from __future__ import annotations

from .base import (Method, Preparation, Recipe, RunData, Settings, Targets, UpdateContext, Worker,
                   l2_normalise, labeled_dataset, pair_precision)

METHODS: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` under ``method.name``; a second method of the same name is an error unless ``replace``."""
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method needs a name that is a Python identifier, got {name!r}")
    if not (isinstance(getattr(method, "Settings", None), type) and issubclass(method.Settings, Settings)):
        raise TypeError(f"method {name!r}: Settings must be a subclass of ureid.methods.Settings")
    if name in METHODS and not replace and METHODS[name] is not method:
        raise ValueError(f"a method named {name!r} is already registered ({type(METHODS[name]).__name__})")
    METHODS[name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a method; registered: {', '.join(sorted(METHODS))}") from None


from . import buc, camstyle, cluster_contrast, dbc, pul, ssl  # noqa: E402  (each registers itself)

__all__ = ["METHODS", "Method", "Preparation", "Recipe", "RunData", "Settings", "Targets", "UpdateContext",
           "Worker", "get_method", "l2_normalise", "labeled_dataset", "pair_precision", "register",
           "buc", "camstyle", "cluster_contrast", "dbc", "pul", "ssl"]
