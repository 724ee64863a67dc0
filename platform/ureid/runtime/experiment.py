"""The stage-loop run of a method: a :class:`~.job.Job` whose workers run :mod:`.stage_loop`.

The driver reads and checks the dataset once and ships the records to the workers; it creates the
feature-store actor, launches the trainer, and afterwards writes into the run folder (besides the job's
own files): ``config.yaml`` (the resolved config), ``feature_store/`` (the store's finished updates),
``labels.npy`` (the final pseudo-labels), ``summary.json`` (per-stage metrics from the reports, the
selected stage, wall time), ``stages.png`` and ``best_checkpoint/`` (the selected stage's checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import Config, ConfigError, load_config, save_config
from ..data.run_data import ensure_synthetic, load_split_dataset
from ..methods import RunData, get_method
from .. import tracking
from .job import Job
from .stage_loop import STATE_FILE


def load_run_data(cfg: Config, method) -> RunData:
    """The run's samples: the configured dataset's splits, then what the method adds (read once, in the driver)."""
    ds = load_split_dataset(cfg.data)
    data = RunData(train=list(ds.train), query=list(ds.query), gallery=list(ds.gallery), num_real=len(ds.train))
    _check_scorable("data", cfg.data, data.query, data.gallery)
    if cfg.schedule.validation is not None:
        val = load_split_dataset(cfg.schedule.validation)
        data.validation_query, data.validation_gallery = list(val.query), list(val.gallery)
        _check_scorable("schedule.validation", cfg.schedule.validation, val.query, val.gallery)
    if not data.query and cfg.schedule.select == "oracle_map":
        raise ConfigError(f"schedule.select: 'oracle_map' keeps the stage of best test-set mAP, and {cfg.data.name} at "
                          f"{cfg.data.root!r} has no query/gallery with identities; use last, validation or "
                          "label_free:<score>")
    return method.load_data(cfg, data)


def _data_line(cfg: Config, data: RunData, generated: bool) -> str:
    """``data: market1501 at ROOT: 12,936 training images from 6 cameras; 3,368 query, 15,913 gallery``."""
    d = cfg.data
    name = f"synthetic ({'mars' if d.is_video else 'market1501'} layout{', generated now' if generated else ''})" \
        if d.name == "synthetic" else d.name
    unit = "tracklets" if d.is_video else "images"
    cams = len({r.camid for r in data.train[:data.num_real]})
    line = (f"data: {name} at {d.root}: {data.num_real:,} training {unit[:-1] if data.num_real == 1 else unit} "
            f"from {cams} camera{'s' * (cams != 1)}"
            + (f" (+{len(added):,} {'camera-style fakes' if all(r.is_fake for r in added) else 'the method adds'})"
               if (added := data.train[data.num_real:]) else ""))
    if data.query:
        return line + f"; {len(data.query):,} query, {len(data.gallery):,} gallery {unit} (mAP per stage)"
    return line + "; no labeled query/gallery, so no mAP per stage"


def _check_scorable(key: str, data_cfg, query: list, gallery: list) -> None:
    """A query/gallery split that no query can be scored on (none has a gallery image of its identity from
    another camera) is refused here, before Ray: it failed every stage's evaluation in the train workers."""
    from ..evaluation import valid_queries

    if query and not valid_queries([r.pid for r in query], [r.camid for r in query],
                                   [r.pid for r in gallery], [r.camid for r in gallery]).any():
        raise ConfigError(f"{key}: none of the {len(query)} queries of {data_cfg.name} at {data_cfg.root!r} has a "
                          f"gallery image of its identity from another camera, so no stage could be scored "
                          f"(mAP, CMC); check the query/gallery split (and the pattern's pid and camid groups)")


