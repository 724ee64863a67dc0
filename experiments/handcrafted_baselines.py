#!/usr/bin/env python
"""How hard is a dataset across cameras? Rank-1/mAP of two training-free features - whole-image pixels
and an HSV colour histogram - under the Market-1501 protocol (same-camera matches of the query's
identity are junk), and again with same-camera matches allowed. A large gap means the identities are
easy to match inside a camera and hard across cameras: what the unsupervised methods must overcome.

    python experiments/handcrafted_baselines.py                           # synthetic default
    python experiments/handcrafted_baselines.py --config experiments/configs/buc.yaml \\
        --set data.name=market1501 --set data.root=/data/Market-1501-v15.09.15
"""

import argparse
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import numpy as np  # noqa: E402

from ureid.config import CONFIG_DIR, load_config  # noqa: E402
from ureid.data.run_data import load_split_dataset  # noqa: E402
from ureid.engine.datasets import load_image  # noqa: E402
from ureid.evaluation import evaluate, pairwise_distance  # noqa: E402
from ureid.methods import l2_normalise  # noqa: E402


def pixels(img, size=(16, 32)) -> np.ndarray:
    return np.asarray(img.resize(size), dtype=np.float32).ravel()


def hsv_histogram(img, bins=(8, 4, 4)) -> np.ndarray:
    hsv = np.asarray(img.convert("HSV"), dtype=np.int64).reshape(-1, 3)
    idx = [(hsv[:, c] * b) // 256 for c, b in enumerate(bins)]
    flat = (idx[0] * bins[1] + idx[1]) * bins[2] + idx[2]
    return np.bincount(flat, minlength=int(np.prod(bins))).astype(np.float32)


def features(records, fn) -> np.ndarray:
    # A tracklet (several paths) is the mean of its frames' features.
    return l2_normalise(np.stack([np.mean([fn(load_image(p)) for p in r.paths], axis=0) for r in records]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG_DIR / "buc_cpu.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    ds = load_split_dataset(cfg.data)
    qp, gp = np.array([r.pid for r in ds.query]), np.array([r.pid for r in ds.gallery])
    qc, gc = np.array([r.camid for r in ds.query]), np.array([r.camid for r in ds.gallery])
    print(f"{cfg.data.name} at {cfg.data.root}: {len(ds.query)} queries, {len(ds.gallery)} gallery")
    print(f"{'feature':<15} {'cross-camera mAP':>17} {'rank-1':>7} {'same camera allowed: mAP':>25} {'rank-1':>7}")
    for name, fn in (("pixels", pixels), ("HSV histogram", hsv_histogram)):
        dist = pairwise_distance(features(ds.query, fn), features(ds.gallery, fn), metric="sqeuclidean")
        cross = evaluate(dist, qp, gp, qc, gc)
        # Giving every query a camera no gallery image has turns the same-camera junk into matches.
        within = evaluate(dist, qp, gp, np.full_like(qc, -1), gc)
        print(f"{name:<15} {cross['mAP']:>17.1%} {cross['rank1']:>7.1%} {within['mAP']:>25.1%} {within['rank1']:>7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
