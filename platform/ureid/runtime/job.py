"""A tracked Ray Train job: the one way the project launches work on Ray.

A job owns a run folder, an MLflow run (optionally the child of a parent run, e.g. a sweep's), starts or
joins Ray, and launches one ``TorchTrainer`` with the callbacks its caller gives. The stage-loop run
(:mod:`.experiment`), a sweep trial and a GAN training job are jobs; what they train is their own.

Layout of a run folder ``<output_dir>/<kind>-<time>-<id>/``::

    run.json        MLflow run id, tracking URI, attempts, the training set it runs on (read by --resume)
    history.jsonl   one line of metrics per reported stage (written by HistoryCallback)
    ray/            Ray Train storage: one checkpoint per report (stage_000/, stage_001/, ...)

A failed job is marked FAILED in MLflow with the error, and its checkpoints stay for ``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Sequence

from .. import tracking

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"


def stage_checkpoints(run_dir: str | os.PathLike, state_file: str = "state.pt",
                      prefix: str = "stage") -> list[tuple[int, Path]]:
    """Every checkpoint ``<prefix>_<n>/`` of every attempt under a run folder, by ``n`` (a stage, or a GAN's
    iteration; the newest copy of one wins)."""
    found = {}
    for state in sorted((Path(run_dir) / "ray").glob(f"**/{prefix}_*/{state_file}"), key=lambda p: p.stat().st_mtime):
        found[int(state.parent.name.split("_")[1])] = state.parent
    return sorted(found.items())


#: Driver environment that every process of the job needs wherever it runs: MLflow's credentials (the Train
#: controller, which logs the stage metrics, may run on another node).
FORWARDED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_INSECURE_TLS")


#: Ray Train 2.60 starts a PreemptionWatcher actor beside each worker group. It serves only
#: ``ray.train.get_preemption_info()``, which the stage loop does not read (a drained node is a lost worker:
#: the group restarts from the stage checkpoint), and its start printed a core_worker error line ("has
#: constructor arguments in the object store and max_restarts > 0") in every run. Off for the job's
#: processes unless the driver's environment sets it (that value is forwarded).
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def job_env(tracking_uri: str | None = None) -> dict[str, str]:
    """The ``runtime_env`` env vars of a job: the tracking URI, the driver's MLflow credentials and
    ``PREEMPTION_WATCHER_ENV`` (``"0"`` unless the driver set it)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env[PREEMPTION_WATCHER_ENV] = os.environ.get(PREEMPTION_WATCHER_ENV, "0")
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


#: Where Ray's State API clients look first (``ray.util.state``, Ray Train's ``PlacementGroupCleaner``).
#: Without it they look for "the" Ray instance of the machine, and with two (two runs started at once on
#: one workstation) the cleaner's thread died of "ConnectionError: Found multiple active Ray instances", a
#: 30-line traceback in each run's output (measured), and with it the freeing of an ASHA-stopped trial's
#: workers. A local start therefore picks its dashboard port and names it to the whole job.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
_our_api_server: str | None = None  # the value this process set (replaced by its next local start)
_dashboard_url: str | None = None  # what ray.init reported when this process connected ("": no dashboard)


def state_api_address() -> str | None:
    """The State API of the Ray instance this process uses: ``$RAY_API_SERVER_ADDRESS``, else the dashboard
    ``ensure_ray``'s ``ray.init`` reported ("" when it runs none), else None (unknown: Ray's own lookup)."""
    if os.environ.get(API_SERVER_ENV):
        return os.environ[API_SERVER_ENV]
    if _dashboard_url is None:
        return None
    return f"http://{_dashboard_url}" if _dashboard_url and "://" not in _dashboard_url else _dashboard_url


