"""CMC and mAP under the Market-1501 protocol, vectorised and chunked over queries.

Protocol (Zheng et al., *Scalable Person Re-identification: A Benchmark*, ICCV 2015, and the official
evaluation code): for every query, gallery images of the same identity taken by the same camera are
*junk* (they would be trivial matches), and so are gallery images with identity ``-1`` (bad detections);
junk is removed from the ranked list before anything is counted. Identity ``0`` (distractors) stays in
the list as a negative. A query without any remaining match is skipped. Ties in distance are broken by
gallery index (stable sort), so results never depend on the sorting algorithm.
"""

from __future__ import annotations

import numbers
import sys

import numpy as np

AP_MODES = ("trapezoid", "step")
METRICS = ("sqeuclidean", "euclidean", "cosine")


def _as_numpy(x) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (torch is not imported: this module stays light)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_chunk(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk_size)


def _check_ids(x, n: int, name: str, axis_name: str) -> np.ndarray:
    arr = _as_numpy(x)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one entry per {axis_name} ({n}); got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    # int32 halves the (chunk x gallery) gathers of identities and cameras when the values fit.
    return arr.astype(np.int32) if arr.size == 0 or np.abs(arr).max() < 2**31 - 1 else arr


def stable_argsort_rows(d: np.ndarray) -> np.ndarray:
    """Row-wise ``np.argsort(d, axis=1, kind="stable")``, computed fast.

    Values that are exactly float32 are packed with their column index into one uint64 key (the
    float's bits mapped to an order-preserving unsigned int in the high half, the index in the low
    half) and sorted with numpy's SIMD sort: equal values then order by index, which *is* the stable
    order. Other rows (float64 beyond float32 precision) use numpy's default argsort and re-sort only
    the entries inside runs of equal values by (row, value, index); random float distances of a
    Market-size gallery do contain a few dozen such ties per row, so they cannot be ignored.
    """
    with np.errstate(over="ignore"):  # float64 beyond float32 range: not exact, handled below
        d32 = d.astype(np.float32, copy=False)
    if d.shape[1] < 2**32 and (d.dtype == np.float32 or np.array_equal(d32, d)):
        key = np.empty(d.shape, dtype=np.uint64)
        halves = key.view(np.uint32).reshape(*d.shape, 2)
        lo, hi = (0, 1) if sys.byteorder == "little" else (1, 0)
        bits = (d32 + np.float32(0)).view(np.uint32)  # + 0 turns -0.0 into +0.0: they compare equal
        halves[..., hi] = bits
        # Order-preserving float -> uint map: flip every bit of a negative, only the sign bit otherwise.
        np.right_shift(bits.view(np.int32), 31, out=bits.view(np.int32))
        bits |= np.uint32(0x80000000)
        halves[..., hi] ^= bits
        del bits
        halves[..., lo] = np.arange(d.shape[1], dtype=np.uint32)
        key.sort(axis=1)
        return halves[..., lo].astype(np.intp)
    order = np.argsort(d, axis=1)
    s = np.take_along_axis(d, order, axis=1)
    eq = s[:, 1:] == s[:, :-1]
    in_run = np.zeros(d.shape, dtype=bool)
    in_run[:, 1:] = eq
    in_run[:, :-1] |= eq
    n_tied = np.count_nonzero(in_run)
    if n_tied == 0:
        return order
    if n_tied > d.size // 16:  # ties everywhere: one stable sort of those rows is cheaper
        tied = in_run.any(axis=1)
        order[tied] = np.argsort(d[tied], axis=1, kind="stable")
        return order
    r, c = np.nonzero(in_run)  # row-major, so each run's positions are contiguous and ascending
    idx = order[r, c]
    order[r, c] = idx[np.lexsort((idx, s[r, c], r))]
    return order


def stable_topk_rows(d: np.ndarray, k: int) -> np.ndarray:
    """First ``k`` columns of ``np.argsort(d, axis=1, kind="stable")`` without sorting whole rows.

    A partition finds each row's k-th smallest value; everything <= it (usually exactly k entries,
    more only with ties) is sorted by (value, column), which is what a stable sort would produce.
    """
    if k >= d.shape[1]:
        return stable_argsort_rows(d)[:, :k]
    kth = np.partition(d, k - 1, axis=1)[:, k - 1 : k]
    rows, cols = np.nonzero(d <= kth)
    order = np.lexsort((cols, d[rows, cols], rows))
    rows, cols = rows[order], cols[order]
    start = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=d.shape[0]))[:-1]))
    return cols[np.arange(rows.size) - start[rows] < k].reshape(d.shape[0], k)


