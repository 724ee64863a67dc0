"""The driver of one experiment: run folder, MLflow run, feature-store actor, ``TorchTrainer``.

Layout of a run folder ``<output_dir>/<method>-<time>-<id>/``::

    config.yaml          the resolved config (also an MLflow artifact)
    run.json             MLflow run id and tracking URI (used by --resume)
    ray/                 Ray Train storage: one checkpoint per stage (stage_000/state.pt, ...)
    feature_store/       the feature-store actor's state
    labels.npy           the final pseudo-labels
    summary.json         per-stage metrics, best stage, wall time
    stages.png           mAP and cluster count per stage
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path

import numpy as np

from ..config import Config, load_config, save_config
from .. import tracking
from .loop import STATE_FILE


def new_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.output_dir).expanduser().resolve() / f"{cfg.method}-{stamp}-{secrets.token_hex(3)}"
    path.mkdir(parents=True)
    return path


def stage_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Every stage checkpoint under a run folder, by stage (the newest copy of a stage wins)."""
    found = {}
    for state in sorted((run_dir / "ray").glob(f"**/stage_*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime):
        found[int(state.parent.name.split("_")[1])] = state.parent
    return sorted(found.items())


def _init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    # Workers import ureid from this checkout when it is not installed on the node.
    src = str(Path(__file__).resolve().parents[2])
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}}
    ray.init(address=cfg.ray.address, runtime_env=env, log_to_driver=True,
             include_dashboard=cfg.ray.include_dashboard)


def _print_table(history: list[dict], best_stage: int | None) -> None:
    cols = [("stage", "{:>5}"), ("mAP", "{:>6.1%}"), ("rank1", "{:>6.1%}"), ("num_clusters", "{:>8}"),
            ("merge_precision", "{:>9.3f}"), ("loss", "{:>7.3f}"), ("stage_time_s", "{:>7.0f}")]
    cols = [(k, f) for k, f in cols if any(k in h for h in history)]
    heads = {"num_clusters": "clusters", "merge_precision": "merge-prec", "stage_time_s": "time(s)"}
    print("  ".join(f"{heads.get(k, k):>{len(f.format(0)) if k != 'stage' else 5}}" for k, f in cols))
    for h in history:
        row = "  ".join(f.format(h[k]) if k in h else " " * len(f.format(0)) for k, f in cols)
        print(row + ("   <- best" if h["stage"] == best_stage else ""))


def run_experiment(cfg: Config, *, resume: str | os.PathLike | None = None, quiet: bool = False) -> dict:
    """Run (or resume) one experiment end to end; returns the summary dict written to summary.json."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from .data import ensure_synthetic
    from .feature_store import FeatureStore
    from .loop import train_loop_per_worker

    t0 = time.perf_counter()
    cfg = cfg.with_absolute_paths()
    resume_from, start_stage = None, 0
    if resume:
        run_dir = Path(resume).expanduser().resolve()
        if not (run_dir / "run.json").is_file():
            raise FileNotFoundError(f"--resume {run_dir}: not a ureid run folder (no run.json)")
        done = stage_checkpoints(run_dir)
        if done:
            start_stage, resume_from = done[-1][0] + 1, str(done[-1][1])
        info = json.loads((run_dir / "run.json").read_text())
        uri, run_id = info["tracking_uri"], info["run_id"]
        tracking.reopen_run(uri, run_id)
        attempt = info.get("attempts", 1) + 1
    else:
        run_dir = new_run_dir(cfg)
        uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir)
        config_path = save_config(cfg, run_dir / "config.yaml")
        run_id = tracking.start_run(uri, cfg.to_dict(), cfg.tracking.run_name or run_dir.name, config_path)
        attempt = 1
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri, "attempts": attempt}))
    print(f"[ureid] run folder {run_dir}\n[ureid] MLflow run {run_id} at {uri}", flush=True)

    try:
        ensure_synthetic(cfg.data)
        if cfg.method == "pul" and cfg.clustering.source is not None:
            ensure_synthetic(cfg.clustering.source)
        _init_ray(cfg)
        from .data import load_run_data

        data = load_run_data(cfg)  # fail here, in the driver, on a bad dataset
        namespace = f"ureid-{run_dir.name}"
        store = FeatureStore.options(name="feature_store", namespace=namespace).remote(
            cfg.to_dict(), len(data["train"]), cfg.ray.num_workers, str(run_dir / "feature_store"),
            {"n0": data["n0"], "cameras": data["cameras"], "is_fake": data["is_fake"],
             "pids": data["pids"], "seed": cfg.seed},
        )
        ray.get(store.forget_from.remote(start_stage))
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "cfg": cfg.to_dict(), "store_name": "feature_store", "namespace": namespace,
                "resume_from": resume_from, "threads": max(1, int(cfg.ray.cpus_per_worker)),
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=f"{run_dir.name}-attempt{attempt}", storage_path=str(run_dir / "ray"),
                callbacks=[tracking.MlflowStageCallback(uri, run_id)],
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
                failure_config=ray.train.FailureConfig(max_failures=0),
            ),
        )
        trainer.fit()
        ray.kill(store)
    except BaseException as exc:
        tracking.finish_run(uri, run_id, error=exc)
        print(f"[ureid] run failed: {type(exc).__name__}: {exc}\n[ureid] checkpoints kept in {run_dir / 'ray'}; "
              f"continue with --resume {run_dir}", flush=True)
        raise

    import torch

    checkpoints = dict(stage_checkpoints(run_dir))
    states = [torch.load(path / STATE_FILE, map_location="cpu", weights_only=False) for path in checkpoints.values()]
    history = [state["metrics"] for state in states]
    np.save(run_dir / "labels.npy", states[-1]["targets"]["labels"])
    key = cfg.schedule.select_metric
    scored = [h for h in history if key in h]
    best = max(scored, key=lambda h: h[key]) if scored else history[-1]
    best_dir = checkpoints[best["stage"]]
    shutil.copytree(best_dir, run_dir / "best_checkpoint", dirs_exist_ok=True)
    plot = tracking.plot_stages(history, run_dir / "stages.png", title=f"{cfg.method} on {cfg.data.name}")
    summary = {
        "method": cfg.method, "dataset": cfg.data.name, "run_dir": str(run_dir), "run_id": run_id,
        "tracking_uri": uri, "best_stage": best["stage"], "best": best, "first": history[0],
        "final_num_clusters": history[-1]["num_clusters"], "wall_time_s": time.perf_counter() - t0,
        "history": history,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    tracking.log_artifacts(uri, run_id, {"": run_dir / "labels.npy", "plots": plot,
                                         "best_checkpoint": run_dir / "best_checkpoint",
                                         "summary": run_dir / "summary.json"})
    tracking.finish_run(uri, run_id)
    if not quiet:
        print(f"\n[ureid] {cfg.method} on {cfg.data.name}: {len(history)} stages in {summary['wall_time_s']:.0f}s")
        _print_table(history, best["stage"])
    return summary


def load_run_config(run_dir: str | os.PathLike, overrides=None) -> Config:
    return load_config(Path(run_dir) / "config.yaml", overrides)
