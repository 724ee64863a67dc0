"""The feature-store actor: a stage's global feature matrix and the method's label update.

Train workers put the features of their shard of the training set; once every shard is in, the first
worker to ask runs the method's update (pure :mod:`ureid.clustering` code) and every worker gets the
same targets. The store keeps the targets of every finished update (the workers never send them back)
and writes them to ``state_dir`` after each update; it also writes every shard it is given to
``state_dir/shards/`` until its stage's update is saved. The actor restarts without limit and its calls
are retried (``max_restarts=-1, max_task_retries=-1``); every method is idempotent, keyed by stage and
rank, and a restarted actor reloads both the finished updates and the current stage's shards, so killing
its process at any point of a stage costs the seconds of a restart. ``state_dir`` is in the run's folder:
on a cluster, storage every node reads.

The actor asks for no CPU of its own (``num_cpus=0``): train workers may hold every CPU slot of a small
machine, and an actor waiting for a slot would deadlock the stage. The update fans its row blocks out as
Ray tasks on reserved clustering slots (:mod:`.tasks`; inside a sweep trial, on the trial's own). With
``ray.store_gpus`` the driver creates it with that GPU share (:func:`store_options`) and every update runs
on the GPU instead (``UpdateContext.device``, the clustering code's torch path; no tasks).

Memory: a put shard is kept as its file only, and an update reads the shards back into one (N, d) matrix in
row chunks, which the method may scale to unit length in place (``UpdateContext.features_writable``); the
label-free scores then read it once more. So the store holds one copy of a stage's features at a time,
beside the method's own working arrays (measured per method in the README's scaling section).

Every update also gets the label-free scores of :mod:`ureid.evaluation.label_free` (``lf_*``: computed
from the features and pseudo-labels only, what an unsupervised user can select stages by).

The ground-truth identities (``truth``) reach only the method's diagnostics, and, for the identities a
method declares known (semi-supervised variants), the update's ``known_labels``.
"""

from __future__ import annotations

import ctypes
import pickle
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from ..evaluation.label_free import label_free_scores
from ..methods.base import Targets, UpdateContext
from .tasks import UPDATE_ENV, RayBlockMap

#: The update that runs before stage 0 for a method without initial targets (on the prepared model).
PRE_STAGE = -1


@dataclass
class StoreInputs:
    """What the store knows of the training samples besides their features (all (N,) arrays)."""

    num_samples: int
    num_real: int
    cameras: np.ndarray
    is_fake: np.ndarray | None
    truth: np.ndarray | None      # ground-truth identities: diagnostics only
    initial: Targets | None       # the method's initial targets (None: run the update at PRE_STAGE first)
    seed: int


def _restarted() -> bool:
    """Whether Ray restarted this actor. Ray 2.60's ``was_current_actor_reconstructed`` reads its own deprecated
    ``actor_id`` on the way, a three-line RayDeprecationWarning in every run's output; the answer is the same."""
    import warnings

    import ray

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


@contextmanager
def _threads(count: int | None):
    """faiss's, torch's and NumPy's BLAS thread counts set to ``count`` for the block, then restored (None:
    unchanged). NumPy's BLAS does the CPU products of DBC and SSL (``clustering._common.matmul_t``)."""
    if count is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    from ..clustering._common import import_faiss

    faiss = import_faiss()

    old_faiss, old_torch = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(count)
    torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count, user_api="blas"):
            yield
    finally:
        faiss.omp_set_num_threads(old_faiss)
        torch.set_num_threads(old_torch)


def _return_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``). An update's temporaries
    are freed into the arenas of the threads that made them (torch's, the BLAS's) and glibc keeps much of
    them: after PUL's update at N = 77,616 on 2 threads the store's own memory, the matrix freed, stood
    588 MB above its start, 440 MB with this call, through the label-free scores and the next stage's
    training. The threads' own arenas hold much of it: in one process the update alone kept 406 MB after it
    with glibc's default arenas and 153 MB with one (``MALLOC_ARENA_MAX=1``, in ``UPDATE_ENV``). Without
    glibc: nothing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


#: In a sweep trial's placement group, the bundle holding its store's GPU share (``tune._trial_resources``: the
#: trial function's own, empty, bundle is not in the group).
STORE_BUNDLE = 0


