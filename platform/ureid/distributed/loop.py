"""The per-worker stage loop that runs inside ``ray.train.torch.TorchTrainer``.

One code path for every method: train on the current targets, extract features of this worker's
shard into the feature-store actor, evaluate (rank 0), get the updated targets back, checkpoint and
report the stage with ``ray.train.report``. Every stage reseeds from ``(seed, stage)`` so a run resumed
from a stage checkpoint gives the same labels as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from ..config import Config
from ..methods import METHODS, l2_normalise, num_clusters

STATE_FILE = "state.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _log(rank: int, msg: str) -> None:
    # Not print(): Ray Train V2 patches print in workers to also go through logging, which shows
    # every line twice on the driver; a plain stdout write is forwarded once.
    if rank == 0:
        sys.stdout.write(f"[ureid] {msg}\n")
        sys.stdout.flush()


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _barrier(world: int) -> None:
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


class _SupportSetDataset(torch.utils.data.Dataset):
    """camstyle: each epoch still draws N images, one member of each real image's support set
    (the image or one of its camera-style fakes), chosen by a seeded RNG per (epoch, image)."""

    def __init__(self, base, support: list[list[int]], seed: int):
        self.base, self.support, self.seed, self.epoch = base, support, seed, 0

    def set_epoch(self, seed: int, epoch: int) -> None:  # called by make_loader every epoch
        self.seed, self.epoch = seed, epoch
        self.base.set_epoch(seed, epoch)

    def __len__(self):
        return len(self.support)

    def __getitem__(self, i):
        members = self.support[i]
        pick = members[np.random.default_rng((self.seed, self.epoch, i)).integers(len(members))]
        return self.base[pick]


def _build_loss(cfg: Config, method, targets, n: int, feat_dim: int, device):
    from ..models import losses

    if method.loss == "memory":
        loss = losses.MemoryTable(cfg.model.embedding_dim, temperature=cfg.loss.temperature)
        loss.reset(int(targets["labels"].max()) + 1)
    elif method.loss == "softened":
        loss = losses.SoftenedMemoryLoss(
            cfg.model.embedding_dim, n, temperature=cfg.loss.temperature, soft_weight=cfg.clustering.soft_weight
        )
        if "neighbors" in targets:
            loss.set_neighbors(torch.as_tensor(targets["neighbors"]))
    else:
        classes = int(np.unique(targets["labels"][targets["selected"]]).size)
        loss = losses.ClassifierHead(feat_dim, classes, dropout=cfg.model.dropout)
    return loss.to(device)


def _train_dataset(cfg: Config, method, records, targets, support):
    from ..engine.datasets import ReidImageDataset, ReidVideoDataset, build_transforms

    tf = build_transforms(cfg.data.height, cfg.data.width, train=True, color_jitter=cfg.data.color_jitter)
    labels = targets["labels"]
    if method.loss == "classifier":  # PUL trains only on the selected samples, classes made contiguous
        keep = np.flatnonzero(targets["selected"])
        _, labels = np.unique(labels[keep], return_inverse=True)
        records = [records[i] for i in keep]
    if cfg.data.is_video:
        return ReidVideoDataset(records, tf, labels=labels, seq_len=cfg.data.seq_len, mode="train")
    base = ReidImageDataset(records, tf, labels=labels)
    return _SupportSetDataset(base, support, cfg.seed) if support is not None else base


def pretrain_rates(cfg: Config) -> tuple[float, float]:
    """PUL source pre-training's (lr, backbone_lr_mult): ``clustering.pretrain_*``, else the ``train.*`` value."""
    c = cfg.clustering
    lr = cfg.train.lr if c.pretrain_lr is None else c.pretrain_lr
    mult = cfg.train.backbone_lr_mult if c.pretrain_backbone_lr_mult is None else c.pretrain_backbone_lr_mult
    return lr, mult


