"""The label update's k-NN row blocks as parallel Ray tasks: same labels as in-process, and no
deadlock when the train workers hold every CPU (the store then runs the blocks itself)."""

import time

import numpy as np
import ray

from ureid.clustering import bottom_up_merge
from ureid.config import CONFIG_DIR, load_config
from ureid.methods import METHODS, Targets
from ureid.runtime.feature_store import FeatureStore, StoreInputs
from ureid.runtime.tasks import RayBlockMap, block_map_if_cpus_free


def _features(n, d=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@ray.remote(num_cpus=1)
class _Holder:  # stands in for a train worker holding a CPU slot
    def ready(self):
        return True


def _wait_for_cpus(at_least):
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0.0) < at_least:
        assert time.time() < deadline, "Ray did not free the CPUs of killed actors"
        time.sleep(0.2)


def test_buc_blocks_as_ray_tasks_give_the_same_labels(ray_cluster):
    _wait_for_cpus(2)
    x, fake = _features(600), np.arange(600) % 3 == 0
    for is_fake in (None, fake):
        executor, stats = RayBlockMap(), {}
        ours = bottom_up_merge(x, np.arange(600), 250, 0.005, is_fake=is_fake, block_size=64,
                               map_blocks=executor, stats=stats)
        assert np.array_equal(ours, bottom_up_merge(x, np.arange(600), 250, 0.005, is_fake=is_fake, block_size=64))
        assert executor.tasks == stats["mapped_blocks"] >= 600 // 64


def test_feature_store_uses_tasks_only_when_a_cpu_is_free(ray_cluster, tmp_path):
    n = 5000  # two k-NN blocks of BUC's default 4096 rows
    cfg = load_config(CONFIG_DIR / "buc_cpu.yaml", ["clustering.merge_percent=0.05"])
    x = _features(n, d=32, seed=1)
    expected = bottom_up_merge(x, np.arange(n), int(0.05 * n), cfg.clustering.size_penalty)

    def update(stage):
        inputs = StoreInputs(num_samples=n, num_real=n, cameras=np.zeros(n, np.int64), is_fake=None, truth=None,
                             initial=Targets(labels=np.arange(n)), seed=0)
        store = FeatureStore.remote(METHODS["buc"], cfg, inputs, 1, str(tmp_path / f"s{stage}"))
        ray.get(store.forget_from.remote(0))
        ray.get(store.put.remote(0, 0, np.arange(n), x))
        result = ray.get(store.update.remote(0), timeout=180)
        ray.kill(store)
        return result

    _wait_for_cpus(2)
    free = update(0)
    assert free["info"]["cluster_tasks"] == 2
    assert np.array_equal(free["targets"].labels, expected)

    holders = [_Holder.remote() for _ in range(2)]  # every CPU slot taken, as by two train workers
    ray.get([h.ready.remote() for h in holders])
    try:
        assert block_map_if_cpus_free() is None
        busy = update(1)  # would hang if the store queued tasks for a CPU nobody frees
        assert busy["info"]["cluster_tasks"] == 0
        assert np.array_equal(busy["targets"].labels, expected)
    finally:
        for h in holders:
            ray.kill(h)
    _wait_for_cpus(1)
    assert isinstance(block_map_if_cpus_free(), RayBlockMap)
    assert block_map_if_cpus_free(enabled=False) is None
