"""Parallel Ray tasks for the row blocks of a label update (the ``map_blocks`` executor of
:mod:`ureid.clustering`, handed to an update in :class:`ureid.methods.UpdateContext`).

Clustering capacity is reserved explicitly, so train workers can never take it: a block task asks for
no CPU and one unit of the custom resource ``ureid_cluster_slot``, which every node declares (a local
start declares one per core, ``cluster.yaml``'s start commands one per core of each node). While a stage's
update runs, its train workers wait for the targets, so the cores are free for the tasks; when workers
hold every CPU slot of the cluster the tasks still run (a task asking for a CPU would wait for a slot
freed only after the update it belongs to: the deadlock DESIGN.md reproduced). A sweep trial reserves
``ray.cluster_slots_per_trial`` slots in its own placement group and its tasks run there, so concurrent
trials neither starve nor block each other. Outside a trial, the tasks of an update are dealt over the nodes
that declare slots, in proportion to their slots (node affinity, soft: a node gone meanwhile hands its task to
another); Ray's ``SPREAD`` alone left every short task on one node now and then.
"""

from __future__ import annotations

import os

import ray

SLOT = "ureid_cluster_slot"

#: The environment of every process that runs a label update: the feature store and its block tasks
#: (merged with the job's ``runtime_env``). OpenBLAS (NumPy's BLAS, which does DBC's and SSL's products)
#: keeps its threads spinning for about 2^28 cycles after each call before they sleep, set when the library
#: loads; with ``ray.store_threads`` > 1 they held the cores that torch's top-k and the next product needed
#: (measured here: SSL's top-k took 0.50 s after NumPy's 2-thread products against 0.25 s with this set;
#: DBC's update at N = 12,936 on 2 threads 4.3 s -> 3.5 s, the same labels). 2^4 cycles, OpenBLAS's minimum,
#: puts them to sleep at once; waking them costs microseconds against a block product's milliseconds.
#: glibc gives each thread that allocates (the updates' thread pools, torch's and the BLAS's threads) an arena
#: of its own, up to 8 a core, and an update's freed temporaries stay in each; ``MALLOC_ARENA_MAX=1`` keeps
#: one heap that every thread reuses. Measured here at N = 77,616 on 2 threads: PUL's update alone peaked
#: 496 -> 331 MB above the matrix and kept 406 -> 153 MB after it; through the store, its own peak over a
#: fresh store 1,444 -> 978 MB (the matrix is 606 MB); the same times (PUL at 77,616, and DBC, PUL and
#: BUC at N = 12,936, in one process). A fixed ``MALLOC_MMAP_THRESHOLD_`` of 4 MB saved as much but made
#: PUL 20% slower (fresh pages for every large temporary). Read by glibc when the process starts, so it
#: must be in the env.
UPDATE_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4", "MALLOC_ARENA_MAX": "1"}


def local_resources() -> dict[str, float]:
    """What a local start (``ray.init()`` without an address, or the tests' cluster) declares."""
    return {SLOT: float(os.cpu_count() or 1)}


@ray.remote(num_cpus=0, runtime_env={"env_vars": UPDATE_ENV})
def _run_block(fn, shared, item):
    ctx = ray.get_runtime_context()
    pg = ray.util.get_current_placement_group()
    return ctx.get_node_id(), pg.id.hex() if pg is not None else None, fn(shared, item)


class RayBlockMap:
    """``map_blocks(fn, shared, items)``: ``fn(shared, item)`` for every item as parallel Ray tasks,
    ``shared`` put into the object store once (read zero-copy by every task); results in the order of
    ``items``. Counts the tasks, the nodes they ran on, and whether all ran inside ``placement_group``."""

    def __init__(self, placement_group=None):
        self.placement_group = placement_group
        self.tasks = 0
        self.nodes: set[str] = set()
        self.groups: set[str | None] = set()

    def _strategies(self, count: int) -> list:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

        if self.placement_group is not None:
            return [PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=0)] * count

        deal = slot_deal(ray.nodes())
        if not deal:
            return ["SPREAD"] * count
        return [NodeAffinitySchedulingStrategy(deal[(self.tasks + i) % len(deal)], soft=True) for i in range(count)]

    def __call__(self, fn, shared, items):
        ref = ray.put(shared)
        items = list(items)
        refs = [_run_block.options(num_cpus=0, resources={SLOT: 1}, scheduling_strategy=strategy).remote(fn, ref, item)
                for item, strategy in zip(items, self._strategies(len(items)))]
        out = ray.get(refs)
        self.tasks += len(refs)
        self.nodes.update(node for node, _, _ in out)
        self.groups.update(group for _, group, _ in out)
        return [result for _, _, result in out]

    def stats(self) -> dict[str, float]:
        """The stage's metrics: tasks, nodes, and 1.0 when every task ran inside the trial's reservation."""
        out = {"cluster_tasks": self.tasks, "cluster_nodes": len(self.nodes)}
        if self.placement_group is not None and self.tasks:
            out["cluster_tasks_reserved"] = float(self.groups == {self.placement_group.id.hex()})
        return out


def slot_deal(nodes: list[dict]) -> list[str]:
    """The order in which an update's tasks are dealt to the alive nodes of ``ray.nodes()``: one round per
    slot, each round over the nodes (sorted by id) that still have a slot, so a node gets tasks in
    proportion to the slots it declares."""
    slots = {n["NodeID"]: int(n["Resources"].get(SLOT, 0)) for n in nodes if n.get("Alive")}
    deal = []
    for r in range(max(slots.values(), default=0)):
        deal += [node for node in sorted(slots) if slots[node] > r]
    return deal


def check_cluster_slots(ray_cfg, need: float = 1) -> None:
    """Fail at start-up, not mid-stage, when the cluster declares too few clustering slots (none are used when
    the store's updates run on its GPU, ``ray.store_gpus``)."""
    if not ray_cfg.clustering_tasks or ray_cfg.store_gpus > 0:
        return
    have = ray.cluster_resources().get(SLOT, 0.0)
    if have < need:
        raise RuntimeError(
            f"the Ray cluster declares {have:g} '{SLOT}' resource units, this job needs {need:g} for its clustering "
            f"tasks: start every node with `ray start ... --resources '{{\"{SLOT}\": <cores>}}'` (cluster.yaml does), "
            f"or set ray.clustering_tasks=false to run the label updates inside the feature-store actor")
