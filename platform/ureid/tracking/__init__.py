"""MLflow tracking: one run per experiment, ``step = stage`` metrics, artifacts, failure status.

The driver creates the experiment and the run before any worker starts (so concurrent trials never
race to create it); per-stage metrics are logged by :class:`MlflowStageCallback`, a Ray Train
callback that runs in the Train controller, so workers on other nodes never need to reach the
tracking store.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from ray.train import UserCallback

DEFAULT_DB = "mlflow.db"


def resolve_tracking_uri(tracking_uri: str | None, output_dir: str | os.PathLike) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else a local SQLite file in the output folder."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(output_dir).expanduser().resolve() / DEFAULT_DB
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

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


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[3]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def start_run(uri: str, cfg_dict: dict, run_name: str, config_path: Path) -> str:
    from mlflow.entities import Param

    client = _client(uri)
    name = cfg_dict["tracking"]["experiment"]
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    tags = {"method": cfg_dict["method"], "dataset": cfg_dict["data"]["name"], "mlflow.runName": run_name}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    params = [Param(k, str(v)[:500]) for k, v in flatten(cfg_dict).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    client.log_artifact(run.info.run_id, str(config_path))
    return run.info.run_id


def reopen_run(uri: str, run_id: str) -> None:
    _client(uri).update_run(run_id, status="RUNNING")


def finish_run(uri: str, run_id: str, error: BaseException | None = None) -> None:
    client = _client(uri)
    if error is not None:
        client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
        client.set_terminated(run_id, status="FAILED")
    else:
        client.set_terminated(run_id, status="FINISHED")


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


class MlflowStageCallback(UserCallback):
    """Logs rank 0's stage metrics with ``step=stage`` and checks that the memory tables of all
    DDP replicas are identical (``memory_replicas_identical``)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        import time

        from mlflow.entities import Metric

        m = metrics[0]
        stage = int(m.get("stage", 0))
        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, stage) for k, v in m.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "stage"]
        sums = [w.get("memory_checksum") for w in metrics if w.get("memory_checksum")]
        if sums:
            values.append(Metric("memory_replicas_identical", float(len(set(sums)) == 1), now, stage))
        _client(self.uri).log_batch(self.run_id, metrics=values)


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
