"""StarGAN jobs on the shared runtime: training as a Ray Train job, generation as Ray tasks, and the cache
that lets camstyle reuse both.

Training (:func:`train_stargan`, ``ureid camstyle train``) is a :class:`~.job.Job` like a method's run: a run
folder, an MLflow run with the losses at every ``gan.log_every`` iterations (``step`` = iteration) and the
sample grid as an artifact at every ``gan.sample_every`` and at the end, a checkpoint every
``gan.checkpoint_every`` iterations, DDP over ``ray.num_workers``, ``--resume RUN_DIR``. Its run folder ends
with ``stargan.pt`` (the generator, what generation needs) and ``samples.png``.

Generation (:func:`generate_fakes`, ``ureid camstyle generate``) fans the training images out over Ray tasks
(one GPU each when ``ray.use_gpu``), each writing the missing fakes of its chunk (:mod:`ureid.engine.stargan`).

The cache (:func:`ensure_stargan_fakes`, used by camstyle) lives beside the dataset's images in
``<root>/camstyle_stargan/<key>/`` (:mod:`ureid.data.camstyle`): ``<key>`` hashes the training images and every
GAN setting that changes the generator, so another config trains another GAN and the same one is reused.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
from ray.train import UserCallback

from .. import tracking
from ..config import GanConfig, RayConfig
from ..data.camstyle import camera_domains, missing_fakes, stargan_cache, stargan_fake_folder, stargan_key
from ..data.records import Record
from ..engine.stargan import CHECKPOINT_PREFIX, GAN_FILE, SAMPLES_FILE
from .callbacks import stage_metrics
from .job import Job, ensure_ray

MODEL_FILE = "stargan.pt"
LOSSES_FILE = "losses.jsonl"


def training_images(gcfg: GanConfig) -> list[Record]:
    from ..data.run_data import load_split_dataset

    return [r for r in load_split_dataset(gcfg.data).train if not r.is_fake]


class GanReportCallback(UserCallback):
    """In the Train controller after every report: the losses to MLflow (step = iteration) and to
    ``losses.jsonl``; a checkpoint's sample grid to ``samples/iter_<n>.png`` and MLflow's ``samples/``."""

    def __init__(self, uri: str, run_id: str, run_dir: str):
        self.uri, self.run_id, self.run_dir = uri, run_id, run_dir

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        m = stage_metrics(metrics)
        step = int(m.pop("iteration"))
        tracking.log_stage(self.uri, self.run_id, step, m, timestamp_ms=int(time.time() * 1000))
        with open(Path(self.run_dir) / LOSSES_FILE, "a") as f:
            f.write(json.dumps({"iteration": step, **m}) + "\n")
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                grid = Path(folder) / SAMPLES_FILE
                if grid.is_file():
                    out = Path(self.run_dir) / "samples" / f"{CHECKPOINT_PREFIX}_{step:07d}.png"
                    out.parent.mkdir(exist_ok=True)
                    shutil.copyfile(grid, out)
                    tracking.log_artifacts(self.uri, self.run_id, {"samples": out})


def read_losses(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / LOSSES_FILE
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["iteration"]] = row  # a resumed run may repeat an iteration: the last one wins
    return [rows[k] for k in sorted(rows)]


def export_generator(checkpoint_dir: Path, out: Path) -> Path:
    """The generator and what generation needs (cameras, sizes) from a training checkpoint, as ``out``."""
    import torch

    state = torch.load(checkpoint_dir / GAN_FILE, map_location="cpu", weights_only=False)
    tmp = out.with_name(f".tmp-{out.name}")
    torch.save({k: state[k] for k in ("iteration", "G", "c_dim", "cameras", "gan")}, tmp)
    tmp.replace(out)
    return out


def train_stargan(gcfg: GanConfig, *, resume: str | Path | None = None, verbose: bool = False,
                  quiet: bool = False) -> dict:
    """Train (or resume) a StarGAN over the cameras of ``gcfg.data``'s training images; returns the summary
    written to the run folder's ``summary.json`` (``model``: the exported generator)."""
    from ..data.run_data import ensure_synthetic
    from .gan_loop import train_loop_per_worker
    from .progress import DriverProgress, ProgressRelay

    t0 = time.perf_counter()
    gcfg = gcfg.with_absolute_paths()
    if resume:
        job = Job.reopen(resume)
    else:
        def write(d: Path) -> Path:
            import yaml

            (d / "config.yaml").write_text(yaml.safe_dump(gcfg.to_dict(), sort_keys=False))
            return d / "config.yaml"

        job = Job.start("stargan", gcfg.output_dir, gcfg.tracking, params=gcfg.to_dict(),
                        tags={"ureid.kind": "stargan", "dataset": gcfg.data.name}, write_config=write)
    if not quiet:
        job.announce()
    with job.failing_loudly():
        gcfg.data.check_paths("data")
        ensure_synthetic(gcfg.data)
        records = training_images(gcfg)
        cameras, domains = camera_domains(records, f"data.root {gcfg.data.root}")
        done = job.checkpoints(GAN_FILE, CHECKPOINT_PREFIX)
        resume_from = str(done[-1][1]) if done else None
        if not (done and done[-1][0] >= gcfg.gan.iterations):  # trained to the end: only the export runs again
            ensure_ray(gcfg.ray, job.tracking_uri)
            # as a method's run: the workers' progress drawn by the driver (runtime/progress.py)
            relay = None if quiet or verbose else ProgressRelay.remote()
            with DriverProgress(relay) if relay is not None else contextlib.nullcontext():
                job.fit(train_loop_per_worker, {
                    "gan": gcfg.gan, "paths": [r.path for r in records], "domains": domains.tolist(),
                    "cameras": cameras, "seed": gcfg.seed, "threads": max(1, int(gcfg.ray.cpus_per_worker)),
                    "resume_from": resume_from, "verbose": verbose, "relay": relay,
                }, gcfg.ray, callbacks=[GanReportCallback(job.tracking_uri, job.run_id, str(job.run_dir))],
                    verbose=verbose)
        last_iter, last = job.checkpoints(GAN_FILE, CHECKPOINT_PREFIX)[-1]
        model = export_generator(last, job.run_dir / MODEL_FILE)
        if (last / SAMPLES_FILE).is_file():
            shutil.copyfile(last / SAMPLES_FILE, job.run_dir / SAMPLES_FILE)
        losses = read_losses(job.run_dir)
        rates = [r["iterations_per_s"] for r in losses if "iterations_per_s" in r]
        summary = {"kind": "stargan", "run_dir": str(job.run_dir), "run_id": job.run_id,
                   "tracking_uri": job.tracking_uri, "model": str(model), "iterations": last_iter,
                   "cameras": cameras, "num_images": len(records), "wall_time_s": time.perf_counter() - t0,
                   "iterations_per_s": float(np.median(rates)) if rates else None,
                   "final": losses[-1] if losses else {}}
        (job.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        job.log_artifacts({"model": model, "": job.run_dir / "summary.json"})
        job.finish()
    if not quiet:
        f = summary["final"]
        print(f"[ureid] StarGAN over {len(cameras)} cameras, {len(records)} images: {last_iter} iterations in "
              f"{summary['wall_time_s']:.0f}s; last losses d {f.get('d_loss', float('nan')):.3f} "
              f"g {f.get('g_loss', float('nan')):.3f} cycle {f.get('g_rec', float('nan')):.3f}\n"
              f"[ureid] generator {model}", flush=True)
    return summary


def generate_fakes(checkpoint: str | Path, records: list[Record], out_dir: str | Path,
                   ray_cfg: RayConfig | None = None, *, threads: int | None = None,
                   chunk: int | None = None, quiet: bool = False) -> dict:
    """Every missing fake of ``records`` (one per other camera of the generator) in ``out_dir``, by Ray tasks
    of ``chunk`` images each; the same checkpoint gives the same bytes. ``checkpoint``: a ``stargan.pt``, a
    training checkpoint file or folder, or a StarGAN run folder. Every node must be able to read it and write
    ``out_dir`` (shared storage on a cluster)."""
    import ray

    from ..engine.stargan import generate_chunk, load_generator

    checkpoint = resolve_checkpoint(checkpoint)
    _, info = load_generator(checkpoint)
    unknown = sorted({r.camid for r in records} - set(info["cameras"]))
    if unknown:
        raise ValueError(f"{checkpoint}: the generator knows cameras {info['cameras']} (0-based), but the images "
                         f"include camera(s) {unknown}; it was trained on another dataset")
    if any(len(r.paths) > 1 for r in records):
        raise ValueError("StarGAN camera-style transfer works on image datasets, not video tracklets")
    gan = info["gan"]
    threads, chunk = threads or gan.generate_threads, chunk or gan.generate_chunk
    ray_cfg = ray_cfg or RayConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Only sources with a missing fake go to the tasks: a complete folder costs no task (a sweep trial, whose
    # placement group holds no spare CPU, never waits for one).
    sources = [(r.path, r.camid) for r in records if missing_fakes(r.path, info["cameras"], r.camid, out)]
    t0 = time.perf_counter()
    parts = []
    if sources:
        ensure_ray(ray_cfg)
        task = ray.remote(generate_chunk).options(num_cpus=threads, num_gpus=1 if ray_cfg.use_gpu else 0)
        device = "cuda" if ray_cfg.use_gpu else "cpu"
        parts = ray.get([task.remote(str(checkpoint), sources[i:i + chunk], str(out), threads, device)
                         for i in range(0, len(sources), chunk)])
    wall = time.perf_counter() - t0
    written = sum(p["written"] for p in parts)
    result = {"written": written, "skipped_sources": len(records) - len(sources), "tasks": len(parts),
              "wall_time_s": wall, "images_per_s": written / wall if written else None, "folder": str(out),
              "checkpoint": str(checkpoint)}
    if not quiet:
        print(f"[ureid] StarGAN fakes: wrote {written} ({result['skipped_sources']} of {len(records)} source images "
              f"already complete) in {wall:.1f}s by {len(parts)} task(s) -> {out}", flush=True)
    return result


def resolve_checkpoint(path: str | Path) -> Path:
    """A generator file from what a user may point at: the file, a checkpoint folder, or a run folder."""
    from .job import stage_checkpoints

    p = Path(path).expanduser().resolve()
    if p.is_file():
        return p
    for candidate in (p / MODEL_FILE, p / GAN_FILE):
        if candidate.is_file():
            return candidate
    found = stage_checkpoints(p, GAN_FILE, CHECKPOINT_PREFIX) if p.is_dir() else []
    if found:
        return found[-1][1] / GAN_FILE
    raise FileNotFoundError(f"--checkpoint {path}: no StarGAN generator there (expected {MODEL_FILE}, a "
                            f"checkpoint folder with {GAN_FILE}, or a StarGAN run folder)")


def ensure_stargan_fakes(gcfg: GanConfig, records: list[Record], *, verbose: bool = False,
                         quiet: bool = False) -> Path:
    """The StarGAN fakes of ``records`` for ``gcfg``: trained and generated when missing, reused otherwise."""
    gcfg = gcfg.with_absolute_paths()
    camera_domains(records, f"data.root {gcfg.data.root}")  # refuse single-camera and video sets up front
    key = stargan_key(gcfg, records)
    cache = stargan_cache(gcfg.data.root, key)
    model = cache / MODEL_FILE
    if not model.is_file():
        if not quiet:
            print(f"[ureid] camstyle: no StarGAN for this dataset and GAN config yet (key {key}): training one",
                  flush=True)
        summary = train_stargan(gcfg, verbose=verbose, quiet=quiet)
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "run.json").write_text(json.dumps({k: summary[k] for k in ("run_dir", "run_id", "tracking_uri")}
                                                   | {"key": key, "config": gcfg.to_dict()}, indent=1))
        tmp = cache / f".tmp-{MODEL_FILE}"
        shutil.copyfile(summary["model"], tmp)
        tmp.replace(model)  # the cache entry appears only whole
    elif not quiet:
        print(f"[ureid] camstyle: reusing the StarGAN in {cache}", flush=True)
    folder = stargan_fake_folder(gcfg.data.root, key)
    generate_fakes(model, records, folder, gcfg.ray, quiet=quiet)
    return folder

