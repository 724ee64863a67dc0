"""Parallel Ray tasks for the row blocks of a label update (the ``map_blocks`` executor of
:mod:`ureid.clustering`, handed to an update in :class:`ureid.methods.UpdateContext`).

The feature-store actor hands one out when the cluster has a CPU to spare. When the train workers hold
every CPU slot (one machine, workers sized to it) a task would wait for a slot that is only freed after
the update it belongs to: a deadlock. Then no executor is given and the update runs its blocks in the
actor, with the same result.
"""

from __future__ import annotations

import ray


@ray.remote(num_cpus=1)
def _run_block(fn, shared, item):
    return fn(shared, item)


class RayBlockMap:
    """``map_blocks(fn, shared, items)``: ``fn(shared, item)`` for every item as parallel Ray tasks,
    ``shared`` put into the object store once; results in the order of ``items``."""

    def __init__(self):
        self.tasks = 0

    def __call__(self, fn, shared, items):
        ref = ray.put(shared)
        refs = [_run_block.remote(fn, ref, item) for item in items]
        self.tasks += len(refs)
        return ray.get(refs)


def block_map_if_cpus_free(enabled: bool = True) -> RayBlockMap | None:
    """A :class:`RayBlockMap` when Ray has at least one CPU free right now, else None (run in-process)."""
    if not enabled:
        return None
    return RayBlockMap() if ray.available_resources().get("CPU", 0.0) >= 1.0 else None
