"""A documented stand-in for StarGAN camera-style transfer: per-camera colour statistics.

camstyle (Lin et al., TIP 2020) trains a StarGAN with one domain per camera and gives every real
training image L-1 fakes, one per other camera. Until the StarGAN lands, this stand-in produces the
same *files* - ``<real stem>_fake_c<k>.jpg`` (k = 1-based target camera) in
``<root>/bounding_box_train_camstyle`` - by moving each image's per-channel mean and standard
deviation to the target camera's (Reinhard-style colour transfer). It captures a camera's colour
cast and illumination, not its geometry or blur: a weaker augmentation than a trained StarGAN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .records import Record


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
            Image.fromarray(fake).save(out / f"{Path(rec.path).stem}_fake_c{cam + 1}.jpg", quality=quality)
            written += 1
    return written