def _print_table(history: list[dict], selected: int | None, oracle: int | None, criterion: str | None = None) -> None:
    """The per-stage table; ``criterion``: the metric that selected the stage, shown as a column of its own;
    ``oracle`` None: no oracle to mark (no labeled query/gallery)."""
    cols = [("stage", "{:>5}"), ("mAP", "{:>6.1%}"), ("rank1", "{:>6.1%}"), ("num_clusters", "{:>8}"),
            ("merge_precision", "{:>9.3f}"), ("loss", "{:>7.3f}"), ("stage_time_s", "{:>7.0f}")]
    if criterion is not None and criterion not in ("mAP", "rank1"):
        cols.insert(3, (criterion, f"{{:>{max(len(criterion), 7)}.4f}}"))
    cols = [(k, f) for k, f in cols if any(k in h for h in history)]
    heads = {"num_clusters": "clusters", "merge_precision": "merge-prec", "stage_time_s": "time(s)"}
    print("  ".join(f"{heads.get(k, k):>{len(f.format(0)) if k != 'stage' else 5}}" for k, f in cols))
    for h in history:
        row = "  ".join(f.format(h[k]) if k in h else " " * len(f.format(0)) for k, f in cols)
        marks = [name for name, stage in (("selected", selected), ("oracle best", oracle)) if h["stage"] == stage]
        print(row + (f"   <- {', '.join(marks)}" if marks else ""))


def _setting(cfg: Config, method) -> str:
    """The method's key settings, e.g. ``merge_percent=0.1, size_penalty=0.005`` (floats to 4 digits)."""
    block = cfg.clustering.model_dump()
    return ", ".join(f"{k}={block[k]:.4g}" if isinstance(block[k], float) else f"{k}={block[k]}"
                     for k in method.key_settings if k in block)


def _resumed_changes(run_dir: str | os.PathLike, cfg: Config) -> dict:
    """The settings a resume changes: the flattened keys whose value in ``cfg`` differs from the run folder's
    ``config.yaml`` (its ``--set`` overrides), with their new values."""
    before = tracking.flatten(load_run_config(run_dir).with_absolute_paths().to_dict())
    after = tracking.flatten(cfg.to_dict())
    return {k: after.get(k) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}


def _record_resumed_config(job: Job, cfg: Config, changed: dict) -> None:
    """A resume with ``--set`` overrides runs with them, so the run folder's ``config.yaml`` says so from then on
    (the one before kept as ``config.attempt<N>.yaml``, N the attempt that used it) and the MLflow run gets a
    tag naming the changed keys (its params are write-once). Without it a later resume, ``ureid embed`` or a
    reader of the folder would see the first attempt's settings."""
    if not changed:
        return
    path = job.run_dir / "config.yaml"
    kept = job.run_dir / f"config.attempt{job.attempt - 1}.yaml"
    shutil.copyfile(path, kept)
    save_config(cfg, path)
    said = ", ".join(f"{k}={v}" for k, v in changed.items())
    tracking.set_tags(job.tracking_uri, job.run_id, {f"ureid.attempt{job.attempt}.set": said[:5000]})
    print(f"[ureid] resumed with {said}: config.yaml updated, the previous one kept as {kept.name}", flush=True)


def _stages(count: int) -> str:
    return f"{count} stage" + "s" * (count != 1)


def _finished_summary(run_dir: str | os.PathLike) -> dict | None:
    """The summary of a finished run (None: none yet). Resumed with its own config unchanged there is nothing to
    run: Ray, the store and a trainer would start only to find no stage left, and the MLflow run be reopened."""
    path = Path(run_dir).expanduser() / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _resume_point(job: Job) -> tuple[int, str | None]:
    """The first stage to run and the checkpoint to load: after the last stage that has both a checkpoint and
    its line in the history. A process killed after Ray Train persisted a stage's checkpoint but before the
    driver's callback recorded its report left a checkpoint without metrics: that stage runs again."""
    from .callbacks import read_history

    recorded = {h["stage"] for h in read_history(job.history_path)}
    checkpoints = dict(job.checkpoints(STATE_FILE))
    stage = 0
    while stage in recorded and stage in checkpoints:
        stage += 1
    return stage, str(checkpoints[stage - 1]) if stage else None