def valid_queries(query_pids, query_cams, gallery_pids, gallery_cams) -> np.ndarray:
    """(Q,) bool: the queries :func:`evaluate` scores, those with a gallery image of their identity from another
    camera (identity -1 is junk), found from the identities alone in O((Q + G) log G): no distance needed."""
    q_pids, q_cams = np.asarray(query_pids, dtype=np.int64), np.asarray(query_cams, dtype=np.int64)
    g_pids, g_cams = np.asarray(gallery_pids, dtype=np.int64), np.asarray(gallery_cams, dtype=np.int64)
    keep = g_pids != -1
    pairs = np.unique(np.stack([g_pids[keep], g_cams[keep]], axis=1), axis=0)  # (identity, camera), sorted
    if len(pairs) == 0:
        return np.zeros(len(q_pids), dtype=bool)
    ids, first, cameras = np.unique(pairs[:, 0], return_index=True, return_counts=True)
    at = np.minimum(np.searchsorted(ids, q_pids), len(ids) - 1)
    known = ids[at] == q_pids
    other_camera = (cameras[at] > 1) | (pairs[first[at], 1] != q_cams)  # one camera: not the query's own
    return known & other_camera & (q_pids != -1)


def _evaluate_block(block, q_pids, q_cams, g_pids, g_cams, ap):
    """AP (NaN when skipped) and first-hit position (0 when skipped) of each query row of ``block``.

    A function of its own so the block's (rows x gallery) temporaries are freed before the next block.
    """
    b = block.shape[0]
    order = stable_argsort_rows(block)
    pid = g_pids[order]  # (b, ng) identities in ranked order
    cam = g_cams[order]
    del order
    same_id = pid == q_pids[:, None]
    same_cam = cam == q_cams[:, None]
    junk = (pid == -1) | (same_id & same_cam)
    good = same_id & ~same_cam & (pid != -1)  # -1 is junk even for a query labelled -1
    del pid, cam, same_id, same_cam
    # Position among non-junk items (junk is removed from the list before ranking).
    pos = np.cumsum(~junk, axis=1, dtype=np.int32)
    rows, cols = np.nonzero(good)  # row-major: the hits of each query in ranked order
    r = pos[rows, cols].astype(np.float64)
    ngood = np.bincount(rows, minlength=b)
    row_start = np.concatenate(([0], np.cumsum(ngood)[:-1]))
    i = (np.arange(rows.size) - row_start[rows] + 1).astype(np.float64)  # i-th hit of its query
    precision = i / r
    if ap == "trapezoid":
        old_precision = np.where(r > 1, (i - 1) / np.maximum(r - 1, 1), 1.0)
        term = (1.0 / ngood[rows]) * (old_precision + precision) / 2
    else:
        term = precision / ngood[rows]
    valid = ngood > 0
    ap_rows = np.where(valid, np.bincount(rows, weights=term, minlength=b), np.nan)
    first = np.zeros(b, dtype=np.int64)
    first[valid] = r[row_start[valid]].astype(np.int64)
    return ap_rows, first


