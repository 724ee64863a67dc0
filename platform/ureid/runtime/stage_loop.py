"""The per-worker stage loop that runs inside ``ray.train.torch.TorchTrainer``.

One code path for every method, calling only its hooks (:class:`ureid.methods.Method`): train on the
current targets, evaluate (rank 0), extract this worker's shard of features into the feature store, get
the updated targets back, checkpoint and report the stage with ``ray.train.report``. Every stage reseeds
from ``(seed, stage)``, so a run resumed from a stage checkpoint gives the labels of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from ..engine.seeding import seed_everything
from ..methods.base import Worker
from .feature_store import DETERMINISTIC_ERRORS, PRE_STAGE
from .selection import Selection

STATE_FILE = "state.pt"


def log_line(rank: int, msg: str) -> None:
    # Not print(): Ray Train V2 patches print in workers to also go through logging, which shows every
    # line twice on the driver; a plain stdout write is forwarded once.
    if rank == 0:
        sys.stdout.write(f"[ureid] {msg}\n")
        sys.stdout.flush()


def quiet_ray_train_worker() -> None:
    """Ray Train's per-report lines in a worker ("Reporting training result ...: TrainingReport(<every
    metric>)", "Checkpoint successfully created at ...") come from loggers named after their files, which
    ``ray.train.LoggingConfig`` does not reach; raise just those to WARNING (shown again with --verbose)."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    for module in (context, storage):
        for name in (module.__file__, module.__name__):
            logging.getLogger(name).setLevel(logging.WARNING)


def _barrier(world: int) -> None:
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast(value, rank: int, world: int):
    """Rank 0's value on every rank, so decisions taken on it (early stopping) agree."""
    box = [value if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _load_state(config: dict) -> dict | None:
    """The checkpoint to continue from: Train's own after a worker-group restart, else the resumed run's."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    if config.get("resume_from"):
        return torch.load(Path(config["resume_from"]) / STATE_FILE, map_location="cpu", weights_only=False)
    return None


@contextmanager
def _failing_alike(store, stage: int):
    """A stage's training, evaluation or label update raising one of ``DETERMINISTIC_ERRORS`` (a setting that
    does not fit the data) is recorded in the feature store before it fails the worker: Ray Train restarts
    the worker group after any worker error, and the restarted group, asking the store first, stops instead
    of training the stage again to meet it again. The store's own update errors are recorded by the store."""
    try:
        yield
    except DETERMINISTIC_ERRORS as exc:
        if not isinstance(exc, ray.exceptions.RayError):  # a failed store call: the store knows its own
            ray.get(store.record_failure.remote(stage, "training", f"{type(exc).__name__}: {exc}"))
        raise