def store_options(ray_cfg, placement_group=None) -> dict:
    """The actor options a run's store is created with besides its name: its GPU share, if any, taken in a sweep
    trial's reservation (``placement_group``) from the bundle that holds it."""
    if ray_cfg.store_gpus <= 0:
        return {}
    if placement_group is None:
        return {"num_gpus": ray_cfg.store_gpus}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"num_gpus": ray_cfg.store_gpus, "scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group, placement_group_bundle_index=STORE_BUNDLE)}


def update_device(ray_cfg) -> str | None:
    """The torch device the store's updates compute on: ``"cuda"`` with ``ray.store_gpus`` (the GPU Ray gave the
    actor, the only one it sees), else None (NumPy/faiss on CPU, fanned out as tasks). Checked when the store
    starts: a GPU share without a CUDA build of torch (or a fake ``--num-gpus``) fails the run at once with
    the reason, not at the end of the first stage."""
    if ray_cfg.store_gpus <= 0:
        return None
    import os

    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"ray.store_gpus={ray_cfg.store_gpus:g}: Ray gave the feature store a GPU share on node "
            f"{ray.util.get_node_ip_address()}, but torch there sees no CUDA device (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Install a CUDA build of torch on the GPU nodes, or set "
            f"ray.store_gpus=0 to run the label updates on CPU")
    return "cuda"


def _load_update_libraries() -> None:
    """Load, while the store starts, what every update loads on its first call: torch (the thread settings
    and the torch paths), faiss (with its own OpenBLAS), the label-update modules (``ureid.clustering``'s,
    scipy.sparse with them) and threadpoolctl's scan of the loaded libraries. Otherwise a run's first update
    paid it inside its ``cluster_time_s``, and so did every row of ``benchmarks/scaling.py`` (each a fresh
    store): torch 1.5 s, the Jaccard module 0.12-0.26 s, faiss 0.16 s and the scan 7 ms in a fresh process
    here (2 cores), against a 2.2-3.3 s GEMM floor at N = 12,936. The store starts while the trainer starts,
    so nobody waits for it."""
    import importlib

    import torch  # noqa: F401
    from threadpoolctl import threadpool_info

    from .. import clustering
    from ..clustering._common import import_faiss

    import_faiss()
    for module in clustering.MODULES:
        importlib.import_module(module)
    threadpool_info()


def _read_rows(f, idx: np.ndarray, out: dict, name: str, n: int, chunk_bytes: int = 32 << 20) -> None:
    """Read a ``.npy`` stream's rows in chunks into ``out[name][idx]`` (allocated (n, ...) on first use)."""
    major, _ = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if fortran or shape[0] != idx.size:
        raise RuntimeError(f"feature store: a shard's {name} has shape {shape} (fortran={fortran}) for {idx.size} indices")
    if name not in out:
        out[name] = np.zeros((n,) + tuple(shape[1:]), dtype=np.float32)
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, chunk_bytes // row_bytes)
    for s in range(0, idx.size, step):
        rows = idx[s:s + step]
        data = f.read(rows.size * row_bytes)
        out[name][rows] = np.frombuffer(data, dtype=dtype).reshape((rows.size,) + tuple(shape[1:]))


def save_inputs(inputs: StoreInputs, state_dir: str | Path) -> str:
    """Write a store's inputs beside its state; the path is what :class:`FeatureStore` is created with."""
    path = Path(state_dir) / "inputs.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(inputs))
    return str(path)


# Errors of a method's update that the same features raise again (a setting that does not fit the data, say
# DBSCAN finding no cluster at its eps): Ray Train's worker-group restarts would only train the stage again
# to meet them again. A Ray error (a lost node or block task) is not one of them: its restart is the point.
DETERMINISTIC_ERRORS = (ValueError, TypeError, ArithmeticError, AssertionError, LookupError, NotImplementedError)


class LabelUpdateError(ValueError):
    """A label update failed with one of ``DETERMINISTIC_ERRORS``; the run ends with it (see
    :meth:`FeatureStore.update_failure`)."""


