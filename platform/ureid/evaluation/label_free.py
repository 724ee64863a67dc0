"""Label-free scores of a stage: what an unsupervised user can compute without identity labels.

All take the training features (L2-normalised inside) and pseudo-labels only; none builds an N x N
matrix. Scores over "every sample against every sample" are computed exactly for a fixed seeded sample
of ``sample`` rows (all rows when N is smaller), blockwise, in O(sample x N) time and O(block x N) memory.
Nor is a C x d matrix of cluster means kept (at stage 0 of SSL or DBC, C = N): the means are formed a block
of clusters at a time, so beside the features the scores hold O(N + C) and fixed-size blocks.

* :func:`silhouette` - Rousseeuw's silhouette with squared Euclidean distance between unit features;
  the mean distance of ``x`` to a cluster ``C`` has the closed form ``2 - 2 x . mu_C`` (``mu_C`` the mean of
  its unit features), so each sample row costs one product with the cluster means. Singletons score 0.
* :func:`davies_bouldin` - mean over clusters of ``max_j (S_i + S_j) / M_ij`` with ``S`` the mean Euclidean
  distance to the centroid and ``M`` the distance between centroids (scikit-learn's definition); lower is
  better. Singletons are left out (``S = 0`` would reward splitting).
* :func:`agreement` - NMI (arithmetic normalisation, as scikit-learn's default) and ARI between two
  labelings, from their contingency counts in O(N): DeepCluster's stability check between stages.
* :func:`soft_neighborhood_density` - SND (Saito et al., ICCV 2021): mean entropy of each sample's
  softmax over its similarities to all other samples at temperature 0.05; higher means denser neighbourhoods.
"""

from __future__ import annotations

import numpy as np


#: The float64 working block of a score (rows x width) stays within this many bytes: at N = 77,616 a
#: block of 1,024 sample rows against every sample is 636 MB in float64, and the softmax of SND makes four.
_BLOCK_BYTES = 32 << 20


def _unit(x, overwrite: bool = False) -> np.ndarray:
    """Rows scaled to unit length (in ``x`` itself when ``overwrite`` allows: the store's gathered matrix)."""
    from ..clustering._common import unit_rows

    return unit_rows(x, overwrite, _BLOCK_BYTES)


def _rows(n: int, sample: int | None, seed: int) -> np.ndarray:
    if sample is None or sample >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))


