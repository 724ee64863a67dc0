"""The label update's k-NN row blocks as parallel Ray tasks: same labels as in-process, and no deadlock
when the train workers hold every CPU (the tasks run on reserved clustering slots, not on CPUs); inside a
placement group that holds slots (a sweep trial's reservation) they run there."""

import os
import time

import numpy as np
import pytest
import ray
from conftest import assert_scores_close

from ureid.clustering import bottom_up_merge
from ureid.config import CONFIG_DIR, load_config
from ureid.evaluation.label_free import label_free_scores
from ureid.methods import METHODS, Targets, UpdateContext
from ureid.runtime.feature_store import FeatureStore, StoreInputs
from ureid.runtime.tasks import SLOT, UPDATE_ENV, RayBlockMap, check_cluster_slots


def _features(n, d=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@ray.remote(num_cpus=1)
class _Holder:  # stands in for a train worker holding a CPU slot
    def ready(self):
        return True


@ray.remote(num_cpus=1)
def _plain_cpu_task():
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


def test_dbc_candidate_blocks_as_ray_tasks_give_the_same_labels(ray_cluster, monkeypatch):
    from ureid.clustering import dbc, dispersion_merge

    monkeypatch.setattr(dbc, "_MAP_MIN_CLUSTERS", 0)  # fan out even at this size

    x = _features(900, d=24, seed=2)
    for update_weight in (0.0, 0.5):
        executor, stats = RayBlockMap(), {}
        ours = dispersion_merge(x, np.arange(900), 300, update_weight, map_blocks=executor, stats=stats)
        assert np.array_equal(ours, dispersion_merge(x, np.arange(900), 300, update_weight))
        assert executor.tasks == stats["mapped_blocks"] >= 8 and executor.stats()["cluster_nodes"] == 2


def test_feature_store_tasks_run_while_train_workers_hold_every_cpu(ray_cluster, tmp_path):
    from ray.util.placement_group import placement_group, remove_placement_group

    n = 5000  # two k-NN blocks of BUC's default 4096 rows
    cfg = load_config(CONFIG_DIR / "buc_cpu.yaml", ["clustering.merge_percent=0.05"])
    x = _features(n, d=32, seed=1)
    expected = bottom_up_merge(x, np.arange(n), int(0.05 * n), cfg.clustering.size_penalty)

    def update(stage, pg=None, config=cfg):
        inputs = StoreInputs(num_samples=n, num_real=n, cameras=np.zeros(n, np.int64), is_fake=None, truth=None,
                             initial=Targets(labels=np.arange(n)), seed=0)
        store = FeatureStore.remote(METHODS["buc"], config, inputs, 1, str(tmp_path / f"s{stage}"), pg)
        ray.get(store.forget_from.remote(0))
        ray.get(store.put.remote(0, 0, np.arange(n), x))
        result = ray.get(store.update.remote(0), timeout=180)
        ray.kill(store)
        return result

    _wait_for_cpus(2)
    holders = [_Holder.remote() for _ in range(2)]  # every CPU slot taken, as by two train workers
    ray.get([h.ready.remote() for h in holders])
    try:
        assert ray.available_resources().get("CPU", 0.0) == 0.0
        plain = _plain_cpu_task.remote()  # the control: a task asking for a CPU waits while workers hold them
        assert ray.wait([plain], timeout=5)[1] == [plain]
        ray.cancel(plain, force=True)
        busy = update(0)  # a task asking for a CPU would wait for ever here
        assert busy["info"]["cluster_tasks"] == 2 and busy["info"]["cluster_nodes"] == 2
        assert np.array_equal(busy["targets"].labels, expected)
        assert "cluster_tasks_reserved" not in busy["info"]

        pg = placement_group([{SLOT: 1}])  # a trial's reservation: one slot of the cluster's two
        ray.get(pg.ready(), timeout=30)
        try:
            inside = update(1, pg)
        finally:
            remove_placement_group(pg)
        assert inside["info"]["cluster_tasks"] == 2 and inside["info"]["cluster_tasks_reserved"] == 1.0
        assert np.array_equal(inside["targets"].labels, expected)

        off = update(2, config=load_config(CONFIG_DIR / "buc_cpu.yaml",
                                           ["clustering.merge_percent=0.05", "ray.clustering_tasks=false"]))
        assert off["info"]["cluster_tasks"] == 0 and np.array_equal(off["targets"].labels, expected)
    finally:
        for h in holders:
            ray.kill(h)


def test_too_few_clustering_slots_is_a_clear_error(ray_cluster):
    cfg = load_config(CONFIG_DIR / "buc_cpu.yaml")
    check_cluster_slots(cfg.ray, 4)  # the test cluster declares two on each of its two nodes
    with pytest.raises(RuntimeError, match=r"declares 4 'ureid_cluster_slot'.*needs 5.*--resources"):
        check_cluster_slots(cfg.ray, 5)
    check_cluster_slots(load_config(CONFIG_DIR / "buc_cpu.yaml", ["ray.clustering_tasks=false"]).ray, 5)


def test_a_worker_group_the_cluster_cannot_hold_is_refused_on_a_fixed_instance(ray_cluster, capsys):
    """Ray Train waits forever for a worker group that does not fit (check_worker_group). The test cluster:
    two nodes of 1 CPU, one (declared) GPU on the second. A worker's CPUs must fit on one node, so 2 CPUs each
    fit nowhere although the cluster has 2; a joined cluster (it may autoscale) gets a warning, a fixed one the
    error."""
    import ray

    from ureid.config import ConfigError
    from ureid.runtime.job import check_worker_group, workers_that_fit

    nodes = ray.nodes()
    assert workers_that_fit(nodes, 1, False) == 2 and workers_that_fit(nodes, 0.5, False) == 4
    assert workers_that_fit(nodes, 2, False) == 0 and workers_that_fit(nodes, 1, True) == 1

    def ray_cfg(*sets):
        return load_config(CONFIG_DIR / "buc_cpu.yaml", list(sets)).ray

    check_worker_group(ray_cfg("ray.num_workers=2", "ray.cpus_per_worker=1"), fixed=True)  # the tests' own runs
    with pytest.raises(ConfigError) as err:
        check_worker_group(ray_cfg("ray.num_workers=1", "ray.cpus_per_worker=2"), fixed=True)
    msg = str(err.value)
    assert "ray.num_workers=1 train workers of 2 CPU each" in msg and "2 node(s) (1 CPU, 1 CPU) hold only 0" in msg
    assert "Lower ray.num_workers or ray.cpus_per_worker" in msg
    check_worker_group(ray_cfg("ray.num_workers=1", "ray.cpus_per_worker=1", "ray.use_gpu=true"), fixed=True)
    with pytest.raises(ConfigError, match=r"of 1 CPU and 1 GPU each.*hold only 1 .*ray.use_gpu=false"):
        check_worker_group(ray_cfg("ray.num_workers=2", "ray.cpus_per_worker=1", "ray.use_gpu=true"), fixed=True)
    capsys.readouterr()
    check_worker_group(ray_cfg("ray.num_workers=3", "ray.cpus_per_worker=1"), fixed=False)
    out = capsys.readouterr().out
    assert "[ureid] warning: ray.num_workers=3" in out and "hold only 2" in out and "autoscaler" in out


def test_the_stores_gpu_share_is_counted_at_start_up(ray_cluster):
    """``ray.store_gpus``: the feature store's GPU share is reserved like a worker's GPU, so the worker group must
    fit beside it (the second test node declares one GPU): a fixed cluster without room is refused with the keys.
    A store on its GPU uses no clustering slots, so their check passes whatever it would ask."""
    from ureid.config import ConfigError
    from ureid.runtime.job import check_worker_group, workers_that_fit

    def ray_cfg(*sets):
        return load_config(CONFIG_DIR / "buc_cpu.yaml", ["ray.cpus_per_worker=1", *sets]).ray

    nodes = [n for n in ray.nodes() if n["Alive"]]  # a node that tests/test_faults.py took away stays listed
    no_gpu = [n for n in nodes if not n["Resources"].get("GPU")]
    assert len(no_gpu) == 1
    assert workers_that_fit(nodes, 1, False, 1.0) == 2  # the share takes no CPU
    assert workers_that_fit(nodes, 1, True, 0.5) == 0   # half a GPU is left: no whole one for a worker
    assert workers_that_fit(no_gpu, 1, False, 0.5) == -1
    check_worker_group(ray_cfg("ray.num_workers=2", "ray.store_gpus=1"), fixed=True)
    with pytest.raises(ConfigError) as err:
        check_worker_group(ray_cfg("ray.num_workers=1", "ray.use_gpu=true", "ray.store_gpus=0.5"), fixed=True)
    msg = str(err.value)
    assert "of 1 CPU and 1 GPU each" in msg  # the nodes in ray.nodes()'s order, which varies:
    assert "(1 CPU 0 GPU, 1 CPU 1 GPU)" in msg or "(1 CPU 1 GPU, 1 CPU 0 GPU)" in msg
    assert "hold only 0 beside the feature store's GPU share (ray.store_gpus=0.5)" in msg
    assert "Set ray.store_gpus=0 (the updates on CPU) or a share that fits, or lower ray.num_workers" in msg
    with pytest.raises(ConfigError, match=r"ray.store_gpus=1 asks a GPU share for the feature store, but none of "
                                          r"the Ray cluster's 1 node\(s\) \(1 CPU 0 GPU\) has 1 GPU\. Set ray.store_gpus=0"):
        check_worker_group(ray_cfg("ray.store_gpus=1"), fixed=True, nodes=no_gpu)
    with pytest.raises(ConfigError, match=r"hold only 0 beside .*\. Lower ray.num_workers"):  # the CPUs are short
        check_worker_group(ray_cfg("ray.num_workers=1", "ray.cpus_per_worker=2", "ray.store_gpus=1"), fixed=True)
    check_cluster_slots(ray_cfg("ray.store_gpus=1"), 99)
    with pytest.raises(RuntimeError, match="needs 99"):
        check_cluster_slots(ray_cfg(), 99)


def test_a_store_given_a_gpu_share_runs_its_update_on_it_or_fails_the_run_at_once(ray_cluster, tiny_root, tmp_path):
    """A run with ``ray.store_gpus=1`` creates the store with that share before the trainer starts. On the test
    cluster the only GPU is the second node's declared one, and Ray hands it to the store (CUDA_VISIBLE_DEVICES
    '0'); without CUDA there the store's start fails, and with it the run, at once and with the reason (the
    MLflow run FAILED with it, no trainer started). With CUDA (a GPU machine) the run finishes, its updates on
    the GPU: no clustering task, ``store_gpu`` logged."""
    import torch
    from mlflow.tracking import MlflowClient
    from test_pipeline import tiny_cfg

    from ureid.runtime.experiment import run_experiment

    out = tmp_path / "out"
    cfg = tiny_cfg("buc", tiny_root, out, "ray.store_gpus=1", "ray.max_failures=0", "tracking.pictures=false")
    if torch.cuda.is_available():
        summary = run_experiment(cfg, quiet=True)
        assert all(h["store_gpu"] == 1.0 and h["cluster_tasks"] == 0 for h in summary["history"])
        return
    with pytest.raises(ray.exceptions.RayActorError) as err:
        run_experiment(cfg, quiet=True)
    msg = str(err.value)
    assert "ray.store_gpus=1: Ray gave the feature store a GPU share on node" in msg
    assert "torch there sees no CUDA device" in msg and "CUDA_VISIBLE_DEVICES='0'" in msg and "ray.store_gpus=0" in msg
    (run_dir,) = out.glob("buc-*")
    assert not (run_dir / "ray").exists(), "the trainer started"
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("test-buc").experiment_id])
    assert run.info.status == "FAILED" and "torch there sees no CUDA device" in run.data.tags["error"]