class StageError(ValueError):
    """A stage's training or evaluation failed with one of ``DETERMINISTIC_ERRORS`` in a train worker; the run
    ends with it (see :meth:`FeatureStore.record_failure`)."""


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, runtime_env={"env_vars": UPDATE_ENV})
class FeatureStore:
    def __init__(self, method, cfg, inputs: StoreInputs | str, world_size: int, state_dir: str, placement_group=None,
                 first_stage: int | None = None):
        """``first_stage``: the stage this attempt of the run starts at. The updates and shards from it on are
        dropped when the store is created (see :meth:`forget_from`), but not when Ray restarts it: a restart
        keeps what this attempt finished. Given here rather than as a first call, the driver need not wait for
        the store's start (imports, seconds) before launching the trainer, whose start overlaps it."""
        # ``inputs`` as a file in the run folder (see save_inputs) keeps the creation arguments small: Ray
        # inlines them, and a restart never depends on objects the driver owns.
        if isinstance(inputs, str):
            inputs = pickle.loads(Path(inputs).read_bytes())
        self.method, self.cfg, self.inputs, self.world_size = method, cfg, inputs, world_size
        self.placement_group = placement_group  # a sweep trial's reservation for the clustering tasks
        self.state_path = Path(state_dir) / "feature_store.pkl"
        self.shard_dir = Path(state_dir) / "shards"
        self.shards: dict[int, dict[int, Path]] = {}  # stage -> rank -> its shard file
        self.results: dict[int, dict] = {}
        self.failure: tuple[int, str, str] | None = None  # (stage, what, error) of a deterministic failure
        if self.state_path.exists():  # restarted after a crash, or a resumed run: keep the finished updates
            self.results = pickle.loads(self.state_path.read_bytes())
        for stage, rank, path in self._shard_files():  # and the shards of an unfinished stage
            if stage not in self.results:
                self.shards.setdefault(stage, {})[rank] = path
        if first_stage is not None and not _restarted():
            self.forget_from(first_stage)
        self.device = update_device(cfg.ray)
        _load_update_libraries()

    def update_failure(self) -> tuple[int, str, str] | None:
        """(stage, what, error) of the first failure with one of ``DETERMINISTIC_ERRORS`` in this store process
        (what: "label update", or "training" as :meth:`record_failure` was told), or None. A restarted worker
        group asks before it trains the stage again, so such an error costs one stage's training, not one per
        Ray Train retry; the driver ends the run with it (:class:`LabelUpdateError`, :class:`StageError`)."""
        return self.failure

    def record_failure(self, stage: int, what: str, error: str) -> None:
        """A deterministic error of a train worker or of this store's update (see :meth:`update_failure`); the
        first one recorded stays."""
        if self.failure is None:
            self.failure = (stage, what, error)

    def pid(self) -> int:
        """The actor's process id (fault tests kill it)."""
        import os

        return os.getpid()

    def _shard_path(self, stage: int, rank: int) -> Path:
        return self.shard_dir / f"stage_{stage:+04d}_rank_{rank:03d}.npz"

    def put(self, stage: int, rank: int, indices: np.ndarray, pooled: np.ndarray, parts=None) -> int:
        """Keep rank ``rank``'s features of stage ``stage`` (again: they replace the first ones) on disk, before
        answering: a put that returned survives a restart. Only the file is kept, not the arrays: the update
        reads the shards back into one matrix, so the store holds one copy of a stage's features, not two."""
        indices = np.asarray(indices)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        path = self._shard_path(stage, rank)
        tmp = path.with_name("tmp_" + path.name)
        arrays = {"indices": indices, "pooled": pooled, **({"parts": parts} if parts is not None else {})}
        np.savez(tmp, **arrays)
        tmp.replace(path)
        self.shards.setdefault(stage, {})[rank] = path
        return len(self.shards[stage])

    def targets_for(self, stage: int) -> Targets | None:
        """The targets stage ``stage`` trains on; None when the method must first run the update at PRE_STAGE."""
        if stage - 1 in self.results:
            return self.results[stage - 1]["targets"]
        if stage == 0:
            return self.inputs.initial
        raise RuntimeError(f"feature store: no targets for stage {stage}: stage {stage - 1} was never updated")

    def latest_targets(self) -> Targets | None:
        return self.results[max(self.results)]["targets"] if self.results else None

    def _gather(self, stage: int, parts: bool = True):
        """The stage's (N, d) pooled features (and (N, ...) parts), read from the shard files in row chunks
        straight into place: nothing but the gathered matrices and one chunk is ever in memory."""
        shards = self.shards.get(stage, {})
        if len(shards) != self.world_size:
            raise RuntimeError(
                f"feature store: stage {stage} has features from {sorted(shards)} of {self.world_size} workers"
            )
        n = self.inputs.num_samples
        out: dict[str, np.ndarray] = {}
        seen = np.zeros(n, dtype=bool)
        for path in shards.values():
            with zipfile.ZipFile(path) as z:
                with z.open("indices.npy") as f:
                    idx = np.load(f)
                seen[idx] = True
                for name in ("pooled", "parts") if parts else ("pooled",):
                    if f"{name}.npy" in z.namelist():
                        with z.open(f"{name}.npy") as f:
                            _read_rows(f, idx, out, name, n)
        if not seen.all():
            raise RuntimeError(f"feature store: stage {stage} is missing {int((~seen).sum())} samples")
        return out["pooled"], out.get("parts")

    def _known_labels(self, stage: int) -> np.ndarray | None:
        truth = self.inputs.truth
        if truth is None:
            return None
        known = self.method.known_identities(self.cfg, stage, self.inputs.seed, np.unique(truth))
        if len(known) == 0:
            return None
        return np.where(np.isin(truth, known), truth, -1).astype(np.int64)

    def update(self, stage: int) -> dict:
        """Run the method's update for ``stage`` once; later calls return the cached result."""
        if stage in self.results:
            return self.results[stage]
        inputs = self.inputs
        previous = self.targets_for(stage) if stage >= 0 else None
        if previous is None:
            previous = Targets(labels=np.zeros(inputs.num_samples, dtype=np.int64))
        pooled, parts = self._gather(stage)
        start = time.perf_counter()
        blocks = RayBlockMap(self.placement_group) if self.cfg.ray.clustering_tasks and self.device is None else None
        ctx = UpdateContext(stage=stage, seed=inputs.seed, num_real=inputs.num_real, cameras=inputs.cameras,
                            is_fake=inputs.is_fake, parts=parts, known_labels=self._known_labels(stage),
                            map_blocks=blocks, features_writable=True, device=self.device)
        with _threads(self.cfg.ray.store_threads):
            from threadpoolctl import threadpool_info

            from ..clustering._common import import_faiss

            faiss = import_faiss()
            threads = faiss.omp_get_max_threads()
            blas = min((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=threads)
            try:
                new = self.method.update(self.cfg, pooled, previous, ctx)
                if not isinstance(new, Targets):
                    raise TypeError(f"{type(self.method).__name__}.update must return Targets, got "
                                    f"{type(new).__name__}")
            except DETERMINISTIC_ERRORS as exc:
                self.record_failure(stage, "label update", f"{type(exc).__name__}: {exc}")
                raise
        info = {"cluster_time_s": time.perf_counter() - start, "num_clusters": new.num_classes, "store_threads": threads,
                "store_blas_threads": blas, **(blocks.stats() if blocks is not None else {"cluster_tasks": 0}),
                **({"store_gpu": 1.0} if self.device is not None else {})}
        # The update may have overwritten the gathered features (features_writable): the scores read them
        # again from the shard files, which stay until this update is saved; one copy is in memory at a time.
        del pooled, parts, ctx
        _return_free_memory()
        pooled, _ = self._gather(stage, parts=False)
        real = slice(0, inputs.num_real)  # scored on the real samples (camstyle fakes are augmentation)
        info.update(label_free_scores(pooled[real], new.labels[real], previous.labels[real], seed=inputs.seed,
                                      overwrite=True))
        del pooled
        _return_free_memory()
        if inputs.truth is not None:
            info.update(self.method.diagnostics(self.cfg, previous, new, inputs.truth))
        result = {"targets": new, "info": info}
        self.results[stage] = result
        self._save()
        self._drop_shards(lambda s: s == stage)  # only once the update that used them is saved
        return result

    def forget_from(self, stage: int) -> None:
        """Drop cached updates (and stored shards) from ``stage`` on: a resumed run recomputes them, it never
        replays them."""
        self.results = {s: r for s, r in self.results.items() if s < stage}
        self._save()
        self._drop_shards(lambda s: s >= stage)

    def _shard_files(self) -> list[tuple[int, int, Path]]:
        files = []
        for path in sorted(self.shard_dir.glob("stage_*_rank_*.npz")):
            stage, rank = (int(v) for v in path.stem.removeprefix("stage_").split("_rank_"))
            files.append((stage, rank, path))
        return files

    def _drop_shards(self, which) -> None:
        for s in [s for s in self.shards if which(s)]:
            del self.shards[s]
        for stage, _, path in self._shard_files():
            if which(stage):
                path.unlink(missing_ok=True)

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(self.results))
        tmp.replace(self.state_path)
