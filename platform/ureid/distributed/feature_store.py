"""The feature-store actor: the global feature matrix of a stage and the method's label update.

Train workers put the features of their shard of the training set; once every shard is in, the
first worker to ask runs the method's update (pure :mod:`ureid.clustering` code) and every worker
gets the same result. When Ray has CPUs to spare, the update's k-NN row blocks (BUC, camstyle) run
as parallel Ray tasks (:mod:`.blocks`); otherwise in the actor. The actor asks for no CPU of its own
(``num_cpus=0``): train workers may hold every CPU slot of a small machine, and an actor waiting for
a slot would deadlock the stage.

Its state (the targets of each finished update) is written to ``state_dir`` after every update, and
a restarted actor (``max_restarts``) reloads it, so a crash of the actor loses no stage.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import ray

from .blocks import block_map_if_cpus_free


@ray.remote(num_cpus=0, max_restarts=2, max_task_retries=2)
class FeatureStore:
    def __init__(self, cfg_dict: dict, n: int, world_size: int, state_dir: str, meta: dict):
        from ..config import Config

        self.cfg = Config.model_validate(cfg_dict)
        self.n = n
        self.world_size = world_size
        self.meta = meta  # cameras, is_fake, n0, seed; pids for diagnostics and PUL's semi-supervised variant only
        self.state_path = Path(state_dir) / "feature_store.pkl"
        self.shards: dict[int, dict[int, tuple]] = {}
        self.results: dict[int, dict] = {}
        if self.state_path.exists():  # restarted after a crash: keep the finished updates
            self.results = pickle.loads(self.state_path.read_bytes())

    def put(self, stage: int, rank: int, indices: np.ndarray, pooled: np.ndarray, parts=None) -> int:
        self.shards.setdefault(stage, {})[rank] = (np.asarray(indices), pooled, parts)
        return len(self.shards[stage])

    def _gather(self, stage: int):
        shards = self.shards.get(stage, {})
        if len(shards) != self.world_size:
            raise RuntimeError(
                f"feature store: stage {stage} has features from {sorted(shards)} of {self.world_size} workers"
            )
        dim = next(iter(shards.values()))[1].shape[1]
        pooled = np.zeros((self.n, dim), dtype=np.float32)
        parts = None
        seen = np.zeros(self.n, dtype=bool)
        for idx, feats, part in shards.values():
            pooled[idx] = feats
            seen[idx] = True
            if part is not None:
                if parts is None:
                    parts = np.zeros((self.n,) + part.shape[1:], dtype=np.float32)
                parts[idx] = part
        if not seen.all():
            raise RuntimeError(f"feature store: stage {stage} is missing {int((~seen).sum())} samples")
        return pooled, parts

    def update(self, stage: int, targets: dict) -> dict:
        """Run the method's target update for ``stage`` once; later calls return the cached result."""
        if stage in self.results:
            return self.results[stage]
        from ..methods import METHODS, num_clusters, pair_precision

        method = METHODS[self.cfg.method]
        pooled, parts = self._gather(stage)
        start = time.perf_counter()
        blocks = block_map_if_cpus_free(self.cfg.ray.clustering_tasks)
        new = method.update(
            self.cfg, pooled, targets, self.meta["n0"], is_fake=self.meta.get("is_fake"),
            parts=parts, cameras=self.meta.get("cameras"), seed=self.meta.get("seed", 0), stage=stage,
            pids=self.meta.get("pids"), map_blocks=blocks,
        )
        info = {"cluster_time_s": time.perf_counter() - start, "num_clusters": num_clusters(new),
                "cluster_tasks": blocks.tasks if blocks is not None else 0}
        pids = self.meta.get("pids")
        if pids is not None and "neighbors" not in new:
            precision = pair_precision(targets["labels"], new["labels"], pids)
            if precision is not None and self.cfg.method != "pul":
                info["merge_precision"] = precision
        if pids is not None and "neighbors" in new:
            info["neighbor_precision"] = float((pids[new["neighbors"]] == pids[:, None]).mean())
        if "selected" in new:
            info["selected_fraction"] = float(new["selected"].mean())
        result = {"targets": new, "info": info}
        self.results[stage] = result
        self.shards.pop(stage, None)
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(self.results))
        tmp.replace(self.state_path)
        return result

    def forget_from(self, stage: int) -> None:
        """Drop cached updates from ``stage`` on: a resumed run recomputes them, it never replays them."""
        self.results = {s: r for s, r in self.results.items() if s < stage}

    def latest(self) -> dict | None:
        return self.results[max(self.results)] if self.results else None
