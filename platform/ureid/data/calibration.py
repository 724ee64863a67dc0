"""How a re-ID dataset behaves for training-free features: the figures the synthetic generator is calibrated on.

Two features, both computed without any training:

* ``pixels``: the image resized to 16x32 (width x height), RGB, the image's mean removed (one value
  over all pixels and channels), L2-normalised. It matches body *layout*: where which colour is.
* ``hsv_stripes``: an 8x4x4 HSV colour histogram in each of ``stripes`` horizontal stripes, each
  stripe's histogram normalised to sum 1 and square-rooted (Hellinger), concatenated and
  L2-normalised (on the version-1 generator this reproduces the issue's figures: 77-78% same-camera,
  5% other-camera). It matches clothing
  *colour* per body height and ignores where in the box the person stands sideways; ``stripes=1``
  is the global histogram of ``experiments/handcrafted_baselines.py``.

On the training split, :func:`other_camera_nn_rate` is the share of images whose nearest neighbour
among the images of *other* cameras is the same person (and :func:`same_camera_nn_rate` the same
within the image's own camera). On real pedestrian data (80 identities of a two-camera set) the colour
stripes reach about 11% across cameras and raw pixels about 3%: clothing colour carries identity
across cameras, layout does not. On the test split :func:`protocol_scores` gives Market-protocol
mAP / rank-1 via :func:`ureid.evaluation.evaluate` (a bag of colour words scores 14.8% mAP on
Market-1501).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..evaluation import evaluate, pairwise_distance

HSV_BINS = (8, 4, 4)


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _rgb(img) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    with Image.open(img) as im:
        return im.convert("RGB")


def pixels(img, size=(16, 32)) -> np.ndarray:
    x = np.asarray(_rgb(img).resize(size, Image.BILINEAR), np.float32).ravel()
    return _l2(x - x.mean())


def hsv_histogram(img, bins=HSV_BINS) -> np.ndarray:
    """Unnormalised global HSV histogram (as ``experiments/handcrafted_baselines.py``)."""
    hsv = np.asarray(_rgb(img).convert("HSV"), dtype=np.int64).reshape(-1, 3)
    idx = [(hsv[:, c] * b) // 256 for c, b in enumerate(bins)]
    flat = (idx[0] * bins[1] + idx[1]) * bins[2] + idx[2]
    return np.bincount(flat, minlength=int(np.prod(bins))).astype(np.float32)


def hsv_stripes(img, stripes: int = 6, bins=HSV_BINS) -> np.ndarray:
    hsv = np.asarray(_rgb(img).convert("HSV"), dtype=np.int64)
    idx = [(hsv[..., c] * b) // 256 for c, b in enumerate(bins)]
    flat = (idx[0] * bins[1] + idx[1]) * bins[2] + idx[2]  # H x W bin index
    nb = int(np.prod(bins))
    edges = np.linspace(0, flat.shape[0], stripes + 1).round().astype(int)
    parts = []
    for a, b in zip(edges[:-1], edges[1:]):
        h = np.bincount(flat[a:b].ravel(), minlength=nb).astype(np.float32)
        parts.append(np.sqrt(h / max(h.sum(), 1.0)))  # Hellinger: square root of the stripe's distribution
    return _l2(np.concatenate(parts))


FEATURES = {
    "pixels": pixels,
    "hsv": lambda img: _l2(hsv_histogram(img)),
    "hsv6": hsv_stripes,
}


def record_features(records, fn) -> np.ndarray:
    """One row per record; a tracklet (several paths) is the mean of its frames' features."""
    return _l2(np.stack([np.mean([fn(p) for p in r.paths], axis=0) for r in records]))


def _nn_rates(feats: np.ndarray, pids: np.ndarray, cams: np.ndarray) -> tuple[float, float]:
    d = pairwise_distance(feats, feats, metric="sqeuclidean")
    n = len(pids)
    np.fill_diagonal(d, np.inf)
    same_cam = cams[:, None] == cams[None, :]
    out = []
    for mask in (same_cam, ~same_cam):
        dm = np.where(mask, d, np.inf)
        nn = dm.argmin(axis=1)
        ok = np.isfinite(dm[np.arange(n), nn])
        out.append(float((pids[nn] == pids)[ok].mean()) if ok.any() else float("nan"))
    return out[0], out[1]


def other_camera_nn_rate(feats, pids, cams) -> float:
    return _nn_rates(np.asarray(feats), np.asarray(pids), np.asarray(cams))[1]


def same_camera_nn_rate(feats, pids, cams) -> float:
    return _nn_rates(np.asarray(feats), np.asarray(pids), np.asarray(cams))[0]


def train_rates(train_records, features=("hsv6", "pixels")) -> dict:
    """``{feature: (same-camera NN rate, other-camera NN rate)}`` on a training split (pid >= 1 only)."""
    recs = [r for r in train_records if r.pid > 0]
    pids = np.array([r.pid for r in recs])
    cams = np.array([r.camid for r in recs])
    return {name: _nn_rates(record_features(recs, FEATURES[name]), pids, cams) for name in features}


def protocol_scores(query, gallery, features=("hsv", "hsv6", "pixels")) -> dict:
    """``{feature: evaluate(...) dict}`` under the Market-1501 protocol (cross-camera)."""
    qp, gp = np.array([r.pid for r in query]), np.array([r.pid for r in gallery])
    qc, gc = np.array([r.camid for r in query]), np.array([r.camid for r in gallery])
    out = {}
    for name in features:
        fn = FEATURES[name]
        dist = pairwise_distance(record_features(query, fn), record_features(gallery, fn), metric="sqeuclidean")
        out[name] = evaluate(dist, qp, gp, qc, gc)
    return out


def calibrate(dataset) -> dict:
    """Every calibration figure of a loaded :class:`ureid.data.ReidDataset`."""
    return {"train": train_rates(dataset.train), "test": protocol_scores(dataset.query, dataset.gallery)}
