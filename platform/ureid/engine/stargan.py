"""StarGAN over the cameras, the parts that know nothing of Ray: the training images and their random crops,
the sample grid, and the generation of one chunk of fakes (run inside a Ray task by the runtime). The
networks and losses are :mod:`ureid.models.stargan`; the per-worker training loop is
:mod:`ureid.runtime.gan_loop`, the driver side (job, callbacks, generation tasks, cache) :mod:`ureid.runtime.stargan`.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..models.stargan import Discriminator, Generator, one_hot, to_image_range

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
            if final.is_file():
                continue
            tmp = final.with_name(f".tmp-{os.getpid()}-{final.name}")
            tmp.write_bytes(encode_jpeg(pixels))
            tmp.replace(final)
            written += 1
    return {"written": written, "skipped_sources": skipped, "seconds": time.perf_counter() - t0}
