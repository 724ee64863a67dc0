#!/usr/bin/env python
"""Label-free choice of Cluster Contrast's clustering settings for a dataset: the starting features
(the configured weights, no training) are clustered as the method's first epoch would (k-reciprocal
Jaccard distance, DBSCAN) for every k1 x eps of a grid, and each clustering is scored by its silhouette
(outliers left out) and by the same mean with every outlier a singleton scoring 0 (which does not reward
leaving most images out), beside the cluster count and outlier share. No label is read.

    python experiments/cluster_contrast_grid.py          # CPU preset, synthetic default
"""

import argparse
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ureid.clustering.jaccard import dbscan, kreciprocal_jaccard  # noqa: E402
from ureid.config import CONFIG_DIR, load_config  # noqa: E402
from ureid.data.run_data import load_split_dataset  # noqa: E402
from ureid.engine.extract import extract_features  # noqa: E402
from ureid.engine.seeding import seed_everything  # noqa: E402
from ureid.evaluation.label_free import silhouette  # noqa: E402
from ureid.methods import get_method  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG_DIR / "cluster_contrast_cpu.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--k1", type=int, nargs="+", default=[15, 20, 30])
    p.add_argument("--eps", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7])
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(os.cpu_count() or 1)
    seed_everything(cfg.seed)
    model = get_method(cfg.method).build_model(cfg)
    train = load_split_dataset(cfg.data).train
    x = extract_features(model, train, **cfg.extract_options())["pooled"]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    c = cfg.clustering
    print(f"{len(train)} training images; k2 {c.k2}, min_samples {c.min_samples}")
    print("| k1 | eps | clusters | outliers | silhouette | silhouette, outliers as 0 |\n|---|---|---|---|---|---|")
    for k1 in args.k1:
        dist = kreciprocal_jaccard(x, k1=k1, k2=c.k2)
        for eps in args.eps:
            labels = dbscan(dist, eps, c.min_samples)
            n = int(labels.max()) + 1
            kept, sil = np.mean(labels >= 0), silhouette(x, labels, sample=None)
            print(f"| {k1} | {eps} | {n} | {1 - kept:.0%} | {sil:.3f} | {sil * kept:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
