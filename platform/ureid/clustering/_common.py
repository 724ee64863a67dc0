"""Shared input checks, union-find and relabelling for the label-update algorithms."""

from __future__ import annotations

import numpy as np


def as_numpy_features(features, name: str = "features") -> np.ndarray:
    """Return a float32 C-contiguous 2-D numpy copy-or-view; reject NaN/inf and bad shapes."""
    try:
        import torch

        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, d); got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{name} contains NaN or infinite values in {bad} row(s)")
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_labels(labels, n: int, name: str = "labels") -> np.ndarray:
    """Labels must be integers 0..C-1 with every value used, one per sample."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(f"{name} has length {lab.shape[0] if lab.ndim else 0}, features have {n} rows")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    if lab.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {lab.min()}")
    c = int(lab.max()) + 1
    used = np.bincount(lab, minlength=c)
    if (used == 0).any():
        missing = np.flatnonzero(used == 0)[:5].tolist()
        raise ValueError(f"{name} are not contiguous 0..{c - 1}: missing {missing}")
    return lab


def relabel_by_first_index(roots: np.ndarray) -> np.ndarray:
    """Map arbitrary cluster ids to 0..C-1 in ascending order of each cluster's smallest sample index."""
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse].astype(np.int64)


class UnionFind:
    """Union-find over cluster ids where the smaller root absorbs the larger (the BUC convention)."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return int(root)

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if ra < rb:
            self.parent[rb] = ra
        else:
            self.parent[ra] = rb
        return True

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(self.parent.size)], dtype=np.int64)


def resolve_device(features, device=None):
    """Compute device: `device` if given, else a tensor's own device; numpy input computes on CPU."""
    import torch

    if device is not None:
        return torch.device(device)
    if isinstance(features, torch.Tensor):
        return features.device
    return torch.device("cpu")


def as_torch_features(features, device, name: str = "features", ndim: int = 2):
    """A finite floating tensor on `device` with `ndim` dims and at least one row.

    float64 input stays float64 (exact algorithms then compute in double); anything else becomes float32.
    """
    import torch

    x = features.detach() if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    if x.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array; got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    x = x.to(device=device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"{name} contains NaN or infinite values in {int((~finite).sum())} row(s)")
    return x.contiguous()
