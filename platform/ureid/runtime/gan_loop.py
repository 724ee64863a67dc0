"""The per-worker loop of a StarGAN training job, inside ``ray.train.torch.TorchTrainer`` (the stage loop's
counterpart for :mod:`.stargan`'s job).

Every random draw of iteration ``t`` on rank ``r`` (the batch's images, crops, flips, target cameras and the
gradient penalty's mixing weights) comes from ``numpy.random.default_rng((seed, t, r))``, so a run resumed
from a checkpoint continues with the draws of an uninterrupted one. The global batch is split over the
workers; DDP averages the gradients, so every replica holds the same networks.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..engine.stargan import (CHECKPOINT_PREFIX, GAN_FILE, SAMPLES_FILE, ImageBank, build_networks, sample_columns,
                              sample_grid, to_tensor)
from ..engine.train import unwrap
from ..models.stargan import discriminator_loss, generator_loss, learning_rate, one_hot
from .stage_loop import log_line, quiet_ray_train_worker


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker of a StarGAN job. ``config``: ``gan`` (the validated block), ``paths`` and
    ``domains`` (each training image's camera as a domain index ``0..c_dim-1``), ``cameras`` (the dataset
    camera id of each domain), ``seed``, ``threads``, ``resume_from`` (a checkpoint folder of an earlier
    attempt, or None), ``verbose``, ``relay`` (a :class:`~ureid.runtime.progress.ProgressRelay`, or None): rank 0
    sends it the job's progress (a bar of iterations on the driver's terminal) instead of printing a line per
    log step, each prefixed by Ray with the worker's pid."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    if not config.get("verbose"):
        quiet_ray_train_worker()
    gan, seed = config["gan"], int(config["seed"])
    torch.set_num_threads(int(config["threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    relay = config.get("relay") if rank == 0 else None

    def say(msg: str) -> None:
        if relay is not None:
            relay.push.remote(("line", f"[ureid] {msg}"))
        else:
            log_line(rank, msg)

    device = ray.train.torch.get_device()
    domains = np.asarray(config["domains"], dtype=np.int64)
    c_dim = len(config["cameras"])
    local_batch = gan.batch_size // world + (rank < gan.batch_size % world)
    if local_batch == 0:
        raise ValueError(f"gan.batch_size {gan.batch_size} is smaller than the {world} train workers")

    torch.manual_seed(seed)  # the same initial networks on every rank
    g, d = build_networks(gan, c_dim)
    g_opt = torch.optim.Adam(g.parameters(), gan.g_lr, betas=(gan.beta1, gan.beta2))
    d_opt = torch.optim.Adam(d.parameters(), gan.d_lr, betas=(gan.beta1, gan.beta2))
    start = 0
    checkpoint = ray.train.get_checkpoint()  # a restarted worker group continues from its last report
    source = checkpoint.to_directory() if checkpoint is not None else config.get("resume_from")
    if source:
        state = torch.load(Path(source) / GAN_FILE, map_location="cpu", weights_only=False)
        g.load_state_dict(state["G"])
        d.load_state_dict(state["D"])
        g_opt.load_state_dict(state["g_opt"])
        d_opt.load_state_dict(state["d_opt"])
        start = int(state["iteration"])
        say(f"StarGAN resumed at iteration {start}")
    g = ray.train.torch.prepare_model(g, move_to_device=device)
    d = ray.train.torch.prepare_model(d, move_to_device=device)
    bank = ImageBank(list(config["paths"]), gan)
    grid_idx = sample_columns(domains, gan.sample_images, seed)
    grid_real = to_tensor(np.stack([bank._load(config["paths"][i]) for i in grid_idx])) if len(grid_idx) else None
    if grid_real is not None:  # the grid shows the centre crop
        (fh, fw), (h, w) = bank.full, bank.crop
        top, left = (fh - h) // 2, (fw - w) // 2
        grid_real = grid_real[:, :, top:top + h, left:left + w]

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    if relay is not None:  # one "stage" of iterations, from where a resumed job stands
        relay.push.remote(("start", 0, 1, 1, gan.iterations, "StarGAN"),
                          *((("batch", 0, start - 1, None),) if start else ()))
    t_log = time.perf_counter()
    for it in range(start, gan.iterations):
        rng = np.random.default_rng((seed, it, rank))
        idx = rng.integers(0, len(domains), local_batch)
        real = bank.batch(idx, rng).to(device)
        cam_src = torch.from_numpy(domains[idx]).to(device)
        cam_trg = cam_src[torch.from_numpy(rng.permutation(local_batch)).to(device)]
        alpha = torch.from_numpy(rng.random(local_batch).astype(np.float32)).to(device)
        for group in g_opt.param_groups:
            group["lr"] = learning_rate(gan.g_lr, it, gan.iterations, gan.decay_iterations)
        for group in d_opt.param_groups:
            group["lr"] = learning_rate(gan.d_lr, it, gan.iterations, gan.decay_iterations)

        with torch.no_grad():
            fake = g(real, one_hot(cam_trg, c_dim))
        d_losses = discriminator_loss(d, real, fake, cam_src, alpha, gan.lambda_cls, gan.lambda_gp)
        d_opt.zero_grad(set_to_none=True)
        d_losses["total"].backward()
        d_opt.step()
        losses = {"d_loss": d_losses.pop("total"), **d_losses}
        if (it + 1) % gan.n_critic == 0:
            g_losses = generator_loss(g, d, real, cam_src, cam_trg, gan.lambda_cls, gan.lambda_rec, c_dim)
            g_opt.zero_grad(set_to_none=True)
            g_losses["total"].backward()
            g_opt.step()
            losses.update({"g_loss": g_losses.pop("total"), **g_losses})
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
            counts[k] = counts.get(k, 0) + 1

        done = it + 1
        save = done % gan.checkpoint_every == 0 or done == gan.iterations
        if done % gan.log_every and not save:
            continue
        keys = sorted(sums)
        means = torch.tensor([sums[k] / counts[k] for k in keys], dtype=torch.float64)
        if world > 1:  # the step's mean over every worker's share of the batch
            dist.all_reduce(means)
            means /= world
        elapsed = time.perf_counter() - t_log
        steps = counts["d_loss"]  # iterations since the last report
        metrics = {"iteration": done, **{k: float(v) for k, v in zip(keys, means)},
                   "lr": learning_rate(gan.g_lr, it, gan.iterations, gan.decay_iterations),
                   "iterations_per_s": steps / max(elapsed, 1e-9),
                   "images_per_s": steps * gan.batch_size / max(elapsed, 1e-9)}
        sums, counts, t_log = {}, {}, time.perf_counter()
        grid_now = grid_real is not None and (done % gan.sample_every == 0 or done == gan.iterations)
        if save or grid_now:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    if save:
                        torch.save({"iteration": done, "G": unwrap(g).state_dict(), "D": unwrap(d).state_dict(),
                                    "g_opt": g_opt.state_dict(), "d_opt": d_opt.state_dict(),
                                    "c_dim": c_dim, "cameras": list(config["cameras"]), "gan": gan.model_dump()},
                                   Path(tmp) / GAN_FILE)
                    if grid_now:
                        sample_grid(unwrap(g), grid_real.to(device), c_dim).save(Path(tmp) / SAMPLES_FILE)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                else:
                    ckpt = None
                ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"{CHECKPOINT_PREFIX}_{done:07d}")
        else:
            ray.train.report(metrics)
        if relay is not None:
            shown = {"d_loss": metrics.get("d_loss"), "g_loss": metrics.get("g_loss"), "rec": metrics.get("g_rec")}
            relay.push.remote(("batch", 0, done - 1, None, {k: v for k, v in shown.items() if v is not None}))
        else:
            log_line(rank, f"StarGAN iteration {done}/{gan.iterations}  d_loss {metrics.get('d_loss', 0):.3f}  "
                       f"g_loss {metrics.get('g_loss', float('nan')):.3f}  rec {metrics.get('g_rec', float('nan')):.3f}  "
                       f"{metrics['iterations_per_s']:.1f} it/s")