def test_cluster_contrast_update_through_the_store_fans_out_and_gives_the_same_labels(ray_cluster, tmp_path):
    """Cluster Contrast's k-NN blocks (the Jaccard distance's only O(N^2 d) part) as Ray tasks from the
    feature store: the same Jaccard matrix and DBSCAN labels as in-process."""
    from ureid.clustering import dbscan, kreciprocal_jaccard

    # directly through the clustering seam, several small blocks
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(30, 16))
    x = centres[np.arange(600) % 30] + 0.35 * rng.normal(size=(600, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    executor, stats = RayBlockMap(), {}
    ours = kreciprocal_jaccard(x, 15, 4, max_distance=0.6, block_size=64, map_blocks=executor, stats=stats)
    plain = kreciprocal_jaccard(x, 15, 4, max_distance=0.6, block_size=64)
    assert executor.tasks == stats["mapped_blocks"] == -(-600 // 64)
    assert np.array_equal(ours.indptr, plain.indptr) and np.array_equal(ours.indices, plain.indices)
    assert np.array_equal(ours.data, plain.data)
    assert (dbscan(ours, 0.6, 4) >= 0).sum() > 300

    # and as the method runs it from the store: 5000 rows are two k-NN blocks of the default 4096
    n = 5000
    cfg = load_config(CONFIG_DIR / "cluster_contrast_cpu.yaml", ["clustering.eps=0.4"])  # leaves outliers here
    centres = rng.normal(size=(250, 32))
    feats = centres[np.arange(n) % 250] + 0.3 * rng.normal(size=(n, 32))
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
    expected = METHODS["cluster_contrast"].update(
        cfg, feats, None, UpdateContext(stage=0, seed=0, num_real=n, cameras=np.zeros(n, np.int64)))
    _wait_for_cpus(2)
    inputs = StoreInputs(num_samples=n, num_real=n, cameras=np.zeros(n, np.int64), is_fake=None, truth=None,
                         initial=Targets(labels=np.arange(n)), seed=0)
    store = FeatureStore.remote(METHODS["cluster_contrast"], cfg, inputs, 1, str(tmp_path / "cc"), None)
    try:
        ray.get(store.forget_from.remote(0))
        ray.get(store.put.remote(0, 0, np.arange(n), feats))
        result = ray.get(store.update.remote(0), timeout=180)
    finally:
        ray.kill(store)
    assert result["info"]["cluster_tasks"] == 2 and result["info"]["cluster_nodes"] == 2
    got = result["targets"]
    assert np.array_equal(got.labels, expected.labels) and np.array_equal(got.selected, expected.selected)
    assert 0 < got.selected.sum() < n  # clusters found, and some outliers left out of training
    np.testing.assert_array_equal(got.centroids, expected.centroids)


@pytest.mark.parametrize("method", ["buc", "dbc", "ssl", "pul"])
def test_each_methods_update_through_the_store_spreads_over_both_nodes(method, ray_cluster, tmp_path):
    """The test session's cluster has two nodes: every method's label update, run by the feature store as it
    runs in a stage, deals its row blocks (PUL: its k-means restarts) to both, and gives the in-process targets.
    N = 5000 is two blocks for BUC's k-NN and SSL's neighbours and 5000 clusters for DBC's candidate fan-out."""
    n = 5000
    cfg = load_config(CONFIG_DIR / f"{method}_cpu.yaml")
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(250, 32))[np.arange(n) % 250] + 0.3 * rng.normal(size=(n, 32))
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
    cameras, initial = np.arange(n) % 3, Targets(labels=np.arange(n))
    want = METHODS[method].update(cfg, feats, initial, UpdateContext(stage=0, seed=0, num_real=n, cameras=cameras))
    inputs = StoreInputs(num_samples=n, num_real=n, cameras=cameras, is_fake=None, truth=None, initial=initial, seed=0)
    store = FeatureStore.remote(METHODS[method], cfg, inputs, 2, str(tmp_path / "store"), None)
    try:
        ray.get([store.put.remote(0, r, np.arange(n)[r::2], feats[r::2]) for r in (0, 1)])
        result = ray.get(store.update.remote(0), timeout=300)
    finally:
        ray.kill(store)
    info, got = result["info"], result["targets"]
    assert info["cluster_tasks"] >= 2 and info["cluster_nodes"] == 2, info
    for field in ("labels", "selected", "neighbors", "centroids"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert np.array_equal(a, b), field
    # the update scaled the store's gathered matrix in place; the scores read the shards again
    want_scores = label_free_scores(feats, want.labels, initial.labels, seed=0)
    assert_scores_close({key: info[key] for key in want_scores}, want_scores)


def test_the_tracking_uri_and_mlflow_credentials_reach_both_nodes_through_runtime_env(ray_cluster):
    """A driver joining the cluster (``ensure_ray`` with an address, as ``ray submit`` runs it, or with
    ``$RAY_ADDRESS`` and no ``ray.address``, as a ``ray job submit`` driver runs: Ray's own lookup there used
    to refuse the local start's resources) hands the tracking URI and its MLflow credentials to every process
    of the job, on either node, through ``runtime_env``; the nodes themselves were started without them. Ray
Train's PreemptionWatcher is off for the job (``job_env``) unless the driver's environment turns it on: that
value reaches both nodes too (theirs is the suite's "0"; the default run's output is checked by
``scripts/check_wheel.sh``, outside this suite)."""
    import json
    import os
    import subprocess
    import sys

    code = """
import json, os, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ureid.config import CONFIG_DIR, load_config
from ureid.runtime.job import ensure_ray
ensure_ray(load_config(CONFIG_DIR / "buc_cpu.yaml", ["ray.address=" + sys.argv[1]] if sys.argv[2] == "config" else []).ray,
           "http://10.0.0.1:5000")
@ray.remote(num_cpus=0)
def seen():
    return (ray.get_runtime_context().get_node_id(), os.environ.get("MLFLOW_TRACKING_URI"),
            os.environ.get("MLFLOW_TRACKING_PASSWORD"), os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"))
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
print(json.dumps(ray.get([seen.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes])))
"""
    gcs = ray.get_runtime_context().gcs_address
    for how in ("config", "env"):
        env = {**os.environ, "MLFLOW_TRACKING_PASSWORD": "s3cret"}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", None)
        if how == "env":
            env["RAY_ADDRESS"] = gcs
            env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"  # the user's choice wins
        out = subprocess.run([sys.executable, "-c", code, gcs, how], env=env, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, (how, out.stderr[-3000:])
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert len({node for node, *_ in seen}) == 2, how  # both nodes of the test cluster: it joined
        assert all(uri == "http://10.0.0.1:5000" and password == "s3cret" for _, uri, password, _ in seen), how
        assert {watcher for *_, watcher in seen} == {"1" if how == "env" else "0"}, (how, seen)


def test_a_ray_address_where_no_head_listens_fails_fast(ray_cluster):
    """``ray.init`` retried ``127.0.0.1:1`` for minutes (still at it after 5.5); ``check_address`` refuses a
    GCS host:port that takes no connection, or that is not host:port, naming ``ray.address``."""
    from conftest import _free_port
    from ureid.config import ConfigError
    from ureid.runtime.job import check_address

    for fine in (ray.get_runtime_context().gcs_address, None, "auto", "ray://10.0.0.9:10001"):
        check_address(fine)  # the test cluster's head answers; the others are Ray's to resolve
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"ray.address=127.0.0.1:\d+: no Ray head answers there.*ray start --head"):
        check_address(f"127.0.0.1:{_free_port()}")
    assert time.perf_counter() - start < 10
    with pytest.raises(ConfigError, match=r"ray.address='headnode': expected the head's host:port"):
        check_address("headnode")


def test_store_threads_gives_the_store_more_threads_and_the_same_labels(ray_cluster, tmp_path):
    """Ray runs a zero-CPU actor with OMP_NUM_THREADS=1; ``ray.store_threads`` lets the store's own work use
    more (faiss, torch and NumPy's BLAS; the train workers wait meanwhile), with the same labels. The store
    and its block tasks run with UPDATE_ENV: OpenBLAS's threads sleep at once, and one malloc arena."""
    n = 3000
    x = _features(n, d=32, seed=5)
    want = bottom_up_merge(x, np.arange(n), int(0.1 * n), 0.005)

    def _arenas_after_threads() -> int:
        """glibc's malloc arenas in this process (``malloc_info``'s heaps) after two threads allocated."""
        import ctypes
        import re
        import tempfile
        from concurrent.futures import ThreadPoolExecutor

        def allocate(i):
            return sum(float(np.ones(50_000 + i).sum()) for _ in range(20))

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(allocate, range(8)))
        libc = ctypes.CDLL("libc.so.6")
        libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
        libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
        with tempfile.NamedTemporaryFile(suffix=".xml") as f:
            stream = libc.fopen(f.name.encode(), b"w")
            libc.malloc_info(0, stream)
            libc.fclose(stream)
            return len(re.findall(r"<heap nr=", open(f.name).read()))

    @ray.remote(num_cpus=0)
    def seen():
        from ureid.clustering._common import faiss_blas_core, import_faiss, openblas_core_for_cpu

        # a family set in the environment wins (this machine kind's AMD EPYC sets Haswell for every process)
        expected = os.environ.get("OPENBLAS_CORETYPE") or openblas_core_for_cpu()
        return import_faiss().omp_get_max_threads(), faiss_blas_core(), expected

    faiss_threads, core, expected = ray.get(seen.remote())
    assert faiss_threads == 1  # what the store gets by default
    # a Ray worker's faiss on the CPU's kernels
    assert core is not None and (expected is None or core.lower() == expected.lower()), (core, expected)
    for threads in (None, 2):
        cfg = load_config(CONFIG_DIR / "buc_cpu.yaml", ["ray.clustering_tasks=false", f"ray.store_threads={threads or 'null'}"])
        inputs = StoreInputs(num_samples=n, num_real=n, cameras=np.zeros(n, np.int64), is_fake=None, truth=None,
                             initial=Targets(labels=np.arange(n)), seed=0)
        store = FeatureStore.remote(METHODS["buc"], cfg, inputs, 1, str(tmp_path / f"t{threads}"), None)
        try:
            ray.get(store.put.remote(0, 0, np.arange(n), x))
            result = ray.get(store.update.remote(0), timeout=120)
            assert np.array_equal(result["targets"].labels, want)
            assert result["info"]["store_threads"] == (threads or 1)
            assert result["info"]["store_blas_threads"] == (threads or 1)  # NumPy's BLAS (DBC's, SSL's products)
            # OpenBLAS's threads sleep right after a product (UPDATE_ENV), in the store and in its block tasks
            env = ray.get(store.__ray_call__.remote(lambda _self: os.environ.get("OPENBLAS_THREAD_TIMEOUT")))
            assert env == UPDATE_ENV["OPENBLAS_THREAD_TIMEOUT"] == "4"
            # one malloc arena for all the store's threads (UPDATE_ENV), however many threads allocated
            assert ray.get(store.__ray_call__.remote(lambda _self: _arenas_after_threads())) == 1
        finally:
            ray.kill(store)
    assert RayBlockMap()(lambda name, _item: os.environ.get(name), "OPENBLAS_THREAD_TIMEOUT", range(2)) == ["4", "4"]
    assert RayBlockMap()(lambda _shared, _item: _arenas_after_threads(), None, range(2)) == [1, 1]
    # the control: a Ray worker without UPDATE_ENV gives its allocating threads arenas of their own
    assert ray.get(ray.remote(num_cpus=0)(_arenas_after_threads).remote()) > 1



def test_a_store_loads_what_updates_import_before_its_first_update():
    """A fresh store's first update paid torch's import (1.5 s, cold file cache, against a 2.2 s GEMM floor at
    N = 12,936) and the Jaccard module's (scipy.sparse) inside its cluster_time_s: the store loads them when it
    starts. And checking numpy features does not import torch (a tensor exists only where torch is loaded)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from ureid.clustering._common import as_numpy_features\n"
            "as_numpy_features(np.ones((2, 3), np.float32))\n"
            "print('torch' in sys.modules)\n"
            "from ureid.runtime.feature_store import _load_update_libraries\n"
            "_load_update_libraries()\n"
            "print(all(m in sys.modules for m in ('torch', 'faiss', 'scipy.sparse', 'ureid.clustering.jaccard',"
            " 'ureid.clustering.pul', 'ureid.clustering.buc', 'ureid.clustering.dbc', 'ureid.clustering.ssl')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"], done.stdout