def evaluate(
    distmat,
    query_pids,
    gallery_pids,
    query_cams,
    gallery_cams,
    max_rank: int = 20,
    ap: str = "trapezoid",
    chunk_size: int = 256,
) -> dict:
    """CMC and mAP of a query x gallery distance matrix under the Market-1501 protocol.

    AP of one query with ``n`` good matches, the i-th found at position ``r_i`` (1-based, junk removed):

    * ``ap="trapezoid"`` (official Market-1501 ``compute_AP``, also the Python port used by BUC's code):
      area under the precision-recall curve by the trapezoid rule, starting from precision 1,
      ``AP = sum_i (1/n) * (p_{i-1} + p_i) / 2`` with ``p_i = i / r_i`` and ``p_{i-1} = (i-1)/(r_i-1)``
      (``1`` when ``r_i = 1``).
    * ``ap="step"`` (torchreid / fast-reid): non-interpolated ``AP = (1/n) sum_i i / r_i``.

    CMC at rank k is the fraction of valid queries whose first good match is at position <= k.

    Work is done ``chunk_size`` query rows at a time (argsort a block, gather identities and cameras,
    masks by broadcasting, cumulative sums for positions), so memory is O(chunk_size x num_gallery)
    beyond the inputs; a Market-1501 matrix (3,368 x 19,732) takes a few seconds.

    Args:
        distmat: (num_query, num_gallery) distances, smaller = more similar; numpy array or torch tensor.
        query_pids, gallery_pids, query_cams, gallery_cams: 1-D integer identities / camera ids.
        max_rank: length of the returned CMC curve.
        ap: ``"trapezoid"`` or ``"step"``.
        chunk_size: query rows processed at once.

    Returns:
        dict with ``mAP`` (float in [0, 1]), ``cmc`` (float64 array of length ``max_rank``),
        ``rank1``/``rank5``/``rank10``/``rank20`` (floats, computed even when ``max_rank`` is smaller),
        ``num_valid_queries`` (int) and ``ap_per_query`` (float64, NaN for skipped queries).

    Raises:
        ValueError: bad shapes, NaN distances, an unknown ``ap`` mode, bad ``max_rank``/``chunk_size``,
            or no query with a valid match.
    """
    if ap not in AP_MODES:
        raise ValueError(f"ap must be one of {AP_MODES}, got {ap!r}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
    chunk_size = _check_chunk(chunk_size)
    dist = _as_numpy(distmat)
    if dist.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {dist.shape}")
    if not np.issubdtype(dist.dtype, np.number) or np.iscomplexobj(dist):
        raise ValueError(f"distmat must be real-valued, got dtype {dist.dtype}")
    nq, ng = dist.shape
    if nq == 0 or ng == 0:
        raise ValueError(f"distmat is empty: shape {dist.shape}")
    q_pids = _check_ids(query_pids, nq, "query_pids", "distmat row")
    q_cams = _check_ids(query_cams, nq, "query_cams", "distmat row")
    g_pids = _check_ids(gallery_pids, ng, "gallery_pids", "distmat column")
    g_cams = _check_ids(gallery_cams, ng, "gallery_cams", "distmat column")

    first_hit = np.zeros(nq, dtype=np.int64)  # 1-based position of the first good match, 0 = skipped
    ap_all = np.full(nq, np.nan)
    for start in range(0, nq, chunk_size):
        stop = min(start + chunk_size, nq)
        block = dist[start:stop]
        if np.isnan(block).any():
            rows = np.flatnonzero(np.isnan(block).any(axis=1))[:5] + start
            raise ValueError(f"distmat contains NaN (e.g. in rows {rows.tolist()})")
        ap_all[start:stop], first_hit[start:stop] = _evaluate_block(
            block, q_pids[start:stop], q_cams[start:stop], g_pids, g_cams, ap
        )

    valid = first_hit > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError("no query has a valid gallery match (same identity, other camera): cannot evaluate")
    hits = first_hit[valid]
    # cmc[k-1] = fraction of valid queries whose first match is at position <= k.
    cmc = np.cumsum(np.bincount(np.minimum(hits, max_rank + 1), minlength=max_rank + 2))[1 : max_rank + 1] / n_valid
    return {
        "mAP": float(np.mean(ap_all[valid])),
        "cmc": cmc,
        **{f"rank{k}": float((hits <= k).mean()) for k in (1, 5, 10, 20)},
        "num_valid_queries": n_valid,
        "ap_per_query": ap_all,
    }


def pairwise_distance(query_features, gallery_features, metric: str = "sqeuclidean", chunk_size: int = 1024):
    """Query x gallery distances as float32 numpy, ``chunk_size`` query rows per matmul.

    ``sqeuclidean`` is ``|q|^2 + |g|^2 - 2 q.g`` clipped at 0 (= ``2 - 2 cos`` on unit features, the
    distance BUC evaluates with), ``euclidean`` its square root, ``cosine`` is ``1 - cos``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    chunk_size = _check_chunk(chunk_size)
    q = _as_numpy(query_features).astype(np.float32, copy=False)
    g = _as_numpy(gallery_features).astype(np.float32, copy=False)
    for name, x in (("query_features", q), ("gallery_features", g)):
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N, d), got shape {x.shape}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query_features have dim {q.shape[1]} but gallery_features have dim {g.shape[1]}")
    if metric == "cosine":
        # eps keeps an all-zero feature finite (distance 1 to everything) instead of NaN.
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    g_sq = np.einsum("ij,ij->i", g, g)
    out = np.empty((q.shape[0], g.shape[0]), dtype=np.float32)
    for s in range(0, q.shape[0], chunk_size):
        qb = q[s : s + chunk_size]
        dot = qb @ g.T
        if metric == "cosine":
            out[s : s + len(qb)] = 1.0 - dot
            continue
        d = np.einsum("ij,ij->i", qb, qb)[:, None] + g_sq[None, :] - 2.0 * dot
        np.maximum(d, 0.0, out=d)  # round-off can make self-distances slightly negative
        out[s : s + len(qb)] = np.sqrt(d) if metric == "euclidean" else d
    return out


def nearest(query_features, gallery_features, k: int, skip=None, metric: str = "sqeuclidean",
            chunk_bytes: int = 64 * 2**20) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` gallery rows nearest each query by :func:`pairwise_distance`, ascending, ties in gallery order
    (``np.argsort(d, kind="stable")[:k]`` of each query's row, exactly), without the whole query x gallery
    matrix: queries go in chunks of about ``chunk_bytes`` of distances (the peak is a few times that: the
    product's temporaries), each row's ``k`` smallest by :func:`stable_topk_rows` (a partition, then only the
    entries at or below the k-th value sorted). Memory O(chunk + nq k), time O(ng) per query besides the
    product, not O(ng log ng): ``benchmarks/evaluation.py --search``.

    ``skip``: optional (nq,) gallery index per query to leave out (its own image; -1 for none). Returns
    ``(indices, distances)``, (nq, min(k, ng)), int64 and float32; a query with fewer than that many gallery
    rows left gets -1 and NaN in its last places.
    """
    q = _as_numpy(query_features)
    g = _as_numpy(gallery_features)
    nq, ng = len(q), len(g)
    k, skip = _check_top(k, skip, nq, ng)
    indices = np.full((nq, k), -1, dtype=np.int64)
    distances = np.full((nq, k), np.nan, dtype=np.float32)
    rows = max(1, min(nq, int(chunk_bytes) // max(1, 4 * ng)))
    for s in range(0, nq, rows):
        dist = pairwise_distance(q[s:s + rows], g, metric=metric, chunk_size=rows)
        indices[s:s + rows], distances[s:s + rows] = _top(dist, k, None if skip is None else skip[s:s + rows])
    return indices, distances


def nearest_by_distance(dist, k: int, skip=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest` on a given (nq, ng) distance matrix (re-ranked distances, say): each row's ``k``
    smallest, ascending, ties in gallery order; ``skip`` and the returns as :func:`nearest`'s."""
    d = _as_numpy(dist)
    if d.ndim != 2:
        raise ValueError(f"dist must be a 2-D (queries, gallery) array, got shape {d.shape}")
    k, skip = _check_top(k, skip, *d.shape)
    writes = skip is not None and bool((skip >= 0).any())  # _top sets skipped entries: a copy only then
    return _top(d.astype(np.float32, copy=writes), k, skip)


def _check_top(k, skip, nq: int, ng: int):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if skip is not None:
        skip = np.asarray(skip, dtype=np.int64)
        if skip.shape != (nq,) or (skip >= ng).any():
            raise ValueError(f"skip must hold one gallery index (< {ng}, or -1) per query ({nq})")
    return min(int(k), ng), skip


def _top(dist: np.ndarray, k: int, skip) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest of each row of ``dist`` (changed in place: skipped entries set to inf)."""
    if skip is not None:
        own = np.flatnonzero(skip >= 0)
        if own.size:  # a read-only matrix with nothing to skip is read in place
            dist[own, skip[own]] = np.inf
    top = stable_topk_rows(dist, k)
    value = np.take_along_axis(dist, top, axis=1)
    left = np.isfinite(value)  # a skipped row sorts last: it is the padding
    return np.where(left, top, -1), np.where(left, value, np.nan).astype(np.float32)
