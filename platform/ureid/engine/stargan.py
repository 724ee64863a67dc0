"""StarGAN over the cameras: the per-worker training loop (inside ``TorchTrainer``) and the generation of one
chunk of fakes (inside a Ray task). The networks and losses are :mod:`ureid.models.stargan`; the driver side
(the job, its callbacks, the generation tasks, the cache) is :mod:`ureid.runtime.stargan`.

Every random draw of iteration ``t`` on rank ``r`` (the batch's images, crops, flips, target cameras and the
gradient penalty's mixing weights) comes from ``numpy.random.default_rng((seed, t, r))``, so a run resumed
from a checkpoint continues with the draws of an uninterrupted one.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..models.stargan import (Discriminator, Generator, discriminator_loss, generator_loss, learning_rate,
                              one_hot, to_image_range)

GAN_FILE = "gan.pt"          # a training checkpoint (both networks, both optimizers, the iteration)
SAMPLES_FILE = "samples.png"  # the sample grid saved beside it
CHECKPOINT_PREFIX = "iter"   # checkpoint folders iter_0005000/, ...


def build_networks(gan, c_dim: int) -> tuple[Generator, Discriminator]:
    return (Generator(c_dim, gan.conv_dim, gan.repeat_num),
            Discriminator(c_dim, gan.height, gan.width, gan.d_conv_dim, gan.d_repeat_num))


def load_image(path: str, height: int, width: int) -> np.ndarray:
    """(3, height, width) uint8, bicubic resize."""
    img = Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1] (the generator's tanh range)."""
    return torch.from_numpy(batch.astype(np.float32) / 127.5 - 1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), rounded."""
    return (to_image_range(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class ImageBank:
    """The training images at the pre-crop size ``(round(H * crop_scale), round(W * crop_scale))``: decoded
    once when they fit in ``cache_mb``, else on every draw."""

    def __init__(self, paths: list[str], gan):
        self.paths = paths
        self.full = (round(gan.height * gan.crop_scale), round(gan.width * gan.crop_scale))
        self.crop = (gan.height, gan.width)
        need_mb = len(paths) * 3 * self.full[0] * self.full[1] / 2 ** 20
        self.cache = np.stack([self._load(p) for p in paths]) if need_mb <= gan.cache_images_mb else None

    def _load(self, path: str) -> np.ndarray:
        return load_image(path, *self.full)

    def batch(self, idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Random crop and horizontal flip of the images ``idx``, as floats in [-1, 1]."""
        (fh, fw), (h, w) = self.full, self.crop
        tops, lefts = rng.integers(0, fh - h + 1, len(idx)), rng.integers(0, fw - w + 1, len(idx))
        flips = rng.random(len(idx)) < 0.5
        out = np.empty((len(idx), 3, h, w), dtype=np.uint8)
        for j, i in enumerate(idx):
            img = self.cache[i] if self.cache is not None else self._load(self.paths[i])
            img = img[:, tops[j]:tops[j] + h, lefts[j]:lefts[j] + w]
            out[j] = img[:, :, ::-1] if flips[j] else img
        return to_tensor(out)


