"""The five methods as a plain dict: what each trains on, with which loss, and how its targets change.

Every method runs the same stage loop (:mod:`ureid.distributed.loop`): train on the current targets,
extract features, evaluate, update the targets. A method only says

* ``num_stages(cfg, n)`` - how many stages its schedule has;
* ``initial_targets(n, ...)`` - the targets of stage 0;
* ``build_loss(cfg, targets, n, feat_dim)`` - the loss module (a fresh memory table each stage);
* ``update(cfg, features, targets, ...)`` - the new targets from the extracted features (pure: runs in
  the feature-store actor, calls :mod:`ureid.clustering`).

Targets are a small dict of numpy arrays: ``labels`` (one class per training sample), and for SSL the
reliable ``neighbors``, for PUL the ``selected`` mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import clustering

Targets = dict  # {"labels": (N,) int64, optional "neighbors": (N,k) int64, "selected": (N,) bool}


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pair_precision(old: np.ndarray, new: np.ndarray, pids: np.ndarray) -> float | None:
    """Fraction of the sample pairs newly joined by an update that share an identity.

    A diagnostic of merge quality (ground truth is never used for training): pairs in one new
    cluster minus pairs already together before, counted in O(N) from contingency counts.
    """

    def pairs(*keys):
        _, counts = np.unique(np.stack(keys, 1), axis=0, return_counts=True)
        return float((counts * (counts - 1) // 2).sum())

    joined = pairs(new) - pairs(old)
    if joined <= 0:
        return None
    same = pairs(new, pids) - pairs(old, pids)
    return same / joined


def _merges(cfg, n0: int) -> int:
    return max(1, int(cfg.clustering.merge_percent * n0))


@dataclass(frozen=True)
class Method:
    name: str
    num_stages: Callable
    initial_targets: Callable
    update: Callable
    loss: str  # "memory" | "softened" | "classifier"
    uses_fakes: bool = False
    needs_parts: bool = False
    fine_tune_from_original: bool = False


# ----------------------------------------------------------------------------- BUC / DBC / camstyle


def _singletons(n: int, support: np.ndarray | None = None, **_) -> Targets:
    # camstyle: a real image and its fakes start as one cluster (the image's support set).
    labels = np.arange(n, dtype=np.int64) if support is None else support.astype(np.int64)
    return {"labels": labels}


def _bottom_up_stages(cfg, n0: int) -> int:
    return int(1 / cfg.clustering.merge_percent) - 1


def _buc_update(cfg, features, targets, n0, is_fake=None, map_blocks=None, **_) -> Targets:
    """BUC eq. (5)-(6): merge ``int(mp * N0)`` cluster pairs by minimum distance + diversity penalty."""
    c = cfg.clustering
    labels = clustering.bottom_up_merge(
        l2_normalise(features), targets["labels"], _merges(cfg, n0), c.size_penalty,
        is_fake=is_fake, metric=c.metric, map_blocks=map_blocks,
    )
    return {"labels": labels}


def _dbc_update(cfg, features, targets, n0, **_) -> Targets:
    """DBC: average linkage (inter-dispersion) + ``intra_weight * (intra_A + intra_B)``."""
    c = cfg.clustering
    labels = clustering.dispersion_merge(
        l2_normalise(features), targets["labels"], _merges(cfg, n0), c.intra_weight, update=c.update
    )
    return {"labels": labels}


# ----------------------------------------------------------------------------- SSL


def _ssl_update(cfg, features, targets, n0, parts=None, cameras=None, **_) -> Targets:
    """SSL: each image keeps its own class; its k reliable images get the softened share (eq. 4)."""
    c = cfg.clustering
    part_feats = None
    if parts is not None and c.part_weight > 0:
        part_feats = parts / np.maximum(np.linalg.norm(parts, axis=2, keepdims=True), 1e-12)
    neighbors = clustering.reliable_neighbors(
        l2_normalise(features), part_feats, cameras, c.num_neighbors,
        c.part_weight if part_feats is not None else 0.0, c.camera_penalty,
    )
    return {"labels": targets["labels"], "neighbors": neighbors}


# ----------------------------------------------------------------------------- PUL


def labeled_identities(pids: np.ndarray, per_iteration: int, iteration: int, seed: int) -> np.ndarray:
    """PUL's semi-supervised variant: the identities whose labels are known by ``iteration`` (0-based),
    ``per_iteration`` more each time, in a fixed order drawn from ``seed``."""
    pool = np.unique(pids[pids > 0])
    order = np.random.default_rng(seed).permutation(pool)
    return order[: min(pool.size, per_iteration * (iteration + 1))]


def _pul_update(cfg, features, targets, n0, seed=0, stage=-1, pids=None, **_) -> Targets:
    """PUL: k-means on raw pooled features, then keep samples close to a cluster centre. With
    ``labeled_ids_per_iteration`` > 0, samples of the known identities join the training set under
    their true identity (one class each, after the cluster classes)."""
    c = cfg.clustering
    k = min(c.num_clusters, len(features))
    raw = np.asarray(features, dtype=np.float32)
    labels = clustering.kmeans(raw, k, seed=seed + stage + 1)
    selected = clustering.select_reliable(raw, labels, c.threshold, match=c.match)
    if c.labeled_ids_per_iteration and pids is not None:
        known = labeled_identities(pids, c.labeled_ids_per_iteration, stage + 1, seed)
        is_known = np.isin(pids, known)
        labels = labels.copy()
        labels[is_known] = k + np.searchsorted(np.sort(known), pids[is_known])
        selected = selected | is_known
    return {"labels": labels, "selected": selected}


METHODS: dict[str, Method] = {
    "buc": Method("buc", _bottom_up_stages, _singletons, _buc_update, loss="memory"),
    "dbc": Method("dbc", _bottom_up_stages, _singletons, _dbc_update, loss="memory"),
    "camstyle": Method("camstyle", _bottom_up_stages, _singletons, _buc_update, loss="memory", uses_fakes=True),
    "ssl": Method(
        "ssl", lambda cfg, n0: cfg.clustering.num_stages, _singletons, _ssl_update, loss="softened",
        needs_parts=True,
    ),
    "pul": Method(
        "pul", lambda cfg, n0: cfg.clustering.iterations, None, _pul_update, loss="classifier",
        fine_tune_from_original=True,
    ),
}


def num_clusters(targets: Targets) -> int:
    labels = targets["labels"]
    if "selected" in targets:
        labels = labels[targets["selected"]]
    return int(np.unique(labels).size)