def _pieces(rows: np.ndarray, width: int, block: int):
    """``(offset, rows)`` pieces: the ``block``-row blocks the products are computed in, each cut again so
    that a (piece, width) float64 array stays within ``_BLOCK_BYTES`` (pieces of at least 64 rows, never a
    lone row: BLAS computes a one-row product as a matrix-vector product, which rounds differently). From 64
    rows on, each row of ``a @ b.T`` is bitwise the same whatever the block on OpenBLAS's SkylakeX kernels;
    its Haswell kernels (AVX2 CPUs, or ``OPENBLAS_CORETYPE=Haswell``) round a product by its shape and thread
    count, so there the scores move in their last bits with the pieces (3e-9 in the tests), the labels not."""
    step = max(64, _BLOCK_BYTES // (8 * max(width, 1)))
    for start in range(0, rows.size, block):
        outer = rows[start:start + block]
        if step >= outer.size:
            yield start, outer
            continue
        cuts = list(range(0, outer.size, step))
        if outer.size - cuts[-1] == 1:
            cuts.pop()
        for a, b in zip(cuts, cuts[1:] + [outer.size]):
            yield start + a, outer[a:b]


#: Cluster means are formed at most this many bytes (float32) of them at a time, a block of clusters after
#: another, and never kept: at stage 0 of SSL or DBC every sample is its own cluster, so all C x d means
#: are one more feature matrix (636 MB at N = 77,616). Each block has at least 64 clusters (or all of them),
#: so its products round as one product with every mean would (see ``_pieces``).
_MEANS_BYTES = 32 << 20


class _Clusters:
    """The clusters of the samples with a label >= 0 (outliers left out, without copying their features):
    ``kept`` (their row ids), ``inv`` (contiguous cluster id of each kept row), ``sizes``, ``count``; and
    :meth:`means` of any set of clusters, formed from the feature rows when asked."""

    def __init__(self, labels):
        labels = np.asarray(labels)
        keep = labels >= 0
        uniq, self.inv = np.unique(labels[keep], return_inverse=True)
        self.kept = np.flatnonzero(keep)
        self.count = uniq.size
        self.sizes = np.bincount(self.inv, minlength=self.count)
        self._of_row = np.full(labels.size, -1, dtype=np.int64)
        self._of_row[self.kept] = self.inv

    def blocks(self, ids: np.ndarray, d: int) -> list[np.ndarray]:
        """``ids`` cut into near-equal blocks of at most ``_MEANS_BYTES`` of float32 means, each at least 64
        clusters (all of them in one block when there are fewer than 128)."""
        width = max(128, _MEANS_BYTES // (4 * max(d, 1)))
        return np.array_split(ids, max(1, -(-ids.size // width)))

    def means(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """float32 means (len(ids), d) of clusters ``ids``: each the float64 sum of its rows in ascending
        row order divided by its size, so bitwise the same whichever other clusters are formed with it
        (``group_sums``); filled a band of columns at a time (never a (len(ids), d) float64 array)."""
        from ..clustering._common import GROUP_SUMS_CHUNK_ROWS, group_sums

        pos = np.full(self.count + 1, -1, dtype=np.int64)  # the last entry: rows of no cluster
        pos[ids] = np.arange(ids.size)
        groups = pos[self._of_row]
        mu = np.empty((ids.size, x.shape[1]), dtype=np.float32)
        band = max(1, min(x.shape[1], _BLOCK_BYTES // (8 * max(ids.size, GROUP_SUMS_CHUNK_ROWS))))
        for j in range(0, x.shape[1], band):
            mu[:, j:j + band] = group_sums(x[:, j:j + band], groups, ids.size) / self.sizes[ids][:, None]
        return mu

    def members(self, lo: int, hi: int) -> np.ndarray:
        """Positions (among the kept rows) of the rows of clusters lo..hi-1, ascending."""
        return np.flatnonzero((self.inv >= lo) & (self.inv < hi))


def silhouette(features, labels, sample: int | None = 2048, seed: int = 0, block: int = 1024) -> float:
    """Mean silhouette (squared Euclidean on unit features) over a seeded sample of rows; labels < 0 are
    outliers and left out. 0 when there are fewer than 2 clusters."""
    return _cluster_scores(_unit(features), _Clusters(labels), sample, seed, block, davies_bouldin=False)[0]


def davies_bouldin(features, labels, sample: int | None = 2048, seed: int = 0, block: int = 1024) -> float:
    """Davies-Bouldin index of the non-singleton clusters (lower is better), the max over every other
    cluster computed exactly for a seeded sample of clusters. ``inf`` with fewer than 2 such clusters."""
    return _cluster_scores(_unit(features), _Clusters(labels), sample, seed, block, silhouette=False)[1]


def _cluster_scores(x, cl: _Clusters, sample, seed, block, silhouette=True, davies_bouldin=True):
    """``(silhouette, davies_bouldin)`` of the unit features ``x`` (every row; ``cl`` says which count),
    each None when not asked. The cluster means are formed a block of clusters at a time, in at most two
    passes: the first gives the silhouette's mean distance of each sampled row to each cluster (kept as a
    running minimum) and the Davies-Bouldin scatters; the second, over the non-singleton clusters, the
    Davies-Bouldin maximum of each sampled cluster. Memory: O(N + C) beside ``x`` and one block."""
    n_kept, d = cl.kept.size, x.shape[1]
    blocks = cl.blocks(np.arange(cl.count), d)
    sil = silhouette and cl.count >= 2
    if sil:
        rows = _rows(n_kept, sample, seed)
        x_rows, own = cl.kept[rows], cl.inv[rows]
        size = cl.sizes[own]
        a = np.zeros(rows.size)  # mean distance to the own cluster, then to the nearest other one
        b = np.full(rows.size, np.inf)
    big = np.flatnonzero(cl.sizes > 1)
    db = davies_bouldin and big.size >= 2
    if db:
        picked = _rows(big.size, sample, seed)  # positions among the non-singleton clusters
        picked_ids = big[picked]
        mu_picked = np.empty((picked.size, d), dtype=np.float32)
        sq_all = np.empty(cl.count, dtype=np.float64)
        own_dot = np.empty(n_kept, dtype=np.float32)
        step = max(1, _BLOCK_BYTES // (8 * max(d, 1)))
    mu = None
    for ids in blocks if (sil or db) else []:
        lo, hi = int(ids[0]), int(ids[-1]) + 1
        mu = cl.means(x, ids)
        if sil:
            for start, r in _pieces(x_rows, ids.size, block):
                dist = 2.0 - 2.0 * (x[r] @ mu.T).astype(np.float64)  # mean distance to each cluster of the block
                o = own[start:start + r.size] - lo
                hit = np.flatnonzero((o >= 0) & (o < ids.size))
                a[start + hit] = dist[hit, o[hit]]
                dist[hit, o[hit]] = np.inf
                np.minimum(b[start:start + r.size], dist.min(axis=1), out=b[start:start + r.size])
        if db:
            # S_i: mean distance of the cluster's samples to its centroid, |x - mu|^2 = 1 + |mu|^2 - 2 x.mu
            for s in range(0, ids.size, step):
                sq_all[lo + s:lo + min(s + step, ids.size)] = (mu[s:s + step].astype(np.float64) ** 2).sum(1)
            pos = cl.members(lo, hi)
            for s in range(0, pos.size, step):  # a row's dot product with its own mean, without an (N, d) gather
                p = pos[s:s + step]
                own_dot[p] = np.einsum("ij,ij->i", x[cl.kept[p]], mu[cl.inv[p] - lo])
            inside = (picked_ids >= lo) & (picked_ids < hi)
            mu_picked[inside] = mu[picked_ids[inside] - lo]
    out_sil = out_db = None
    if silhouette:
        out_sil = 0.0
        if sil:
            a = a * size / np.maximum(size - 1, 1)  # the sample itself is at distance 0
            s = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
            out_sil = float(np.where(size > 1, s, 0.0).mean())
    if davies_bouldin:
        out_db = float("inf")
        if db:
            dist_own = np.sqrt(np.maximum(1.0 + sq_all[cl.inv] - 2.0 * own_dot.astype(np.float64), 0.0))
            scatter = (np.bincount(cl.inv, weights=dist_own, minlength=cl.count) / cl.sizes)[big]
            sq = sq_all[big]
            worst = np.full(picked.size, -np.inf)
            big_blocks = cl.blocks(big, d)
            for p0, ids in zip(np.cumsum([0] + [c.size for c in big_blocks[:-1]]), big_blocks):
                cols = slice(int(p0), int(p0) + ids.size)
                m = mu[cl.sizes[blocks[0]] > 1] if len(blocks) == 1 else cl.means(x, ids)  # (one block: formed once)
                for start, r in _pieces(picked, ids.size, block):
                    prod = (mu_picked[start:start + r.size] @ m.T).astype(np.float64)
                    dist = np.sqrt(np.maximum(sq[r, None] + sq[None, cols] - 2.0 * prod, 1e-24))
                    ratio = (scatter[r, None] + scatter[None, cols]) / dist
                    hit = np.flatnonzero((r >= cols.start) & (r < cols.stop))
                    ratio[hit, r[hit] - cols.start] = -np.inf
                    np.maximum(worst[start:start + r.size], ratio.max(axis=1), out=worst[start:start + r.size])
            out_db = float(worst.mean())
    return out_sil, out_db


def agreement(previous, labels) -> dict[str, float]:
    """``{"nmi": ..., "ari": ...}`` between two labelings of the same samples."""
    a, b = np.asarray(previous), np.asarray(labels)
    if a.shape != b.shape:
        raise ValueError(f"the two labelings differ in length: {a.shape} vs {b.shape}")
    n = a.size
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    cells, joint = np.unique(np.stack([ai, bi], 1), axis=0, return_counts=True)
    ja, jb = cells[:, 0], cells[:, 1]
    ca, cb = np.bincount(ai).astype(np.float64), np.bincount(bi).astype(np.float64)

    def entropy(c):
        p = c / n
        return float(-(p * np.log(p)).sum())

    ha, hb = entropy(ca), entropy(cb)
    pj = joint / n
    mi = float((pj * np.log(pj * n * n / (ca[ja] * cb[jb]))).sum())
    nmi = 1.0 if ha == hb == 0 else (mi / ((ha + hb) / 2) if ha + hb > 0 else 0.0)

    def pairs(c):
        return float((c * (c - 1) / 2).sum())

    index, sa, sb = pairs(joint.astype(np.float64)), pairs(ca), pairs(cb)
    total = n * (n - 1) / 2
    expected = sa * sb / total if total else 0.0
    top = (sa + sb) / 2
    ari = 1.0 if top == expected else (index - expected) / (top - expected)
    return {"nmi": float(nmi), "ari": float(ari)}


def soft_neighborhood_density(features, sample: int | None = 2048, seed: int = 0, temperature: float = 0.05,
                              block: int = 1024) -> float:
    """SND: mean entropy of softmax(cos(x_i, x_j) / temperature) over j != i, for a seeded sample of rows."""
    return _snd(_unit(features), sample, seed, temperature, block)


def _snd(x, sample, seed, temperature, block) -> float:
    n = len(x)
    if n < 2:
        return 0.0
    rows = _rows(n, sample, seed)
    ent = np.zeros(rows.size)
    for start, r in _pieces(rows, n, block):
        logits = (x[r] @ x.T).astype(np.float64)
        logits /= temperature
        logits[np.arange(r.size), r] = -np.inf
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits, out=logits)
        p /= p.sum(axis=1, keepdims=True)
        ent[start:start + r.size] = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    return float(ent.mean())


def label_free_scores(features, labels, previous=None, sample: int | None = 2048, seed: int = 0,
                      overwrite: bool = False) -> dict[str, float]:
    """Every label-free score of one stage, keyed as logged (``lf_*``). The unit features are computed once
    for all scores; ``overwrite`` lets them replace ``features`` (a float32 matrix the caller no longer
    needs), so the scores add O(N + C) and fixed-size blocks to it (no copy without the outliers, no C x d
    means: they are formed a block of clusters at a time)."""
    labels = np.asarray(labels)
    unit = _unit(features, overwrite)
    sil, db = _cluster_scores(unit, _Clusters(labels), sample, seed, 1024)
    out = {"lf_silhouette": sil, "lf_davies_bouldin": db, "lf_snd": _snd(unit, sample, seed, 0.05, 1024)}
    if previous is not None:
        agree = agreement(previous, labels)
        out["lf_nmi_previous"], out["lf_ari_previous"] = agree["nmi"], agree["ari"]
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 1-based."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks (scipy.stats.spearmanr's definition)."""
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def kendall(x, y) -> float:
    """Kendall's tau-b (ties in either variable corrected, scipy.stats.kendalltau's default), O(n^2) over
    pairs: meant for the stages of a sweep (hundreds of points), not for samples."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(x.size, 1)
    dx, dy = dx[iu], dy[iu]
    den = np.sqrt(np.count_nonzero(dx) * np.count_nonzero(dy))
    return float((dx * dy).sum() / den) if den > 0 else float("nan")