def sample_columns(cameras: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Fixed images for the sample grid: cycling over the cameras so every source camera appears."""
    rng = np.random.default_rng((seed, 7))
    by_cam = [rng.permutation(np.flatnonzero(cameras == c)) for c in np.unique(cameras)]
    picks = [by_cam[j % len(by_cam)][j // len(by_cam)] for j in range(count)
             if j // len(by_cam) < len(by_cam[j % len(by_cam)])]
    return np.asarray(picks, dtype=np.int64)


@torch.no_grad()
def sample_grid(g: torch.nn.Module, real: torch.Tensor, c_dim: int) -> Image.Image:
    """A row of real images, then one row per target camera (the generator applied to each)."""
    rows = [real] + [g(real, one_hot(torch.full((len(real),), c), c_dim)) for c in range(c_dim)]
    tiles = to_uint8(torch.cat(rows))  # (rows * cols, H, W, 3)
    n, h, w = len(real), real.shape[2], real.shape[3]
    grid = tiles.reshape(len(rows), n, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(len(rows) * h, n * w, 3)
    return Image.fromarray(np.ascontiguousarray(grid))


def _log(rank: int, msg: str) -> None:
    if rank == 0:  # a plain stdout write: Ray Train's patched print() shows a line twice on the driver
        sys.stdout.write(f"[ureid] {msg}\n")
        sys.stdout.flush()


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    return m.module if isinstance(m, torch.nn.parallel.DistributedDataParallel) else m


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker of a StarGAN job. ``config``: ``gan`` (the validated block), ``paths`` and
    ``domains`` (each training image's camera as a domain index ``0..c_dim-1``), ``cameras`` (the dataset
    camera id of each domain), ``seed``, ``threads``, ``resume_from`` (a checkpoint folder of an earlier
    attempt, or None), ``verbose``."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from ..runtime.stage_loop import quiet_ray_train_worker

    if not config.get("verbose"):
        quiet_ray_train_worker()
    gan, seed = config["gan"], int(config["seed"])
    torch.set_num_threads(int(config["threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
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
        _log(rank, f"StarGAN resumed at iteration {start}")
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
                        torch.save({"iteration": done, "G": _unwrap(g).state_dict(), "D": _unwrap(d).state_dict(),
                                    "g_opt": g_opt.state_dict(), "d_opt": d_opt.state_dict(),
                                    "c_dim": c_dim, "cameras": list(config["cameras"]), "gan": gan.model_dump()},
                                   Path(tmp) / GAN_FILE)
                    if grid_now:
                        sample_grid(_unwrap(g), grid_real.to(device), c_dim).save(Path(tmp) / SAMPLES_FILE)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                else:
                    ckpt = None
                ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"{CHECKPOINT_PREFIX}_{done:07d}")
        else:
            ray.train.report(metrics)
        _log(rank, f"StarGAN iteration {done}/{gan.iterations}  d_loss {metrics.get('d_loss', 0):.3f}  "
                   f"g_loss {metrics.get('g_loss', float('nan')):.3f}  rec {metrics.get('g_rec', float('nan')):.3f}  "
                   f"{metrics['iterations_per_s']:.1f} it/s")


# ----------------------------------------------------------------------------- generation


def load_generator(checkpoint: str | os.PathLike, device: str = "cpu") -> tuple[Generator, dict]:
    """The generator of a StarGAN file (a training checkpoint or an exported ``stargan.pt``) in eval mode."""
    from ..config import StarGANSettings

    state = torch.load(Path(checkpoint), map_location="cpu", weights_only=False)
    gan = StarGANSettings.model_validate(state["gan"])
    g = Generator(state["c_dim"], gan.conv_dim, gan.repeat_num)
    g.load_state_dict(state["G"])
    return g.to(device).eval(), {"gan": gan, "cameras": list(state["cameras"]), "iteration": state["iteration"]}


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@torch.no_grad()
def generate_chunk(checkpoint: str, sources: list[tuple[str, int]], out_dir: str, threads: int = 1,
                   device: str = "cpu") -> dict:
    """Write the missing fakes of ``sources`` (``(image path, dataset camera id)``): one per other camera of the
    generator, named by :mod:`ureid.data.camstyle`. One forward pass per source image (its L-1 targets as the
    batch), so a fake's bytes depend only on the checkpoint, its source and its camera - never on which other
    files already existed. Files appear whole (written under a temporary name, then renamed)."""
    from ..data.camstyle import fake_filename, missing_fakes

    torch.set_num_threads(threads)
    g, info = load_generator(checkpoint, device)
    cams, gan = info["cameras"], info["gan"]
    out = Path(out_dir)
    written = skipped = 0
    t0 = time.perf_counter()
    for path, own in sources:
        if not missing_fakes(path, cams, own, out):
            skipped += 1
            continue
        targets = [c for c in cams if c != own]
        x = to_tensor(load_image(path, gan.height, gan.width)[None]).to(device).expand(len(targets), -1, -1, -1)
        c = one_hot(torch.tensor([cams.index(t) for t in targets]), len(cams)).to(device)
        for cam, pixels in zip(targets, to_uint8(g(x, c).cpu())):
            final = out / fake_filename(path, cam)
            tmp = final.with_name(f".tmp-{os.getpid()}-{final.name}")
            tmp.write_bytes(encode_jpeg(pixels))
            tmp.replace(final)
            written += 1
    return {"written": written, "skipped_sources": skipped, "seconds": time.perf_counter() - t0}