def _pretrain_source(cfg: Config, model, device, rank: int, world: int, source_records, progress,
                     log_every: int) -> dict:
    """PUL's original model: the backbone fine-tuned with a classifier on a labeled source dataset."""
    from ..engine.datasets import ReidImageDataset, build_transforms, make_loader
    from ..engine.train import build_optimizer, step_lr, train_epoch
    from ..models.losses import ClassifierHead

    _, labels = np.unique([r.pid for r in source_records], return_inverse=True)
    ds = ReidImageDataset(source_records, build_transforms(cfg.data.height, cfg.data.width, True, color_jitter=cfg.data.color_jitter), labels=labels)
    head = ClassifierHead(_unwrap(model).feature_dim, int(labels.max()) + 1, dropout=cfg.model.dropout).to(device)
    lr, mult = pretrain_rates(cfg)
    opt = build_optimizer(_unwrap(model), head.parameters(), lr, mult, cfg.train.momentum, cfg.train.weight_decay,
                          cfg.train.nesterov)
    epochs = cfg.clustering.pretrain_epochs
    for epoch in range(epochs):
        step_lr(opt, epoch, lr, max(1, int(epochs * 0.8)))
        loader = make_loader(ds, cfg.train.batch_size, shuffle=True, seed=cfg.seed, epoch=1000 + epoch,
                             num_workers=cfg.data.num_workers, rank=rank, world_size=world, drop_last=True)
        out = train_epoch(model, head, loader, opt, device=device, epoch=epoch, progress=progress,
                          log_every=log_every, max_batches=cfg.train.max_batches_per_epoch)
        _log(rank, f"source pre-training epoch {epoch + 1}/{epochs} loss {out['loss']:.4f}")
    return {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}


def _extract(cfg, model, records, device, parts=False):
    from ..engine.extract import extract_features

    return extract_features(
        _unwrap(model), records, height=cfg.data.height, width=cfg.data.width,
        batch_size=cfg.train.eval_batch_size, num_workers=cfg.data.num_workers, device=device,
        video=cfg.data.is_video, max_frames=cfg.data.max_test_frames, parts=parts,
    )


def evaluate_model(cfg, model, query, gallery, device) -> dict:
    """mAP and rank-1/5/10 of ``model`` on query/gallery (Market-1501 protocol, unit pooled features)."""
    from ..evaluation import evaluate, pairwise_distance

    q = l2_normalise(_extract(cfg, model, query, device)["pooled"])
    g = l2_normalise(_extract(cfg, model, gallery, device)["pooled"])
    res = evaluate(
        pairwise_distance(q, g, metric="sqeuclidean"),
        np.array([r.pid for r in query]), np.array([r.pid for r in gallery]),
        np.array([r.camid for r in query]), np.array([r.camid for r in gallery]),
    )
    return {"mAP": float(res["mAP"]), "rank1": float(res["rank1"]), "rank5": float(res["rank5"]),
            "rank10": float(res["rank10"])}


