"""Benchmark: how ureid scales on one machine, in one run, side by side.

1. **The feature store's label update** (every method's, as a stage runs it): in-process (inside the store
   actor, ``ray.clustering_tasks: false``) and fanned out as Ray tasks over 1, 2 and 4 clustering slots,
   each slot its own simulated node (``ray start --block`` per node, own ports, stopped by PID; never
   ``ray stop``). Per row: update time, tasks and the nodes they ran on, the store process's peak RSS
   (VmHWM, which counts the object store's shared pages that the put argument maps in) and its own peak
   (the highest RssAnon above a fresh store's, sampled every 50 ms), whether the labels equal the
   in-process ones, and the time of a blockwise ``x @ x.T`` with a row max in numpy on the same matrix
   (the floor for any exact k-NN: every pairwise product), measured just before each run of the row
   (``--floors once``: once at the start). The slots' worker processes are started (one
   task each) before the first timed update, as a run's stages after its first find them.
2. **Train workers at equal global batch**: the BUC CPU preset's first stage with 1 worker at batch B
   (2 CPUs) and with 2 workers at B/2 (1 CPU each): stage time, mAP, rank-1, clusters, and how far the
   first-stage pseudo-labels agree (identical labels; adjusted Rand index).
   With ``--store-gpus SHARE`` (a GPU node): the same updates through a store holding that GPU share
   (``ray.store_gpus``; the clustering code's torch path on CUDA), each beside a blockwise ``x @ x.T`` with a
   row max in torch on that GPU (float32, synchronised; the features already there), and compared with the
   in-process CPU targets.
   With ``--updates-on DEVICE`` (``cuda`` on a GPU node; needs neither Ray nor faiss, so it runs where only
   torch is installed): each update in this process on that device, as a store with ``ray.store_gpus`` runs
   it, its first (cold: CUDA's start-up) and its best time beside the device's GEMM floor, its targets
   compared with the CPU path's (the NumPy/faiss one where faiss imports, else the torch path on the CPU,
   which the tests hold equal to it).
3. **One train worker's training throughput** (``--throughput DEVICE``, e.g. ``cuda`` on a GPU node, ``cpu``):
   the paper config's network and loss (BUC: ResNet-50 at 256 x 128, its memory table over Market-1501's
   12,936 training images as stage 0's classes; random initialisation, so nothing is downloaded), SGD steps
   on a fixed random batch, images per second after warm-up steps (CUDA synchronised). A Ray Train worker on
   that device runs the same step plus the gradient all-reduce of DDP.

    python benchmarks/scaling.py                     # N = 12,936, d = 2048; both parts
    python benchmarks/scaling.py --large             # also N = 77,616 (BUC only; half an hour with --floors once,
                                                     # a floor per row adds 2-4 minutes a row)
    python benchmarks/scaling.py --large --skip-small --skip-train --slots '' \
        --large-methods buc,dbc,ssl,pul,cluster_contrast   # every method in-process at N = 77,616
    python benchmarks/scaling.py --methods buc,pul --skip-train
    python benchmarks/scaling.py --skip-updates --skip-train --throughput cuda   # a GPU's images/s per worker
    python benchmarks/scaling.py --skip-train --slots '' --store-gpus 1 --throughput cuda   # a GPU session
    python benchmarks/scaling.py --skip-updates --skip-train --updates-on cuda --throughput cuda   # torch alone

Features: clustered unit vectors (``clustering_buc.make_features``: N/10 identities, d = 2048). A 2-core
machine runs at most 2 tasks at once, so 4 slots cannot be faster than 2 here: the rows show what the
fan-out costs and that it gives the same labels; the speed-up needs the cores of real nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "platform")]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the benchmark's own throw-away clusters, on 127.0.0.1

from clustering_buc import make_features  # noqa: E402

SLOT = "ureid_cluster_slot"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalCluster:
    """``nodes`` Ray nodes on this machine (a head plus workers), ``slots`` clustering slots each."""

    def __init__(self, nodes: int, slots: int = 1, cpus: int = 1):
        self.temp = tempfile.mkdtemp(prefix="ureid-b-", dir="/tmp")
        self.port = _free_port()
        ray_bin = str(Path(sys.executable).parent / "ray")
        common = ["--block", f"--num-cpus={cpus}", f"--resources={json.dumps({SLOT: slots})}",
                  "--object-store-memory=2000000000"]

        def own_ports():
            return [f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                    f"--runtime-env-agent-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}"]

        log = open(Path(self.temp) / "nodes.log", "w")
        self.procs = [subprocess.Popen(
            [ray_bin, "start", "--head", f"--port={self.port}", f"--temp-dir={self.temp}",
             "--include-dashboard=false", *common, *own_ports()], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)]
        while socket.socket().connect_ex(("127.0.0.1", self.port)) != 0:
            time.sleep(0.2)
        import ray

        ray.init(address=f"127.0.0.1:{self.port}", log_to_driver=False)
        for i in range(1, nodes):  # one at a time: several raylets starting at once time out on 2 cores
            own = Path(self.temp) / f"n{i}"  # each node its own session folder, as on its own machine
            own.mkdir()
            self.procs.append(subprocess.Popen(
                [ray_bin, "start", f"--address=127.0.0.1:{self.port}", f"--temp-dir={own}", *common, *own_ports()],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            deadline = time.time() + 120
            while len([n for n in ray.nodes() if n["Alive"]]) < i + 1:
                if time.time() > deadline or self.procs[-1].poll() is not None:
                    tail = (Path(self.temp) / "nodes.log").read_text()[-2000:]
                    self.close()
                    raise RuntimeError(f"node {i + 1} of {nodes} did not start:\n{tail}")
                time.sleep(0.5)

    def close(self):
        import ray
        import shutil

        ray.shutdown()
        for p in reversed(self.procs):
            if p.poll() is not None:
                continue
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)


def _vmhwm_mb(pid: int) -> float:
    return _status_mb(pid, "VmHWM")


def _status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _PrivatePeak:
    """The highest RssAnon (the process's own memory, without the object store's shared pages that a put
    argument maps in, or mapped files) of ``pid`` while running, sampled every 50 ms from another thread."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, _status_mb(self.pid, "RssAnon"))
            except OSError:
                return
            self._stop.wait(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def _method_cfg(method: str, tasks: bool, threads: int | None = None, store_gpus: float = 0.0):
    from ureid.config import CONFIG_DIR, load_config

    return load_config(CONFIG_DIR / f"{method}_cpu.yaml", [f"ray.clustering_tasks={str(tasks).lower()}",
                                                          f"ray.store_threads={threads or 'null'}",
                                                          f"ray.store_gpus={store_gpus}"])


def store_update(method: str, x: np.ndarray, tasks: bool, threads: int | None = None, store_gpus: float = 0.0) -> dict:
    """One stage-0 update through a fresh feature store on the connected cluster (``store_gpus``: the store holds
    that GPU share and updates on it)."""
    import ray

    from ureid.methods import METHODS, Targets
    from ureid.runtime.feature_store import FeatureStore, StoreInputs, save_inputs, store_options

    n = len(x)
    initial = Targets(labels=np.arange(n))
    inputs = StoreInputs(num_samples=n, num_real=n, cameras=np.arange(n) % 6, is_fake=None, truth=None,
                         initial=initial, seed=0)
    with tempfile.TemporaryDirectory(prefix="ureid-store-") as state:
        cfg = _method_cfg(method, tasks, threads, store_gpus)
        store = FeatureStore.options(**store_options(cfg.ray)).remote(METHODS[method], cfg, save_inputs(inputs, state), 1,
                                                                     state, None)
        try:
            pid = ray.get(store.pid.remote())
            fresh = _status_mb(pid, "RssAnon")
            sampler = _PrivatePeak(pid)
            ray.get(store.put.remote(0, 0, np.arange(n), x))
            start = time.perf_counter()
            result = ray.get(store.update.remote(0))
            wall = time.perf_counter() - start
            peak, private = _vmhwm_mb(pid), sampler.stop() - fresh
        finally:
            ray.kill(store)
    info, targets = result["info"], result["targets"]
    return {"time_s": info["cluster_time_s"], "wall_s": wall, "tasks": int(info.get("cluster_tasks", 0)),
            "nodes": int(info.get("cluster_nodes", 0)), "peak_mb": peak, "private_mb": private,
            "targets": targets}


def _warm(_shared, _item) -> int:
    """A block task's imports: what a task pays once per worker process (a run's later stages find it)."""
    import scipy.sparse  # noqa: F401
    import torch  # noqa: F401

    import ureid.clustering  # noqa: F401
    import ureid.evaluation  # noqa: F401

    time.sleep(1.0)  # held a moment, so that every slot starts a worker of its own
    return os.getpid()


def warm_workers(slots: int) -> None:
    """One task per slot through the store's own executor, submitted from an actor with the store's
    runtime_env, so the timed update finds started workers. (Ray keeps the tasks an actor submits in another
    worker pool than the driver's, even with equal runtime_envs: tasks from the driver warmed workers that
    the store's tasks never used, and the first update paid their start, 4-6 s at 4 slots.)"""
    import ray

    from ureid.runtime.tasks import UPDATE_ENV, RayBlockMap

    @ray.remote(num_cpus=0, runtime_env={"env_vars": UPDATE_ENV})
    class Warmer:
        def warm(self):
            return RayBlockMap()(_warm, None, range(slots))

    warmer = Warmer.remote()
    try:
        ray.get(warmer.warm.remote())
    finally:
        ray.kill(warmer)


def _row(r: dict) -> str:
    return (f"| {r['n']:,} | {r['method']} | {r['where']} | {r['time_s']:.1f} | {r['tasks']} / {r['nodes']} | "
            f"{r['peak_mb']:.0f} | {r['private_mb']:.0f} | {'yes' if r['same'] else 'NO'} | {r['floor']:.1f} | "
            f"{r['time_s'] / r['floor']:.2f}x |")


def _progress(r: dict) -> None:
    """Each row as soon as it is measured (a long run that stops early keeps what it measured)."""
    print(f"[scaling] {_row(r)}", flush=True)


def gemm_floor_s(x: np.ndarray, block: int = 4096, threads: int | None = None) -> float:
    """Blockwise ``x @ x.T`` with a row max: every pairwise product once, nothing else (on ``threads`` BLAS
    threads; None: NumPy's default, every core)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        start = time.perf_counter()
        for s in range(0, len(x), block):
            (x[s:s + block] @ x.T).max(1)
        return time.perf_counter() - start


def gemm_floor_gpu_s(x: np.ndarray, block: int = 4096, device: str = "cuda") -> float:
    """``gemm_floor_s`` on a GPU: blockwise ``x @ x.T`` with a row max in torch, float32 (the k-NN's own
    precision there: no TF32, see ``topk._torch_needs_float64``), the features copied there first (untimed),
    synchronised before and after."""
    import torch

    xt = torch.from_numpy(x).to(device)
    (xt[:block] @ xt.T).max(1)  # the first call's CUDA/cuBLAS start-up is not the floor's
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for s in range(0, len(x), block):
        (xt[s:s + block] @ xt.T).max(1)
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def check_cuda(flag: str) -> None:
    """Stop with the flag named when torch sees no CUDA device here."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"{flag}: this machine has no CUDA device that torch sees (torch {torch.__version__}, CUDA "
                         f"build {torch.version.cuda}); run it on a GPU node")


def best_of(repeat: int, measure, floor) -> dict:
    """``measure()`` ``repeat`` times (each a fresh store): the fastest run's row, the highest peaks of all, and
    ``same`` false unless every run gave the first run's targets. On a shared machine the minimum is the
    run least disturbed by other work, as in ``timeit``. ``floor()`` (the GEMM floor) runs just before each
    run and the row's ``floor`` is the fastest of those: each update is set beside a floor of the
    same minutes (this VM's speed moved by a fifth within minutes, so a floor taken once at the start could
    stand beside updates run in a slower or faster spell)."""
    runs, floors = [], []
    for _ in range(max(1, repeat)):
        floors.append(floor())
        runs.append(measure())
    best = dict(min(runs, key=lambda r: r["time_s"]))
    best["peak_mb"] = max(r["peak_mb"] for r in runs)
    best["private_mb"] = max(r["private_mb"] for r in runs)
    best["repeats_agree"] = all(_same(r["targets"], runs[0]["targets"]) for r in runs[1:])
    best["floor"] = min(floors)
    return best


def _same(a, b) -> bool:
    return all((getattr(a, f) is None and getattr(b, f) is None) or
               (getattr(a, f) is not None and getattr(b, f) is not None and np.array_equal(getattr(a, f), getattr(b, f)))
               for f in ("labels", "selected", "neighbors", "centroids"))


def part_updates(methods: list[str], sizes: list[int], slot_counts=(1, 2, 4), store_threads=(None,),
                 repeat: int = 1, floors_per_row: bool = True, store_gpus: float = 0.0) -> list[dict]:
    """In-process rows once per ``store_threads`` value (None: the default, Ray's one thread in the store),
    each against the GEMM floor on as many threads; with ``store_gpus``, rows through a store holding that GPU
    share against the GPU's GEMM floor; fanned-out rows against the floor on every core. Every
    time (floors included) is the fastest of ``repeat`` runs. ``floors_per_row``: a floor before each run of
    the row (``best_of``); else the floors of the start stand for every row (at N = 77,616 a floor takes
    two to four minutes)."""
    rows = []
    cores = os.cpu_count() or 1
    for n in sizes:
        x, _ = make_features(n)
        floors = {}
        if not floors_per_row:
            floors = {t: min(gemm_floor_s(x, threads=t or 1) for _ in range(max(1, repeat)))
                      for t in {*store_threads, cores}}
            print(f"[scaling] N = {n:,}: blockwise GEMM floor " +
                  ", ".join(f"{v:.1f} s on {t or 1} thread(s)"
                            for t, v in sorted(floors.items(), key=lambda kv: kv[0] or 1)), flush=True)

        def floor_of(threads):
            """The row's floor for ``best_of``: the start's, or measured beside each run."""
            if floors:
                return lambda: floors[threads]
            return lambda: gemm_floor_s(x, threads=threads or 1)

        baseline = {}
        cluster = LocalCluster(1)
        try:
            for threads in store_threads:
                for m in methods:
                    r = best_of(repeat, lambda: store_update(m, x, tasks=False, threads=threads), floor_of(threads))
                    same = r["repeats_agree"] and (m not in baseline or _same(r["targets"], baseline[m]))
                    baseline.setdefault(m, r["targets"])
                    where = f"in-process, {threads or 1} thread(s)" + ("" if threads else " (default)")
                    rows.append({"n": n, "method": m, "where": where, **r, "same": same})
                    _progress(rows[-1])
            for m in methods if store_gpus > 0 else ():
                r = best_of(repeat, lambda: store_update(m, x, tasks=False, store_gpus=store_gpus),
                            lambda: gemm_floor_gpu_s(x))
                rows.append({"n": n, "method": m, "where": f"on the GPU (ray.store_gpus={store_gpus:g})", **r,
                             "same": r["repeats_agree"] and _same(r["targets"], baseline[m])})
                _progress(rows[-1])
        finally:
            cluster.close()
        for slots in slot_counts:
            cluster = LocalCluster(slots)
            try:
                warm_workers(slots)
                for m in methods:
                    r = best_of(repeat, lambda: store_update(m, x, tasks=True), floor_of(cores))
                    rows.append({"n": n, "method": m, "where": f"{slots} slot(s) on {slots} node(s)", **r,
                                 "same": r["repeats_agree"] and _same(r["targets"], baseline[m])})
                    _progress(rows[-1])
            finally:
                cluster.close()
    return rows


def floor_on(device: str, x: np.ndarray) -> float:
    """The GEMM floor where the update runs: torch on a CUDA device, NumPy's BLAS (every core) on the CPU."""
    return gemm_floor_gpu_s(x, device=device) if device.startswith("cuda") else gemm_floor_s(x)


def part_device_updates(device: str, methods: list[str], n: int = 12936, repeat: int = 2) -> list[dict]:
    """Each method's stage-0 update in this process with ``UpdateContext.device = device`` (the torch path a
    store with ``ray.store_gpus`` runs): the first call's time (on CUDA: its context and kernels' start-up), the
    best of ``repeat`` more, the device's GEMM floor (the fastest of one before each), and whether every call's
    targets equal the CPU path's (NumPy/faiss where faiss imports; else the torch path on the CPU)."""
    import importlib.util

    from ureid.methods import METHODS, Targets, UpdateContext

    if device.startswith("cuda"):
        check_cuda(f"--updates-on {device}")
    x, _ = make_features(n)
    reference = None if importlib.util.find_spec("faiss") is not None else "cpu"
    rows = []
    for m in methods:
        cfg = _method_cfg(m, False)

        def run(dev):
            ctx = UpdateContext(stage=0, seed=0, num_real=n, cameras=np.arange(n) % 6, device=dev,
                                features_writable=True)
            features = x.copy()  # the update may scale it in place, as the store's own copy
            start = time.perf_counter()
            targets = METHODS[m].update(cfg, features, Targets(labels=np.arange(n)), ctx)
            return time.perf_counter() - start, targets

        want = run(reference)[1]
        first, got = run(device)
        same = _same(got, want)
        times, floors = [], []
        for _ in range(max(1, repeat)):
            floors.append(floor_on(device, x))
            t, got = run(device)
            times.append(t)
            same = same and _same(got, want)
        rows.append({"n": n, "method": m, "device": device, "first_s": first, "time_s": min(times),
                     "floor": min(floors), "same": same, "reference": "NumPy/faiss" if reference is None else
                     "torch on CPU"})
        print(f"[scaling] {m} on {device}: first {first:.2f} s, best {min(times):.2f} s, floor {min(floors):.2f} s, "
              f"same targets as the CPU path: {same}", flush=True)
    return rows


def part_workers() -> list[dict]:
    """The BUC CPU preset's first stage with 1 worker at batch B and 2 workers at B/2."""
    import ray

    from ureid.config import CONFIG_DIR, load_config
    from ureid.runtime.experiment import run_experiment

    out = Path(tempfile.mkdtemp(prefix="ureid-scaling-"))
    base = load_config(CONFIG_DIR / "buc_cpu.yaml")
    batch = base.train.batch_size
    ray.init(num_cpus=2, resources={SLOT: 2}, include_dashboard=True, log_to_driver=False)
    rows = []
    try:
        for workers in (1, 2):
            cfg = load_config(CONFIG_DIR / "buc_cpu.yaml", [
                "schedule.max_stages=1", f"ray.num_workers={workers}", f"ray.cpus_per_worker={2 // workers}",
                f"train.batch_size={batch // workers}", f"output_dir={out}", "tracking.pictures=false",
                f"tracking.tracking_uri=sqlite:///{out}/mlflow.db", "tracking.experiment=scaling"])
            summary = run_experiment(cfg, quiet=True)
            h = summary["history"][0]
            labels = np.load(Path(summary["run_dir"]) / "labels.npy")
            rows.append({"workers": workers, "batch": batch // workers, "stage_time_s": h["stage_time_s"],
                         "train_time_s": h["train_time_s"], "mAP": h["mAP"], "rank1": h["rank1"],
                         "clusters": h["num_clusters"], "loss": h["loss"], "labels": labels})
            print(f"[scaling] {workers} worker(s) x batch {batch // workers}: stage {h['stage_time_s']:.0f} s, "
                  f"mAP {h['mAP']:.2%}", flush=True)
    finally:
        ray.shutdown()
    return rows


def part_throughput(device: str, method: str = "buc", batch: int | None = None, steps: int = 10, warmup: int = 3,
                    overrides: tuple[str, ...] = (), num_classes: int = 12936) -> dict:
    """One train worker's training images/s on ``device``: ``method``'s paper config (``overrides``: more
    ``key=value`` settings), the network from ``model.weights=none`` (no download), the method's stage-0 loss
    over ``num_classes`` pseudo classes, SGD with the config's momentum and weight decay, a fixed random batch
    of ``batch`` images (default: the config's per-worker batch) at the config's size; ``warmup`` steps, then
    ``steps`` timed ones (on CUDA synchronised before and after)."""
    import torch

    from ureid.config import CONFIG_DIR, load_config
    from ureid.engine.train import forward_batch
    from ureid.methods import METHODS, Targets

    cfg = load_config(CONFIG_DIR / f"{method}.yaml", ["model.weights=none", *overrides])
    m, dev = METHODS[method], torch.device(device)
    if dev.type == "cuda":
        check_cuda(f"--throughput {device}")
    batch = cfg.train.batch_size if batch is None else int(batch)
    if batch < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"batch and steps must be >= 1 and warmup >= 0, got {batch}, {steps}, {warmup}")
    torch.manual_seed(0)
    model = m.build_model(cfg).to(dev).train()
    loss_fn = m.build_loss(cfg, Targets(labels=np.arange(num_classes)), num_classes, model.feature_dim).to(dev)
    t = cfg.train
    opt = torch.optim.SGD(list(model.parameters()) + list(loss_fn.parameters()), lr=t.lr, momentum=t.momentum,
                          weight_decay=t.weight_decay, nesterov=t.nesterov)
    images = torch.randn(batch, 3, cfg.data.height, cfg.data.width).to(dev)
    targets = torch.randint(num_classes, (batch,)).to(dev)
    indices = torch.arange(batch).to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(forward_batch(model, images), targets, indices)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"device": name, "method": method, "arch": cfg.model.arch, "size": f"{cfg.data.height}x{cfg.data.width}",
            "batch": batch, "step_s": seconds, "images_per_s": batch / seconds, "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="buc,dbc,ssl,pul,cluster_contrast")
    ap.add_argument("--large", action="store_true", help="also N = 77,616 (--large-methods; BUC by default)")
    ap.add_argument("--large-methods", default="buc", help="methods measured at N = 77,616 with --large")
    ap.add_argument("--skip-small", action="store_true", help="with --large: only N = 77,616")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-updates", action="store_true")
    ap.add_argument("--store-threads", default="default",
                    help="comma-separated thread counts for the in-process rows ('default': Ray's one thread)")
    ap.add_argument("--slots", default="1,2,4", help="clustering slots (simulated nodes) of the fanned-out rows")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per row (and per floor), the fastest kept: for a machine that other work shares")
    ap.add_argument("--floors", choices=("row", "once"), default="row",
                    help="row: the GEMM floor measured just before each run of a row (the same minutes as the "
                         "update); once: measured at the start for every row (saves 2-4 minutes a row at 77,616)")
    ap.add_argument("--throughput", default="",
                    help="comma-separated torch devices (cuda, cuda:1, cpu) for one train worker's training images/s")
    ap.add_argument("--throughput-batch", type=int, default=None, help="images per step (default: the config's)")
    ap.add_argument("--updates-on", default="",
                    help="a torch device (cuda): each update in this process there, beside its GEMM floor")
    ap.add_argument("--store-gpus", type=float, default=0.0,
                    help="also each update through a store holding this GPU share (ray.store_gpus, e.g. 1)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    if not 0 <= args.store_gpus <= 1:
        ap.error(f"--store-gpus must be in [0, 1] (ray.store_gpus), got {args.store_gpus:g}")
    if args.store_gpus > 0:
        check_cuda(f"--store-gpus {args.store_gpus:g}")
    if args.updates_on.startswith("cuda"):
        check_cuda(f"--updates-on {args.updates_on}")
    methods = args.methods.split(",")
    threads = tuple(None if t == "default" else int(t) for t in args.store_threads.split(","))
    slots = tuple(int(v) for v in args.slots.split(",") if v)
    rows = [] if args.skip_updates or (args.large and args.skip_small) else \
        part_updates(methods, [12936], slots, threads, args.repeat, args.floors == "row", args.store_gpus)
    if args.large and not args.skip_updates:
        rows += part_updates(args.large_methods.split(","), [77616], slots, threads, args.repeat, args.floors == "row",
                             args.store_gpus)
    on_device = part_device_updates(args.updates_on, methods, repeat=args.repeat) if args.updates_on else []
    workers = [] if args.skip_train else part_workers()
    speeds = [part_throughput(d, batch=args.throughput_batch) for d in args.throughput.split(",") if d]

    if rows:
        print(f"\n## The store's label update, d = 2048 ({os.cpu_count()} cores)\n")
        print("| N | method | where | update s | tasks / nodes | store peak MB | own peak MB over a fresh store | "
              "same targets | GEMM floor s (same threads; GPU rows: the GPU's) | update / floor |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(_row(r))
    if on_device:
        print(f"\n## The label update in one process on {args.updates_on} (the torch path), d = 2048\n")
        print("| N | method | first update s | update s | GEMM floor s (that device) | update / floor | "
              "same targets as the CPU path |")
        print("|---|---|---|---|---|---|---|")
        for r in on_device:
            print(f"| {r['n']:,} | {r['method']} | {r['first_s']:.2f} | {r['time_s']:.2f} | {r['floor']:.3f} | "
                  f"{r['time_s'] / r['floor']:.2f}x | {'yes' if r['same'] else 'NO'} ({r['reference']}) |")
    if workers:
        from sklearn.metrics import adjusted_rand_score

        a, b = workers
        print("\n## BUC CPU preset, first stage, equal global batch\n")
        print("| train workers | batch per worker | stage s | train s | mAP | rank-1 | clusters | loss |")
        print("|---|---|---|---|---|---|---|---|")
        for w in workers:
            print(f"| {w['workers']} | {w['batch']} | {w['stage_time_s']:.0f} | {w['train_time_s']:.0f} | {w['mAP']:.2%} | "
                  f"{w['rank1']:.2%} | {w['clusters']} | {w['loss']:.4f} |")
        same = float((a["labels"] == b["labels"]).mean())
        print(f"\nfirst-stage pseudo-labels: {same:.1%} of samples with identical labels, adjusted Rand index "
              f"{adjusted_rand_score(a['labels'], b['labels']):.3f}; mAP difference {abs(a['mAP'] - b['mAP']):.2%}")
    if speeds:
        print("\n## One train worker's training throughput (the paper config's network and loss, random init)\n")
        print("| device | method | network | input | batch | step s | images/s per worker |")
        print("|---|---|---|---|---|---|---|")
        for r in speeds:
            print(f"| {r['device']} | {r['method']} | {r['arch']} | {r['size']} | {r['batch']} | {r['step_s']:.3f} | "
                  f"{r['images_per_s']:.1f} |")


if __name__ == "__main__":
    main()
