"""Label-free scores of a stage: what an unsupervised user can compute without identity labels.

All take the training features (L2-normalised inside) and pseudo-labels only; none builds an N x N
matrix. Scores over "every sample against every sample" are computed exactly for a fixed seeded sample
of ``sample`` rows (all rows when N is smaller), blockwise, in O(sample x N) time and O(block x N) memory.

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
    lone row: BLAS computes a one-row product as a matrix-vector product, which rounds differently; from
    64 rows on, each row of ``a @ b.T`` is bitwise the same whatever the block, checked in the tests)."""
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


def _means(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous labels, cluster sizes and cluster means (float64 sums in ascending row order, the float32
    means filled a band of columns at a time: never a (C, d) float64 array)."""
    from ..clustering._common import group_sums

    uniq, inv = np.unique(labels, return_inverse=True)
    sizes = np.bincount(inv, minlength=uniq.size)
    mu = np.empty((uniq.size, x.shape[1]), dtype=np.float32)
    band = max(1, min(x.shape[1], _BLOCK_BYTES // (8 * max(uniq.size, 1))))
    for j in range(0, x.shape[1], band):
        mu[:, j:j + band] = group_sums(x[:, j:j + band], inv, uniq.size) / sizes[:, None]
    return inv, sizes, mu


def _kept(features, labels, overwrite: bool = False):
    """Unit features and labels of the samples with a label >= 0 (outliers left out)."""
    labels = np.asarray(labels)
    keep = labels >= 0
    x = _unit(features, overwrite)
    return (x, labels) if keep.all() else (x[keep], labels[keep])


def silhouette(features, labels, sample: int | None = 2048, seed: int = 0, block: int = 1024) -> float:
    """Mean silhouette (squared Euclidean on unit features) over a seeded sample of rows; labels < 0 are
    outliers and left out. 0 when there are fewer than 2 clusters."""
    x, labels = _kept(features, labels)
    return _silhouette(x, *_means(x, labels), sample, seed, block)


def _silhouette(x, inv, sizes, mu, sample, seed, block) -> float:
    if sizes.size < 2:
        return 0.0
    rows = _rows(len(x), sample, seed)
    scores = np.zeros(rows.size, dtype=np.float64)
    for start, r in _pieces(rows, sizes.size, block):
        d = 2.0 - 2.0 * (x[r] @ mu.T).astype(np.float64)  # (b, C): mean distance to every cluster
        own = inv[r]
        size = sizes[own]
        a = d[np.arange(r.size), own] * size / np.maximum(size - 1, 1)  # the sample itself is at distance 0
        d[np.arange(r.size), own] = np.inf
        b = d.min(axis=1)
        s = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
        scores[start:start + r.size] = np.where(size > 1, s, 0.0)
    return float(scores.mean())


def davies_bouldin(features, labels, sample: int | None = 2048, seed: int = 0, block: int = 1024) -> float:
    """Davies-Bouldin index of the non-singleton clusters (lower is better), the max over every other
    cluster computed exactly for a seeded sample of clusters. ``inf`` with fewer than 2 such clusters."""
    x, labels = _kept(features, labels)
    return _davies_bouldin(x, *_means(x, labels), sample, seed, block)


def _davies_bouldin(x, inv, sizes, mu, sample, seed, block) -> float:
    # S_i: mean distance of the cluster's samples to its centroid, |x - mu|^2 = 1 + |mu|^2 - 2 x.mu
    step = max(1, _BLOCK_BYTES // (8 * max(x.shape[1], 1)))
    sq_all = np.empty(len(mu), dtype=np.float64)
    for s in range(0, len(mu), step):  # in row blocks: no (C, d) float64 copy of the means
        sq_all[s:s + step] = (mu[s:s + step].astype(np.float64) ** 2).sum(1)
    own = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), step):  # a row's dot product with its own mean, without an (N, d) mu[inv]
        own[s:s + step] = np.einsum("ij,ij->i", x[s:s + step], mu[inv[s:s + step]])
    own = own.astype(np.float64)
    dist_own = np.sqrt(np.maximum(1.0 + sq_all[inv] - 2.0 * own, 0.0))
    scatter = np.bincount(inv, weights=dist_own, minlength=sizes.size) / sizes
    big = sizes > 1
    if not big.all():  # (when every cluster is, mu itself: no copy)
        mu, scatter, sq_all = mu[big], scatter[big], sq_all[big]
    sq = sq_all
    if mu.shape[0] < 2:
        return float("inf")
    rows = _rows(mu.shape[0], sample, seed)
    worst = np.zeros(rows.size)
    for start, r in _pieces(rows, mu.shape[0], block):
        dist = np.sqrt(np.maximum(sq[r, None] + sq[None, :] - 2.0 * (mu[r] @ mu.T).astype(np.float64), 1e-24))
        ratio = (scatter[r, None] + scatter[None, :]) / dist
        ratio[np.arange(r.size), r] = -np.inf
        worst[start:start + r.size] = ratio.max(axis=1)
    return float(worst.mean())


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
    """Every label-free score of one stage, keyed as logged (``lf_*``). The unit features and the cluster
    means are computed once for all scores; ``overwrite`` lets the unit features replace ``features`` (a
    float32 matrix the caller no longer needs), so the scores add only the means and O(block x N) to it."""
    labels = np.asarray(labels)
    keep = labels >= 0
    unit = _unit(features, overwrite)
    x = unit if keep.all() else unit[keep]
    inv, sizes, mu = _means(x, labels[keep])
    out = {"lf_silhouette": _silhouette(x, inv, sizes, mu, sample, seed, 1024),
           "lf_davies_bouldin": _davies_bouldin(x, inv, sizes, mu, sample, seed, 1024)}
    del x, mu
    out["lf_snd"] = _snd(unit, sample, seed, 0.05, 1024)
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