def _dashboard_port() -> int:
    """Ray's default 8265 when it is free on 127.0.0.1, else a free port."""
    import socket

    for port in (8265, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port on 127.0.0.1 for Ray's dashboard")


#: Whether this process started the Ray instance it uses (``ensure_ray`` without ``ray.address``): its
#: resources are this machine's, fixed, with no autoscaler to add any.
_started_here = False


def check_address(address: str | None, timeout: float = 10.0) -> None:
    """Fail fast on a ``ray.address`` where no Ray head listens. ``ray.init`` retries such an address for
    minutes with nothing but GCS warnings (measured here: ``127.0.0.1:1`` was still retrying after 5.5
    minutes). A GCS ``host:port`` is probed with one TCP connection; ``auto``, ``local`` and ``ray://``
    (Ray Client) addresses are left to Ray, which fails fast on them."""
    if address is None or address in ("auto", "local") or "://" in address:
        return
    from ..config import ConfigError, ray_address_form

    if why := ray_address_form(address):
        raise ConfigError(f"ray.address={address!r}: {why}")
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # an IPv6 literal
    from .._net import tcp_refusal

    why = tcp_refusal(host, int(port), timeout)
    if why is not None:
        raise ConfigError(f"ray.address={address}: no Ray head answers there ({why}). Start it "
                          f"first (`ray start --head --port={port}`, or `ray up cluster.yaml`), or leave "
                          f"ray.address unset to start a local instance")


def private_local_token() -> Path | None:
    """Before a local start under Ray 2.60's default token auth: make sure its token is the user's alone.

    With ``RAY_AUTH_MODE`` unset (or ``token``) and no token given (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``), ``ray.init()`` generates ``~/.ray/auth_token`` with the process's umask:
    mode 644 under a 755 ``~/.ray`` here (measured), so on a shared machine any local user who can read the
    home folder could read it and run code as this user through the instance's dashboard on 127.0.0.1.
    When the file is missing it is created first, mode 600 in a 700 ``~/.ray``, with Ray's own kind of
    token (256 random bits as 64 hex digits), which Ray then finds and uses; an existing one that others may
    read is named with the command that fixes it (it is the user's file; it is not changed). Returns the
    token file checked, or None when auth is off or the token comes from elsewhere."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if (mode is not None and mode.lower() != "token") or os.environ.get("RAY_AUTH_TOKEN") \
            or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = Path.home() / ".ray" / "auth_token"
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it in between: check that one below
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            return path
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        print(f"[ureid] warning: Ray's token file {path} may be read by other users (mode "
              f"{mode:o}); anyone who reads it can run code as you on the Ray instance "
              f"this run starts. Make it yours alone: chmod 600 {path}", flush=True)
    return path


class _NoOptOutAdvice(logging.Filter):
    """Drops the warning Ray 2.60 logs at every local start whose ``RAY_AUTH_MODE`` is unset ("Token
    authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."): it advises the
    opposite of this project's rule that nothing it starts is reachable without the token. Ray's warning for
    a start with auth turned off stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


_NO_OPT_OUT_ADVICE = _NoOptOutAdvice()
# Ray's own logger of that warning (ray/_private/authentication/authentication_token_setup.py).
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def ensure_ray(ray_cfg, tracking_uri: str | None = None) -> None:
    """Join ``ray.address`` (else ``$RAY_ADDRESS``, which Ray's job supervisor sets for a ``ray job submit``
    driver) or start a local Ray instance (workers import the installed ``ureid``). The job's processes get
    :func:`job_env` through ``runtime_env``: an environment variable set only in the driver does not reach
    other nodes; a local start adds its State API's address (``API_SERVER_ENV``)."""
    import ray

    if ray.is_initialized():
        return
    from .tasks import local_resources

    global _started_here, _our_api_server, _dashboard_url
    # Ray itself joins $RAY_ADDRESS when given no address, and then refuses the local start's resources
    # ("When connecting to an existing cluster, resources must not be provided"): join it on purpose.
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS") or None
    check_address(address)
    local = {"resources": local_resources()} if address is None else {}
    if address is None:
        private_local_token()
        logging.getLogger(RAY_AUTH_LOGGER).addFilter(_NO_OPT_OUT_ADVICE)  # the same object: added once
    env = job_env(tracking_uri)
    if os.environ.get(API_SERVER_ENV, _our_api_server) == _our_api_server:  # unset, or an earlier start's
        os.environ.pop(API_SERVER_ENV, None)
        _our_api_server = None
        if address is None and ray_cfg.include_dashboard:
            # Name this instance's State API for every process of the job (see API_SERVER_ENV).
            port = _dashboard_port()
            local["dashboard_port"] = port
            _our_api_server = env[API_SERVER_ENV] = os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    context = ray.init(address=address, log_to_driver=True, include_dashboard=ray_cfg.include_dashboard,
                       runtime_env={"env_vars": env}, **local)
    _dashboard_url = context.dashboard_url or ""
    _started_here = address is None  # ray.init with resources and no address (none in the env) starts its own
    if _started_here and not ray_cfg.include_dashboard:
        print("[ureid] warning: ray.include_dashboard is false: Ray Train's PlacementGroupCleaner learns whether "
              "its controller lives only from the dashboard's State API, so it logs 'Failed to query Ray Train "
              "Controller actor state' about once a second, and an ASHA sweep is refused (see "
              "tune.check_state_api). Leave it true unless the dashboard's memory matters more.", flush=True)


def workers_that_fit(nodes: list[dict], cpus_per_worker: float, use_gpu: bool, store_gpus: float = 0.0) -> int:
    """How many train workers the alive nodes of ``ray.nodes()`` hold at once: a worker needs its CPUs (and,
    with ``use_gpu``, one GPU, Ray Train's default) on one node. With ``store_gpus``, the feature store's GPU
    share is placed first, on the node where it leaves room for the most workers; -1 when no node has it."""
    have = [n.get("Resources", {}) for n in nodes if n.get("Alive")]

    def fit(res: dict, gpus_taken: float = 0.0) -> int:
        here = int(res.get("CPU", 0.0) / cpus_per_worker + 1e-9)
        return min(here, int(res.get("GPU", 0.0) - gpus_taken + 1e-9)) if use_gpu else here

    each = [fit(res) for res in have]
    if store_gpus <= 0:
        return sum(each)
    return max((sum(each) - each[i] + fit(res, store_gpus) for i, res in enumerate(have)
                if res.get("GPU", 0.0) + 1e-9 >= store_gpus), default=-1)


def check_worker_group(ray_cfg, fixed: bool | None = None, nodes: list[dict] | None = None) -> None:
    """A worker group the cluster cannot hold never starts: Ray Train waits for it, saying "worker group
    startup timed out" every 60 s (on an autoscaling cluster, nodes may come). On a Ray instance of fixed
    size (``fixed``; by default: one this process started) that is a hang, so refuse at start-up with the
    keys; on a cluster the job joined, say so once and let Train wait. The feature store's GPU share
    (``ray.store_gpus``) counts too: the workers must fit beside it. ``nodes``: ``ray.nodes()`` by default."""
    import ray

    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    store = ray_cfg.store_gpus
    fit = workers_that_fit(nodes, ray_cfg.cpus_per_worker, ray_cfg.use_gpu, store)
    if fit >= ray_cfg.num_workers:
        return
    gpus = ray_cfg.use_gpu or store > 0
    each = f"{ray_cfg.cpus_per_worker:g} CPU" + (" and 1 GPU" if ray_cfg.use_gpu else "")
    held = ", ".join(f"{n['Resources'].get('CPU', 0):g} CPU" + (f" {n['Resources'].get('GPU', 0):g} GPU"
                                                                  if gpus else "") for n in nodes)
    if fit < 0:
        msg = (f"ray.store_gpus={store:g} asks a GPU share for the feature store, but none of the Ray cluster's "
               f"{len(nodes)} node(s) ({held}) has {store:g} GPU")
    else:
        beside = f" beside the feature store's GPU share (ray.store_gpus={store:g})" if store > 0 else ""
        msg = (f"ray.num_workers={ray_cfg.num_workers} train workers of {each} each (ray.cpus_per_worker"
               f"{', ray.use_gpu' if ray_cfg.use_gpu else ''}), but the Ray cluster's {len(nodes)} node(s) ({held}) "
               f"hold only {fit}{beside} (each worker's resources on one node)")
    if _started_here if fixed is None else fixed:
        from ..config import ConfigError

        lower = "Lower ray.num_workers or ray.cpus_per_worker" + (" (or set ray.use_gpu=false)" if ray_cfg.use_gpu
                                                                  else "")
        if fit < 0:
            lower = "Set ray.store_gpus=0 (the updates on CPU)"
        elif store > 0 and workers_that_fit(nodes, ray_cfg.cpus_per_worker, ray_cfg.use_gpu) >= ray_cfg.num_workers:
            lower = f"Set ray.store_gpus=0 (the updates on CPU) or a share that fits, or {lower[0].lower()}{lower[1:]}"
        raise ConfigError(f"{msg}. {lower}, or join a larger cluster with ray.address")
    print(f"[ureid] warning: {msg}; Ray Train waits until the cluster grows (an autoscaler adding nodes) and "
          f"says 'worker group startup timed out' every 60 s meanwhile", flush=True)


def training_set_record(root: str, paths: Sequence[Sequence[str]]) -> dict:
    """A training set's size, root and a digest of its samples' file paths below the root (in sample order):
    the same images under another root digest the same."""
    digest = hashlib.sha256()
    for sample in paths:
        digest.update(("\t".join(os.path.relpath(p, root) for p in sample) + "\n").encode())
    return {"num_samples": len(paths), "root": str(root), "sha256": digest.hexdigest()}


def training_set_mismatch(before: dict, now: dict) -> str | None:
    """How ``now`` differs from the recorded ``before`` (:func:`training_set_record`), or None."""
    if (before["num_samples"], before["sha256"]) == (now["num_samples"], now["sha256"]):
        return None
    what = (f"{now['num_samples']} training images under {now['root']}, the run's stages trained on "
            f"{before['num_samples']} under {before['root']}")
    return what + (" (as many, but other files or another order)" if before["num_samples"] == now["num_samples"]
                   else "")


# The file a driver holds a lock on while it runs a job (Job.start / Job.reopen until failing_loudly's block ends).
LOCK_FILE = ".lock"


class RunInUse(RuntimeError):
    """Another live process drives this run folder."""


def hold_folder(run_dir: Path, wait_s: float = 0.0) -> IO | None:
    """An exclusive lock on ``run_dir``'s LOCK_FILE, kept while the returned file stays open. The kernel drops it
    when the holder dies, SIGKILL included, so a killed driver never leaves a stale lock. Without it a
    ``--resume`` started while the run still ran (another terminal, a second `ray job submit`) trained the same
    stages into the same checkpoints and MLflow run beside it. None on a file system without locks (some FUSE
    mounts): the run goes on unguarded. ``wait_s``: how long a held lock is waited for (a sweep trial resumed
    after its sweep's driver died: the trial process of the dead driver may take seconds to be reaped)."""
    import fcntl
    import socket

    f = open(run_dir / LOCK_FILE, "a+")
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunInUse(f"{run_dir} is in use: {holder} runs it. Stop that one first (Ctrl-C, or `ray job stop`), "
                       f"then --resume {run_dir}") from None
    except OSError as exc:
        log.warning("cannot lock %s (%s): nothing stops a second process from running it at the same time",
                    run_dir / LOCK_FILE, exc)
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


@dataclass
class Job:
    run_dir: Path
    tracking_uri: str
    run_id: str
    attempt: int = 1
    training_set: dict | None = None  # what check_training_set recorded: a resume must run on the same
    lock: IO | None = field(default=None, repr=False, compare=False)  # see hold_folder

    @property
    def resumed(self) -> bool:
        return self.attempt > 1

    @property
    def history_path(self) -> Path:
        return self.run_dir / HISTORY_FILE

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def start(cls, kind: str, output_dir: str | os.PathLike, tracking_cfg, params: dict, tags: dict[str, str],
              write_config: Callable[[Path], Path] | None = None, parent_run_id: str | None = None) -> "Job":
        """A new run folder and MLflow run. ``write_config(run_dir)`` saves the resolved config there (logged
        as an artifact); ``params`` are logged flattened."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(output_dir).expanduser().resolve() / f"{kind}-{stamp}-{secrets.token_hex(3)}"
        uri = tracking.resolve_tracking_uri(tracking_cfg.tracking_uri, output_dir)  # a dead server: no folder
        tracking.make_folder(run_dir, "output_dir", output_dir, exist_ok=False)
        lock = hold_folder(run_dir)
        config_path = write_config(run_dir) if write_config else None
        run_id = tracking.start_run(uri, tracking_cfg.experiment, tracking_cfg.run_name or run_dir.name, params,
                                    tags, artifact=config_path, parent_run_id=parent_run_id)
        job = cls(run_dir, uri, run_id, lock=lock)
        job._write_info()
        return job

    @classmethod
    def reopen(cls, run_dir: str | os.PathLike, lock_wait_s: float = 0.0) -> "Job":
        """The job of an earlier attempt, to continue it: its MLflow run goes back to RUNNING. ``lock_wait_s``:
        how long to wait for another process to let go of the run (see ``hold_folder``) before refusing."""
        run_dir = Path(run_dir).expanduser().resolve()
        if not (run_dir / "run.json").is_file():
            raise FileNotFoundError(f"--resume {run_dir}: not a ureid run folder (no run.json)")
        lock = hold_folder(run_dir, lock_wait_s)  # before anything is touched: the MLflow run's status, run.json
        info = json.loads((run_dir / "run.json").read_text())
        job = cls(run_dir, info["tracking_uri"], info["run_id"], info.get("attempts", 1) + 1, info.get("training_set"),
                  lock=lock)
        tracking.reopen_run(job.tracking_uri, job.run_id)
        job._write_info()
        return job

    def _write_info(self) -> None:
        info = {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "attempts": self.attempt,
                **({"training_set": self.training_set} if self.training_set else {})}
        (self.run_dir / "run.json").write_text(json.dumps(info))

    def check_training_set(self, root: str, paths: Sequence[Sequence[str]]) -> None:
        """Record the training set (:func:`training_set_record`) on the first attempt; on a resume, refuse
        another one. The stages' checkpoints, pseudo-labels and the store's shards are indexed by training
        sample, so another set (other images, or the same in another order) would fail inside the train
        workers, or train on labels of other images; the same set moved to another root, or read from a copy
        on another machine, resumes."""
        now = training_set_record(root, paths)
        if self.training_set is not None and (why := training_set_mismatch(self.training_set, now)):
            raise ValueError(f"--resume {self.run_dir}: not the training set the run started on: {why}. Resume "
                             f"on the same images (they may sit elsewhere now: --set data.root=DIR), or start a "
                             f"new run")
        self.training_set = now
        self._write_info()

    def announce(self) -> None:
        print(f"[ureid] run folder {self.run_dir}\n[ureid] MLflow run {self.run_id} at {self.tracking_uri}",
              flush=True)

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoints(self, state_file: str, prefix: str = "stage") -> list[tuple[int, Path]]:
        return stage_checkpoints(self.run_dir, state_file, prefix)

    # -- running ---------------------------------------------------------------------------------
    @contextmanager
    def failing_loudly(self, leave_status: bool = False):
        """Mark the MLflow run FAILED with the error when the block raises (checkpoints stay). With
        ``leave_status`` the error is raised on and the status left to the caller (a sweep trial: the sweep
        marks it KILLED or FAILED from Tune's verdict). The run folder's lock is let go when the block ends."""
        try:
            yield self
        except BaseException as exc:
            if leave_status:
                raise
            tracking.finish_run(self.tracking_uri, self.run_id, error=exc)
            if stage_checkpoints(self.run_dir):
                kept = f"checkpoints kept in {self.run_dir / 'ray'}; continue with --resume {self.run_dir}"
            else:  # failed before its first stage ended (a bad dataset path, say): nothing to resume from
                kept = f"no stage finished, no checkpoint to resume from (run folder {self.run_dir})"
            how = "stopped" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
            print(f"[ureid] run {how}: {tracking.failure_text(exc)}\n[ureid] {kept}", flush=True)
            raise
        finally:
            self.release()

    def release(self) -> None:
        """Let go of the run folder's lock (a later --resume may take it)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def fit(self, train_fn: Callable[[dict], None], loop_config: dict, ray_cfg, callbacks: Sequence = (),
            verbose: bool = False):
        """Launch ``train_fn`` on ``ray_cfg.num_workers`` Ray Train workers and wait for it; a dead worker makes
        Ray Train restart the group up to ``ray_cfg.max_failures`` times (``train_fn`` continues from
        ``ray.train.get_checkpoint()``). Ray Train's own
        INFO lines (worker-group start-up, every report's metrics dict, every checkpoint path) only when
        ``verbose``; its warnings and errors always."""
        import ray.train
        from ray.train.torch import TorchTrainer

        ensure_ray(ray_cfg)
        check_worker_group(ray_cfg)
        trainer = TorchTrainer(
            train_fn,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                resources_per_worker={"CPU": ray_cfg.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=f"{self.run_dir.name}-attempt{self.attempt}", storage_path=str(self.run_dir / "ray"),
                callbacks=list(callbacks),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
                failure_config=ray.train.FailureConfig(max_failures=ray_cfg.max_failures),
                logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            ),
        )
        return trainer.fit()

    def log_artifacts(self, paths: dict[str, Path | None]) -> None:
        tracking.log_artifacts(self.tracking_uri, self.run_id, paths)

    def finish(self) -> None:
        tracking.finish_run(self.tracking_uri, self.run_id)
