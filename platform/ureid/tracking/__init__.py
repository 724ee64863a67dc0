"""MLflow tracking: one run per job, ``step = stage`` metrics, artifacts, failure status. No Ray here.

The driver creates the experiment and the run before any worker starts (so concurrent trials never
race to create it), optionally as the child of a parent run (a sweep); per-stage metrics are logged by
a Ray Train callback in the Train controller (:mod:`ureid.runtime.callbacks`) through
:func:`log_stage`, so workers on other nodes never need to reach the tracking store.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlflow.db"


def resolve_tracking_uri(tracking_uri: str | None, output_dir: str | os.PathLike, create: bool = True) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else a local SQLite file in the output folder (the folder
    made unless ``create`` is false: a reader makes nothing). A server URI must answer (:func:`check_server`)."""
    for uri, key in ((tracking_uri, "tracking.tracking_uri"), (os.environ.get("MLFLOW_TRACKING_URI"),
                                                             "$MLFLOW_TRACKING_URI")):
        if uri:
            check_server(uri)
            _check_local_store(uri, key, create)
            return uri
    path = Path(output_dir).expanduser().resolve() / DEFAULT_DB
    if create:
        make_folder(path.parent, "output_dir", output_dir)
    return f"sqlite:///{path}"


def _check_local_store(uri: str, key: str, create: bool) -> None:
    """A store on this machine that MLflow would refuse or fail on with a traceback: a folder (its file store,
    which MLflow 3.x refuses unless ``MLFLOW_ALLOW_FILE_STORE=true``), or a SQLite file whose folder cannot be
    made; the error names ``key``."""
    from urllib.parse import urlsplit

    from ..config import ConfigError

    scheme = urlsplit(uri).scheme
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        from importlib.metadata import version

        folder = uri[len("file://"):] if scheme == "file" else uri
        raise ConfigError(f"{key}={uri}: a folder, MLflow's file store, which mlflow {version('mlflow')} refuses "
                          f"(maintenance mode; MLFLOW_ALLOW_FILE_STORE=true allows it): use a SQLite file, "
                          f"sqlite:///{Path(folder).expanduser().resolve()}.db, or a server, http://HOST:PORT")
    if scheme == "sqlite" and create and uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        make_folder(Path(uri[len("sqlite:///"):]).expanduser().parent, key, uri)


def make_folder(path: Path, key: str, value, exist_ok: bool = True) -> None:
    """``path.mkdir(parents=True)``, an error naming the config key it comes from (a bare "[Errno 2] No such
    file or directory: '/proc/x'" named neither the key nor what was being made)."""
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except OSError as exc:
        if isinstance(exc, FileExistsError) and path.is_dir():
            raise  # a folder of that name, where a new one was asked for: the caller's to say
        why = "a file of that name is there" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
        raise OSError(f"{key}={value}: cannot make the folder {path} ({why})") from exc


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail in seconds on an http(s) tracking URI where no server listens: MLflow's client retries a refused
    connection with backoff for about 4 minutes per call before it says so (measured here, mlflow 3.17).
    One TCP connection; what answers is MLflow's to judge. Where a job first reaches its URI: resolving it
    (a new run, sweep or comparison) and reopening its run (a resumed run or sweep)."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    from .._net import tcp_refusal
    from ..config import ConfigError

    try:
        why = tcp_refusal(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), timeout)
    except ValueError as exc:  # parts.port: a port that is not a number
        why = str(exc)
    if why is not None:
        raise ConfigError(f"tracking.tracking_uri={uri}: no MLflow server answers there "
                          f"({why}). Start it (`mlflow server --host ADDRESS "
                          f"--port PORT`, see the README's cluster section), or leave tracking.tracking_uri and "
                          f"$MLFLOW_TRACKING_URI unset for a SQLite store in the output folder")