@contextmanager
def _store_errors_first(store):
    """A store that failed to start fails the workers that call it, after Ray Train's retries; then its own
    error is the one raised (chained to the trainer's), not the trainer's wrapper of it. So is a stage's label
    update, training or evaluation that failed with one of the store's ``DETERMINISTIC_ERRORS``
    (:class:`.feature_store.LabelUpdateError`, :class:`.feature_store.StageError`)."""
    import ray

    from .feature_store import LabelUpdateError, StageError

    try:
        yield
    except Exception as exc:
        try:
            failed = ray.get(store.update_failure.remote(), timeout=60)
        except ray.exceptions.RayActorError as store_error:
            raise store_error from exc
        except Exception:  # the store answered late or oddly: it did not fail to start, the trainer's error stands
            failed = None
        if failed is not None:  # a stage failed in a way no retry changes: that is the run's error
            stage, what, error = failed
            if what != "label update":
                raise StageError(f"stage {stage}'s {what} failed: {error}") from exc
            which = "the first label update (before any training)" if stage < 0 else \
                f"the label update after stage {stage}"
            raise LabelUpdateError(f"{which} failed: {error}") from exc
        raise


def _wait_for_gpu_store(store, ray_cfg) -> None:
    """A store with a GPU share starts before the trainer asks for the workers' GPUs: the start-up check
    counted both, and this order makes sure the store is not the one left without (Ray grants resources in
    no promised order). Its start also checks CUDA (``update_device``), whose error then ends the run here."""
    import ray

    ready = store.pid.remote()
    waited, step = 0, 30
    while True:
        done, _ = ray.wait([ready], timeout=step)
        if done:
            ray.get(ready)  # a store that failed to start raises its own error here
            return
        waited += step
        print(f"[ureid] waiting {waited}s for the feature store's GPU share (ray.store_gpus={ray_cfg.store_gpus:g}): "
              "the cluster has no free GPU for it yet", flush=True)