def _evaluate_all_ranks(cfg, model, data, device, rank: int, world: int) -> dict:
    """Rank 0 evaluates; every rank gets the numbers, so decisions taken on them (early stopping) agree."""
    scores = [evaluate_model(cfg, model, data["query"], data["gallery"], device) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(scores, src=0)
    return scores[0]


def train_loop_per_worker(config: dict) -> None:
    from ..engine.datasets import make_loader
    from ..engine.train import build_optimizer, step_lr, train_epoch
    from ..models.backbone import ReidNet
    from .data import load_run_data

    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    device = ray.train.torch.get_device() if cfg.ray.use_gpu else torch.device("cpu")
    method = METHODS[cfg.method]
    data = load_run_data(cfg)
    train, n = data["train"], len(data["train"])
    store = ray.get_actor(config["store_name"], namespace=config["namespace"])

    seed_everything(cfg.seed)
    # PUL's classifier sits on the pooled feature: no embedding head (an unused head breaks DDP).
    embedding_dim = 0 if method.loss == "classifier" else cfg.model.embedding_dim
    model = ReidNet(cfg.model.arch, weights=cfg.model.weights, embedding_dim=embedding_dim,
                    dropout=cfg.model.dropout, num_stripes=cfg.model.num_stripes,
                    frozen_stages=cfg.model.frozen_stages)
    model = ray.train.torch.prepare_model(model, move_to_device=device)
    log_every = int(config.get("log_every", 20))

    def progress(info: dict) -> None:
        _log(rank, f"  epoch {info['epoch'] + 1} batch {info['batch']} loss {info['mean_loss']:.4f}")

    start_stage, original_state, best, stale, source_scores = 0, None, None, 0, {}
    if config.get("resume_from"):
        state = torch.load(Path(config["resume_from"]) / STATE_FILE, map_location="cpu", weights_only=False)
        _unwrap(model).load_state_dict(state["model"])
        start_stage, targets = state["stage"] + 1, state["targets"]
        original_state, best, stale = state.get("original_model"), state.get("best"), state.get("stale", 0)
        _log(rank, f"resumed from {config['resume_from']} at stage {start_stage}")
    elif method.fine_tune_from_original:
        original_state = _pretrain_source(cfg, model, device, rank, world, data["source"], progress, log_every)
        targets = None
        if data["query"]:  # the direct-transfer baseline PUL starts from, logged with stage 0
            source_scores = _evaluate_all_ranks(cfg, model, data, device, rank, world)
            _log(rank, f"source model on the target: mAP {source_scores['mAP']:.4f} rank1 {source_scores['rank1']:.4f}")
    else:
        targets = method.initial_targets(n, support=data.get("support_labels"))

    num_stages = method.num_stages(cfg, data["n0"])
    if cfg.schedule.max_stages:
        num_stages = min(num_stages, cfg.schedule.max_stages)
    shard = np.arange(n)[rank::world]

    def extract_and_update(stage, targets):
        parts = method.needs_parts and cfg.model.num_stripes > 0
        feats = _extract(cfg, model, [train[i] for i in shard], device, parts=parts)
        ray.get(store.put.remote(stage, rank, shard, feats["pooled"], feats.get("parts")))
        _barrier(world)
        return ray.get(store.update.remote(stage, targets))

    if targets is None:  # PUL: the first clustering runs on the original model's features
        targets = extract_and_update(-1, {"labels": np.zeros(n, dtype=np.int64)})["targets"]

    for stage in range(start_stage, num_stages):
        t0 = time.perf_counter()
        seed_everything(cfg.seed * 1000 + stage)
        if original_state is not None:  # PUL fine-tunes from the original model every iteration
            _unwrap(model).load_state_dict(original_state)
        loss_fn = _build_loss(cfg, method, targets, n, _unwrap(model).feature_dim, device)
        dataset = _train_dataset(cfg, method, train, targets, data.get("support"))
        first = stage == 0 or method.fine_tune_from_original
        epochs = cfg.train.first_stage_epochs if first else cfg.train.stage_epochs
        base_lr = cfg.train.lr if first else cfg.train.stage_lr
        extra = [p for p in loss_fn.parameters() if p.requires_grad]
        opt = build_optimizer(_unwrap(model), extra, base_lr, cfg.train.backbone_lr_mult, cfg.train.momentum,
                              cfg.train.weight_decay, cfg.train.nesterov)
        _log(rank, f"stage {stage + 1}/{num_stages}: {num_clusters(targets)} classes, {epochs} epochs at lr {base_lr}")
        losses = []
        for epoch in range(epochs):
            step_lr(opt, epoch, base_lr, cfg.train.first_stage_lr_step if first else 10**6)
            loader = make_loader(dataset, cfg.train.batch_size, shuffle=True, seed=cfg.seed * 1000 + stage,
                                 epoch=epoch, num_workers=cfg.data.num_workers, rank=rank, world_size=world,
                                 drop_last=len(dataset) >= cfg.train.batch_size * world)
            out = train_epoch(model, loss_fn, loader, opt, device=device, epoch=epoch, progress=progress,
                              log_every=log_every, max_batches=cfg.train.max_batches_per_epoch)
            losses.append(out["loss"])
        train_time = time.perf_counter() - t0

        metrics = {"stage": stage, "loss": float(np.mean(losses)), "num_classes": num_clusters(targets)}
        if data["query"]:
            metrics.update(_evaluate_all_ranks(cfg, model, data, device, rank, world))
        if stage == 0:
            metrics.update({f"source_model_{k}": v for k, v in source_scores.items()})
        if method.loss != "classifier":  # lets the driver check that DDP replicas never drift
            memory = loss_fn.memory.detach().cpu().numpy()
            metrics["memory_checksum"] = hashlib.sha256(memory.tobytes()).hexdigest()
        result = extract_and_update(stage, targets)
        targets = result["targets"]
        metrics.update(result["info"])
        metrics["num_clusters"] = num_clusters(targets)
        metrics["train_time_s"] = train_time
        metrics["stage_time_s"] = time.perf_counter() - t0

        score = metrics.get(cfg.schedule.select_metric)
        if score is not None and (best is None or score > best["score"]):
            best, stale = {"score": score, "stage": stage}, 0
        else:
            stale += 1
        metrics["best_stage"] = best["stage"] if best else stage
        stop = bool(cfg.schedule.patience and stale >= cfg.schedule.patience)
        if rank == 0:
            shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("mAP", "rank1", "loss") if k in metrics)
            _log(rank, f"stage {stage + 1}/{num_stages} done in {metrics['stage_time_s']:.0f}s: {shown}, "
                       f"{metrics['num_clusters']} clusters")

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                loss_state = loss_fn.state_dict() if method.loss != "classifier" else None
                torch.save({
                    "stage": stage, "model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                    "memory": loss_state, "targets": targets, "rng": rng_states(), "best": best, "stale": stale,
                    "original_model": original_state, "metrics": metrics, "config": cfg.to_dict(),
                }, Path(tmp) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"stage_{stage:03d}")
        if stop:
            _log(rank, f"validation {cfg.schedule.select_metric} did not improve for {stale} stages: stopping")
            break