def _client(uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    # "Creating initial MLflow database tables... / Updating database tables": two INFO lines at the top of a
    # run's output whenever it makes a new SQLite store (MLflow gives its loggers handlers of their own)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def git_commit(folder: str | os.PathLike | None = None) -> str | None:
    """The commit checked out in ``folder`` (default: the folder the user runs in), if it is a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder or os.getcwd(), capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _artifact_root(uri: str, experiment: str) -> str | None:
    """Beside a SQLite store (``<dir>/mlartifacts/<experiment>``): MLflow's default is ``./mlruns`` of whatever
    folder the process that created the experiment ran in, which scatters a run's artifacts across checkouts."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / experiment).as_uri()


def start_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict[str, str],
              artifact: Path | None = None, parent_run_id: str | None = None) -> str:
    """Create ``experiment`` if needed and a RUNNING run in it (a child of ``parent_run_id`` when given),
    with ``params`` (flattened, dotted keys) and ``tags``; returns the run id."""
    from mlflow.entities import Param

    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=_artifact_root(uri, experiment))
    tags = {**tags, "mlflow.runName": run_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    flat = [Param(k, str(v)[:500]) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 100):
        client.log_batch(run.info.run_id, params=flat[i:i + 100])
    if artifact is not None:
        client.log_artifact(run.info.run_id, str(artifact))
    return run.info.run_id


def log_stage(uri: str, run_id: str, stage: int, metrics: dict[str, float], timestamp_ms: int) -> None:
    """Log one stage's metrics with ``step = stage``."""
    from mlflow.entities import Metric

    values = [Metric(k, float(v), timestamp_ms, stage) for k, v in metrics.items()]
    _client(uri).log_batch(run_id, metrics=values)


def log_summary(uri: str, run_id: str, metrics: dict[str, float]) -> None:
    """Summary metrics (no step): MLflow's search returns each metric's latest value, so ``best_*`` and
    ``selected_*`` are logged under names of their own."""
    import math
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
    if values:
        _client(uri).log_batch(run_id, metrics=values)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = _client(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def reopen_run(uri: str, run_id: str) -> None:
    """Back to RUNNING, for a resumed run or sweep; its stored URI must answer (:func:`check_server`)."""
    check_server(uri)
    _client(uri).update_run(run_id, status="RUNNING")


def failure_text(error: BaseException) -> str:
    """The error as a run's ``error`` tag and its last line say it. A stop from outside gets its likely cause:
    after Ctrl-C Ray Train aborts the run and its driver ends in ``SystemExit: 1``, which alone says nothing."""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        text += " (stopped from outside the run: Ctrl-C, or a signal that Ray Train turns into an exit)"
    return text


def finish_run(uri: str, run_id: str, error: BaseException | None = None, status: str | None = None) -> None:
    """FAILED with the error as a tag (:func:`failure_text`) when ``error`` is given, else ``status`` (default
    FINISHED)."""
    client = _client(uri)
    if error is not None:
        client.set_tag(run_id, "error", failure_text(error)[:5000])
        client.set_terminated(run_id, status="FAILED")
    else:
        client.set_terminated(run_id, status=status or "FINISHED")


def all_runs(client, experiment_ids: list[str], filter_string: str = "", page: int = 1000) -> list:
    """Every run of ``experiment_ids`` that ``filter_string`` matches, page by page: one ``search_runs`` call
    returns at most ``max_results`` (1,000 by default) and leaves the rest unsaid, so an experiment grown past
    that (a year of sweeps) lost runs from the comparison without a word."""
    runs, token = [], None
    while True:
        batch = client.search_runs(experiment_ids, filter_string=filter_string, max_results=page, page_token=token)
        runs.extend(batch)
        token = batch.token
        if not token:
            return runs


def child_runs(uri: str, parent_run_id: str, status: str | None = None) -> list[str]:
    """The ids of a parent run's children (optionally only those in ``status``)."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    if status:
        query += f" and attributes.status = '{status}'"
    return [r.info.run_id for r in all_runs(client, [parent.info.experiment_id], query)]


def log_artifacts(uri: str, run_id: str, paths: dict[str, Path]) -> None:
    """``paths``: artifact sub-folder -> local file or folder."""
    client = _client(uri)
    for sub, path in paths.items():
        if path is None or not Path(path).exists():
            continue
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=sub)
        else:
            client.log_artifact(run_id, str(path), artifact_path=sub or None)


def plot_stages(history: list[dict], path: Path, title: str = "") -> Path:
    """mAP and cluster count per stage, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [h["stage"] for h in history]
    fig, ax1 = plt.subplots(figsize=(6, 3.5), dpi=100)
    if all("mAP" in h for h in history):
        ax1.plot(stages, [100 * h["mAP"] for h in history], "o-", color="tab:blue", label="mAP")
        ax1.set_ylabel("mAP (%)", color="tab:blue")
    ax1.set_xlabel("stage")
    ax2 = ax1.twinx()
    ax2.plot(stages, [h["num_clusters"] for h in history], "s--", color="tab:orange", label="clusters")
    ax2.set_ylabel("clusters after the update", color="tab:orange")
    ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
