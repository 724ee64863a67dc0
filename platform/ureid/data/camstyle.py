"""Camera-style fakes on disk: the one file contract between what writes them and camstyle, which reads them.

camstyle (Lin et al., TIP 2020) gives every real training image L-1 fakes, one per other camera. Whatever
writes them - the StarGAN (:mod:`ureid.runtime.stargan`) or the colour-statistics stand-in below - names
each ``<real stem>_fake_c<k>.jpg`` (k = 1-based target camera) in one folder, and :func:`load_fakes` reads
the source image and target camera back from that name. Folders:

``<root>/bounding_box_train_camstyle/``            the stand-in (``ureid data camstyle``)
``<root>/camstyle_stargan/<key>/fakes/``           a StarGAN's, ``<key>`` naming the dataset and GAN config
``<root>/camstyle_stargan/<key>/stargan.pt``       that StarGAN's generator (reused by later runs)

The stand-in moves each image's per-channel mean and standard deviation to the target camera's
(Reinhard-style colour transfer). It captures a camera's colour cast and illumination, not its geometry or
blur: a weaker augmentation than a trained StarGAN.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .records import Record

if TYPE_CHECKING:
    from ..config import GanConfig

# The file contract between whatever writes fakes (this stand-in, a StarGAN) and camstyle, which reads them:
# ``<real stem>_fake_c<k>.<ext>``, k the 1-based target camera, in one folder.
DEFAULT_FOLDER = "bounding_box_train_camstyle"
_FAKE_NAME = re.compile(r"^(?P<stem>.+)_fake_c(?P<cam>\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)


STARGAN_FOLDER = "camstyle_stargan"


def default_fake_folder(root: str | Path) -> Path:
    """The colour stand-in's folder."""
    return Path(root) / DEFAULT_FOLDER


def stargan_cache(root: str | Path, key: str) -> Path:
    """The folder of one StarGAN's generator and fakes for the dataset at ``root``."""
    return Path(root) / STARGAN_FOLDER / key


def stargan_fake_folder(root: str | Path, key: str) -> Path:
    return stargan_cache(root, key) / "fakes"


def fake_filename(source_path: str | Path, camid: int) -> str:
    """The fake of ``source_path`` in 0-based camera ``camid``."""
    return f"{Path(source_path).stem}_fake_c{camid + 1}.jpg"


def missing_fakes(source_path: str | Path, cameras, own: int, folder: str | Path) -> list[int]:
    """The cameras of ``cameras`` other than ``own`` whose fake of ``source_path`` is not in ``folder`` yet."""
    return [c for c in cameras if c != own and not (Path(folder) / fake_filename(source_path, c)).is_file()]


def parse_fake_filename(name: str) -> tuple[str, int] | None:
    """``(source stem, 0-based target camera)`` of a fake's file name, None for any other file."""
    m = _FAKE_NAME.match(name)
    return (m["stem"], int(m["cam"]) - 1) if m else None