def train_loop_per_worker(config: dict) -> None:
    from ..engine.evaluate import evaluate_model
    from ..engine.extract import extract_features
    from ..engine.train import step_lr, train_epoch
    from ..models.invariance import convert_batchnorm

    cfg, method, data = config["cfg"], config["method"], config["data"]
    if not config.get("verbose"):
        quiet_ray_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    device = ray.train.torch.get_device() if cfg.ray.use_gpu else torch.device("cpu")
    store = ray.get_actor(config["store_name"], namespace=config["namespace"])
    n = len(data)

    seed_everything(cfg.seed)
    model = method.build_model(cfg)
    if cfg.train.sync_batchnorm and world > 1:
        model = convert_batchnorm(model, device)
    model = ray.train.torch.prepare_model(model, move_to_device=device)
    # With a relay (runtime/progress.py) rank 0 sends its lines and batch events to the driver's progress
    # display instead of printing them; a bar wants every batch, a log every 20th.
    relay = config.get("relay") if rank == 0 else None
    log_every = 1 if relay is not None else int(config.get("log_every", 20))

    # A quiet run (a sweep's trial, a test) prints nothing from its workers: a sweep's trials forwarded every
    # epoch line of every trial, each prefixed with its worker's pid, among the sweep's own lines.
    silent = bool(config.get("silent"))

    def log(msg: str) -> None:
        if relay is not None:
            relay.push.remote(("line", f"[ureid] {msg}"))
        elif not silent:
            log_line(rank, msg)

    def progress(info: dict) -> None:
        if relay is not None:
            relay.push.remote(("batch", info["epoch"], info["batch"] - 1, info["mean_loss"]))
        else:
            log(f"  epoch {info['epoch'] + 1} batch {info['batch']} loss {info['mean_loss']:.4f}")

    def phase(name: str):
        """What rank 0 does after a stage's training, for the driver's display: a progress(done, total) of
        its images, or None (nothing to show: no relay, another rank)."""
        if relay is None:
            return None
        relay.push.remote(("phase", name))
        return lambda done, total: relay.push.remote(("items", done, total))

    def evaluate() -> dict:
        rerank = {} if cfg.train.eval_rerank else None
        scores = None
        if rank == 0:
            scores = evaluate_model(model, data.query, data.gallery, device, rerank=rerank,
                                    progress=phase("evaluating (query, then gallery images)"),
                                    **cfg.extract_options())
        return _broadcast(scores, rank, world)

    def validate() -> dict:  # another labeled dataset than the target (schedule.validation)
        scores = None
        if rank == 0:
            scores = evaluate_model(model, data.validation_query, data.validation_gallery, device,
                                    progress=phase("validating (query, then gallery images)"),
                                    **cfg.extract_options())
        return {f"val_{k}": v for k, v in _broadcast(scores, rank, world).items()}

    def announce(label: str, epochs: int, batches: int) -> None:
        if relay is not None:
            relay.push.remote(("start", 0, 1, epochs, batches, label))

    worker = Worker(cfg=cfg, model=model, device=device, rank=rank, world_size=world, data=data, log=log,
                    progress=progress, log_every=log_every, evaluate=evaluate, announce=announce)
    net = worker.net

    state = _load_state(config)
    if state is not None:
        net.load_state_dict(state["model"])
        start_stage, method_state, selection = state["stage"] + 1, state["method_state"], state["selection"]
        optimizer_state = state.get("optimizer")
        first_metrics = {}
        log(f"continuing at stage {start_stage}")
    else:
        start_stage, selection, optimizer_state = 0, Selection.from_schedule(cfg.schedule), None
        prepared = method.begin(worker)
        method_state, first_metrics = prepared.state, prepared.metrics

    num_stages = config["num_stages"]
    shard = np.arange(n)[rank::world]
    parts = method.needs_parts and cfg.model.num_stripes > 0

    def extract_and_update(stage: int) -> dict:
        feats = extract_features(net, [data.train[i] for i in shard], device=device, parts=parts,
                                 progress=phase("extracting the training features" if world == 1 else
                                                f"extracting the training features (1 of {world} shards)"),
                                 **cfg.extract_options())
        ray.get(store.put.remote(stage, rank, shard, feats["pooled"], feats.get("parts")))
        phase("updating the labels")
        _barrier(world)
        return ray.get(store.update.remote(stage))

    failed = ray.get(store.update_failure.remote())
    if failed is not None:  # a restart after an error that would come back the same way: do not train for it
        raise RuntimeError(f"stage {failed[0]}'s {failed[1]} failed in an earlier attempt with {failed[2]}; not "
                           f"extracting or training again to meet the same error")
    targets = ray.get(store.targets_for.remote(start_stage))
    if targets is None:  # no initial targets: the first update runs on the prepared model's features
        targets = extract_and_update(PRE_STAGE)["targets"]

    for stage in range(start_stage, num_stages):
        with _failing_alike(store, stage):  # an error no restart changes: kept, so a restart stops at once
            t0 = time.perf_counter()
            stage_seed = cfg.seed * 1000 + stage
            seed_everything(stage_seed)
            method.start_stage(worker, stage, method_state)
            loss_fn = method.build_loss(cfg, targets, n, net.feature_dim).to(device)
            dataset = method.train_dataset(cfg, data, targets)
            recipe = method.recipe(cfg, stage)
            opt = method.build_optimizer(worker, loss_fn, recipe, stage,
                                         optimizer_state if method.persistent_optimizer else None)
            if relay is None:
                log(f"stage {stage} ({stage + 1}/{num_stages}): {targets.num_classes} classes, {recipe.epochs} "
                    f"epochs at lr {recipe.lr}")
            losses, samples, loop_time = [], 0, 0.0
            for epoch in range(recipe.epochs):
                step_lr(opt, epoch, recipe.lr, recipe.lr_step)
                loader = method.train_loader(worker, dataset, stage, epoch)
                if relay is not None and epoch == 0:
                    batches = min(len(loader), cfg.train.max_batches_per_epoch or len(loader))
                    relay.push.remote(("start", stage, num_stages, recipe.epochs, batches))
                out = train_epoch(model, loss_fn, loader, opt, device=device, epoch=epoch, progress=progress,
                                  log_every=log_every, max_batches=cfg.train.max_batches_per_epoch,
                                  sample_seed=stage_seed if cfg.train.per_sample_dropout else None)
                losses.append(out["loss"])
                samples, loop_time = samples + out["samples"], loop_time + out["time_s"]
            train_time = time.perf_counter() - t0
            if method.persistent_optimizer:
                optimizer_state = opt.state_dict()

            # stages_done: the time axis of a sweep's scheduler (ASHA decides after every stage)
            metrics = {"stage": stage, "stages_done": stage + 1, "loss": float(np.mean(losses)),
                       "num_classes": targets.num_classes}
            if data.query:
                metrics.update(evaluate())
            if data.validation_query:
                metrics.update(validate())
            if stage == 0:
                metrics.update(first_metrics)
            if hasattr(loss_fn, "memory"):  # lets the driver check that DDP replicas never drift
                memory = loss_fn.memory.detach().cpu().numpy()
                metrics["memory_checksum"] = hashlib.sha256(memory.tobytes()).hexdigest()
            result = extract_and_update(stage)
            targets = result["targets"]
            metrics.update(result["info"])
            metrics["train_time_s"] = train_time
            # every worker trains on as many samples (the sampler pads the shards), so rank 0's count x world;
            # the training loops' own time, without building the loss and the loader
            metrics["train_samples_per_s"] = samples * world / max(loop_time, 1e-9)
            metrics["stage_time_s"] = time.perf_counter() - t0
            stop = selection.observe(stage, metrics)
            metrics["selected_stage"] = selection.selected_stage
            metrics["oracle_stage"] = selection.oracle_stage
            if rank == 0:
                shown = [f"{k} {metrics[k]:.1%}" for k in ("mAP", "rank1") if k in metrics]
                criterion = cfg.schedule.criterion()  # what keeps a stage, when not the last one or mAP: shown too
                if criterion and criterion[0] not in ("mAP", "rank1") and criterion[0] in metrics:
                    name, value = criterion[0], metrics[criterion[0]]
                    shown.append(f"{name} {value:.1%}" if name.endswith("mAP") else f"{name} {value:.4f}")
                shown += [f"loss {metrics['loss']:.3f}", f"{metrics['num_classes']} classes -> {metrics['num_clusters']} clusters"]
                line = f"stage {stage} ({stage + 1}/{num_stages}) done in {metrics['stage_time_s']:.0f}s: {', '.join(shown)}"
                if relay is not None:
                    relay.push.remote(("end", f"[ureid] {line}"))
                else:
                    log(line)

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:  # what a resume reads, nothing more
                torch.save({"stage": stage, "model": net.state_dict(), "method_state": method_state,
                            "selection": selection, "optimizer": optimizer_state}, Path(tmp) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"stage_{stage:03d}")
        if stop:
            log(f"{cfg.schedule.select} did not improve for {selection.stale} stages: stopping")
            break