def run_experiment(cfg: Config, *, resume: str | os.PathLike | None = None, quiet: bool = False,
                   parent_run_id: str | None = None, callbacks: Sequence = (),
                   cluster_placement_group=None, verbose: bool = False, leave_status: bool = False) -> dict:
    """Run (or resume) one method end to end; returns the summary written to summary.json. ``callbacks`` are
    extra Ray Train callbacks (a sweep trial's Tune reporter); ``parent_run_id`` nests the MLflow run;
    ``cluster_placement_group`` is a sweep trial's reservation, where its clustering tasks run;
    ``leave_status``: a failure does not mark the run FAILED, the caller writes its status (a sweep trial, see
    ``Job.failing_loudly``). Unless ``quiet`` or ``verbose``, the driver draws the workers' progress (a bar
    per stage, a line per finished stage, :mod:`.progress`); ``verbose`` shows the workers' own lines and Ray
    Train's INFO output instead; ``quiet`` alone prints nothing, in the driver or the workers (a sweep's trials:
    the sweep says what they do, :class:`.tune.SweepProgress`)."""
    import ray

    from .callbacks import HistoryCallback, MlflowStageCallback, read_history
    from .feature_store import FeatureStore, StoreInputs, save_inputs, store_options
    from .progress import DriverProgress, ProgressRelay
    from .stage_loop import train_loop_per_worker

    t0 = time.perf_counter()
    method = get_method(cfg.method)
    cfg = cfg.with_absolute_paths()
    changed = _resumed_changes(resume, cfg) if resume else {}
    if resume and not changed and (finished := _finished_summary(resume)) is not None:
        if not quiet:
            print(f"[ureid] {Path(resume).expanduser().resolve()} has finished ({_stages(len(finished['history']))}, "
                  f"summary.json): nothing to resume, nothing started. More stages, where the method has them: "
                  f"--set schedule.max_stages=N (or the method's own stage count) with --resume.")
        return finished
    if resume:
        # a sweep trial (leave_status) resumed after its sweep's driver died: the dead driver's trial process,
        # which holds the run's lock, may still be being reaped for a few seconds
        job = Job.reopen(resume, lock_wait_s=60.0 if leave_status else 0.0)
    else:
        job = Job.start(cfg.method, cfg.output_dir, cfg.tracking, params=cfg.to_dict(),
                        tags={"method": cfg.method, "dataset": cfg.data.name,
                              "ureid.setting": _setting(cfg, method), "ureid.selection": cfg.schedule.select},
                        write_config=lambda d: save_config(cfg, d / "config.yaml"), parent_run_id=parent_run_id)
    if not quiet:
        job.announce()
    with job.failing_loudly(leave_status):  # a failure anywhere below marks the MLflow run FAILED, checkpoints stay
        cfg.check_paths()
        method.prepare(cfg)
        generated = ensure_synthetic(cfg.data)
        if cfg.schedule.validation is not None:
            ensure_synthetic(cfg.schedule.validation, "schedule.validation")
        data = load_run_data(cfg, method)  # fail here, in the driver, on a bad dataset
        if not quiet:  # what it trains on, before the first stage's minutes: a wrong data.name shows here
            print(f"[ureid] {_data_line(cfg, data, generated)}", flush=True)
        job.check_training_set(cfg.data.root, [r.paths for r in data.train[: data.num_real]])
        start_stage, resume_from = _resume_point(job)
        read_history(job.history_path, before=start_stage)
        num_stages = method.num_stages(cfg, data)
        if cfg.schedule.max_stages:
            num_stages = min(num_stages, cfg.schedule.max_stages)
        if resume and start_stage >= num_stages and (finished := _finished_summary(job.run_dir)) is not None:
            # resumed with a config that asks for more stages than the method has on this data
            job.finish()
            if not quiet:  # its config.yaml stays the one its stages ran with
                print(f"[ureid] no stage left: the run has {_stages(start_stage)} done and {cfg.method} runs "
                      f"{num_stages} on this data with this config; nothing started"
                      + (", config.yaml left as it was" if changed else ""), flush=True)
            return finished
        if resume:
            _record_resumed_config(job, cfg, changed)

        from .job import check_worker_group, ensure_ray
        from .tasks import check_cluster_slots

        ensure_ray(cfg.ray, job.tracking_uri)
        if cluster_placement_group is None:  # a sweep's driver checked these for its trials
            check_cluster_slots(cfg.ray)
            check_worker_group(cfg.ray)  # before the feature store starts (Job.fit checks again, for StarGAN)
        namespace = f"ureid-{job.run_dir.name}"
        inputs = StoreInputs(num_samples=len(data), num_real=data.num_real, cameras=data.cameras,
                             is_fake=data.is_fake, truth=data.identities(),
                             initial=method.initial_targets(cfg, data), seed=cfg.seed)
        state_dir = job.run_dir / "feature_store"
        store = FeatureStore.options(name="feature_store", namespace=namespace,
                                     **store_options(cfg.ray, cluster_placement_group)).remote(
            method, cfg, save_inputs(inputs, state_dir), cfg.ray.num_workers, str(state_dir), cluster_placement_group,
            first_stage=start_stage)
        if cfg.ray.store_gpus > 0:
            _wait_for_gpu_store(store, cfg.ray)
        relay = None if quiet or verbose else ProgressRelay.options(namespace=namespace).remote()
        try:
            with DriverProgress(relay) if relay is not None else nullcontext(), _store_errors_first(store):
                job.fit(train_loop_per_worker, {
                    "cfg": cfg, "method": method, "data": data, "num_stages": num_stages,
                    "store_name": "feature_store", "namespace": namespace, "resume_from": resume_from,
                    "threads": max(1, int(cfg.ray.cpus_per_worker)), "relay": relay, "verbose": verbose,
                    "silent": quiet and not verbose,
                }, cfg.ray, callbacks=[MlflowStageCallback(job.tracking_uri, job.run_id),
                                       HistoryCallback(job.history_path), *callbacks], verbose=verbose)
            final = ray.get(store.latest_targets.remote())
        finally:
            ray.kill(store)
            if relay is not None:
                ray.kill(relay)

        history = read_history(job.history_path)
        np.save(job.run_dir / "labels.npy", final.labels)
        by_stage = {h["stage"]: h for h in history}
        selected, oracle = history[-1]["selected_stage"], history[-1]["oracle_stage"]
        shutil.copytree(dict(job.checkpoints(STATE_FILE))[selected], job.run_dir / "best_checkpoint", dirs_exist_ok=True)
        plot = tracking.plot_stages(history, job.run_dir / "stages.png", title=f"{cfg.method} on {cfg.data.name}")
        summary = {
            "method": cfg.method, "dataset": cfg.data.name, "run_dir": str(job.run_dir), "run_id": job.run_id,
            "tracking_uri": job.tracking_uri, "selection": cfg.schedule.select, "selected_stage": selected,
            "selected": by_stage[selected], "oracle_stage": oracle, "oracle": by_stage[oracle], "first": history[0],
            "setting": _setting(cfg, method),
            "final_num_clusters": history[-1]["num_clusters"], "wall_time_s": time.perf_counter() - t0,
            "history": history,
        }
        (job.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
        pictures = None
        if cfg.tracking.pictures:
            from ..run_pictures import visualize_run

            try:
                visualize_run(job.run_dir, records=(data.train[: data.num_real], data.query, data.gallery))
                pictures = job.run_dir / "pictures"
            except Exception as exc:  # a picture is worth less than the trained run it would show
                print(f"[ureid] warning: the run's pictures failed ({type(exc).__name__}: {exc}); "
                      f"`ureid visualize {job.run_dir}` draws them again", file=sys.stderr, flush=True)
        job.log_artifacts({"": job.run_dir / "labels.npy", "plots": plot, "best_checkpoint": job.run_dir / "best_checkpoint",
                           "summary": job.run_dir / "summary.json", "pictures": pictures})
        # Summary metrics under names of their own (MLflow's search returns a metric's latest value only).
        chosen, best = by_stage[selected], by_stage[oracle]
        tracking.log_summary(job.tracking_uri, job.run_id, {
            "wall_time_s": summary["wall_time_s"], "selected_at_stage": selected, "oracle_at_stage": oracle,
            **{f"selected_{k}": chosen[k] for k in ("mAP", "rank1", "rank5", "rank10") if k in chosen},
            **{f"best_{k}": best[k] for k in ("mAP", "rank1") if k in best}})
        job.finish()
    if not quiet:
        print(f"\n[ureid] {cfg.method} on {cfg.data.name}: {_stages(len(history))} in {summary['wall_time_s']:.0f}s")
        how = "the last stage" if cfg.schedule.select == "last" else f"by {cfg.schedule.select}"
        labeled = any("mAP" in h for h in history)
        if labeled:
            print(f"[ureid] kept stage {selected} ({how}); the oracle (test-set mAP, labels an "
                  f"unsupervised user does not have) would pick stage {oracle}")
        else:
            hint = (", and --set schedule.select=label_free:<score> keeps the stage one of them ranks best"
                    if cfg.schedule.select == "last" else "")
            print(f"[ureid] kept stage {selected} ({how}); no query/gallery with identities, so no mAP: every "
                  f"label-free score (lf_*) is in {job.history_path.name} and MLflow{hint}")
        criterion = cfg.schedule.criterion()
        _print_table(history, selected, oracle if labeled else None, criterion[0] if criterion else None)
        run = job.run_dir
        print(f"[ureid] its embedding: `ureid embed {run} IMAGES`, `ureid search {run} PROBE --gallery IMAGES`, "
              f"`ureid export {run}`" + (f"; pictures in {pictures}" if pictures else ""))
    return summary


def load_run_config(run_dir: str | os.PathLike, overrides=None) -> Config:
    """The resolved config a run folder keeps (what ``--resume`` continues with)."""
    path = Path(run_dir).expanduser() / "config.yaml"
    if not path.is_file():
        from ..config import ConfigError

        raise ConfigError(f"--resume {run_dir}: not a ureid run folder (no config.yaml; a run writes "
                          f"runs/<method>-<time>-<id>/config.yaml when it starts)")
    return load_config(path, overrides)