def load_fakes(folder: str | Path, train: list[Record], root_hint: str = "<root>") -> list[tuple[int, Record]]:
    """The fakes in ``folder`` as ``(index of the source image in train, fake record)``, sorted by file name;
    a fake carries its source's identity (used for diagnostics only) and its target camera."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"camstyle needs camera-style fakes in {folder} (files named <real stem>_fake_c<k>.jpg, one per other "
            f"camera); make them with `ureid data camstyle --root {root_hint}` (colour-statistics stand-in) "
            f"or with a StarGAN, or set clustering.fake_root"
        )
    by_stem = _stems(train)
    fakes = []
    for path in sorted(folder.iterdir()):
        parsed = parse_fake_filename(path.name)
        if parsed is None:
            continue
        stem, cam = parsed
        if stem not in by_stem:
            raise ValueError(f"camstyle fake {path} has no real training image named {stem}.*")
        src = by_stem[stem]
        fakes.append((src, Record((str(path),), train[src].pid, cam, is_fake=True)))
    if not fakes:
        raise FileNotFoundError(f"no camstyle fakes named <real stem>_fake_c<k>.jpg in {folder}")
    return fakes


def _stems(records: list[Record]) -> dict[str, int]:
    """Each training image's file stem -> its index: a fake names its source by stem alone, so two images of one
    stem (a folder's subfolders) would be the same source."""
    by_stem: dict[str, int] = {}
    for i, r in enumerate(records):
        stem = Path(r.path).stem
        if stem in by_stem:
            raise ValueError(f"camera-style fakes name their source by file stem, and {records[by_stem[stem]].path} "
                             f"and {r.path} share the stem {stem!r}: rename one")
        by_stem[stem] = i
    return by_stem


def camera_statistics(records: list[Record]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per camera: the mean over its images of each image's channel mean and channel std."""
    per_cam: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for rec in records:
        img = np.asarray(Image.open(rec.path).convert("RGB"), dtype=np.float32)
        flat = img.reshape(-1, 3)
        per_cam.setdefault(rec.camid, []).append((flat.mean(0), flat.std(0)))
    return {cam: (np.mean([m for m, _ in v], 0), np.mean([s for _, s in v], 0)) for cam, v in per_cam.items()}


def write_fakes(records: list[Record], out_dir: str | Path, *, quality: int = 95) -> int:
    """Write one fake per (real training image, other camera); returns the number written."""
    cameras = sorted({r.camid for r in records})
    if len(cameras) < 2:
        raise ValueError(f"the training images come from {len(cameras)} camera(s): camera-style transfer needs at "
                         "least 2 (for a folder of your own crops, data.pattern / --pattern with a (?P<camid>...) "
                         "group names each image's camera)")
    _stems(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = camera_statistics(records)
    written = 0
    for rec in records:
        img = np.asarray(Image.open(rec.path).convert("RGB"), dtype=np.float32)
        mean, std = img.reshape(-1, 3).mean(0), img.reshape(-1, 3).std(0) + 1e-6
        for cam, (t_mean, t_std) in sorted(stats.items()):
            if cam == rec.camid:
                continue
            fake = np.clip((img - mean) / std * t_std + t_mean, 0, 255).astype(np.uint8)
            Image.fromarray(fake).save(out / fake_filename(rec.path, cam), quality=quality)
            written += 1
    return written


# Settings that change neither the generator's weights nor its fakes' bytes: not part of the cache key.
_NOT_IN_KEY = ("log_every", "checkpoint_every", "sample_every", "sample_images", "cache_images_mb", "generate_chunk")


def camera_domains(records: list[Record], source: str) -> tuple[list[int], np.ndarray]:
    """The dataset's cameras (sorted ids; one StarGAN domain each) and every record's domain index."""
    if any(len(r.paths) > 1 for r in records):
        raise ValueError(f"{source}: StarGAN camera-style transfer works on image datasets; this one holds video "
                         f"tracklets (use an image dataset, or camstyle's clustering.style_transfer: colour)")
    cameras = sorted({r.camid for r in records})
    if len(cameras) < 2:
        raise ValueError(f"{source}: the training images come from {len(cameras)} camera(s) "
                         f"{cameras}; a StarGAN over cameras needs at least 2 (camera-style transfer has nothing "
                         f"to transfer to)")
    index = {c: i for i, c in enumerate(cameras)}
    return cameras, np.asarray([index[r.camid] for r in records], dtype=np.int64)


def stargan_key(gcfg: GanConfig, records: list[Record]) -> str:
    """12 hex digits naming (training images and their cameras, the GAN settings, seed, worker count)."""
    root = Path(gcfg.data.root).expanduser().resolve()
    paths = [Path(r.path).resolve() for r in records]
    images = sorted((str(p.relative_to(root)) if p.is_relative_to(root) else str(r.path), r.camid)
                    for p, r in zip(paths, records))
    gan = {k: v for k, v in gcfg.gan.model_dump().items() if k not in _NOT_IN_KEY}
    blob = json.dumps({"images": images, "gan": gan, "seed": gcfg.seed, "workers": gcfg.ray.num_workers},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
