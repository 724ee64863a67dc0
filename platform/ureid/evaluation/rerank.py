"""k-reciprocal re-ranking (Zhong et al., *Re-ranking Person Re-identification with k-reciprocal
Encoding*, CVPR 2017), chunked over rows and sparse where the reference code is dense."""

from __future__ import annotations

import numpy as np

from .metrics import _as_numpy, _check_chunk, pairwise_distance, stable_topk_rows


def _reciprocal(topk: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """R(i, k) of eq. 4: ``j`` in the k-nearest of ``i`` *and* ``i`` in the k-nearest of ``j``.

    Returned as the first ``k`` neighbours of every row with non-reciprocal ones replaced by -1.
    """
    fwd = topk[:, :k]
    out = np.full_like(fwd, -1)
    for a in range(0, fwd.shape[0], chunk):
        f = fwd[a : a + chunk]
        back = fwd[f]  # (b, k, k): the k-nearest of each forward neighbour
        ok = (back == np.arange(a, a + len(f))[:, None, None]).any(axis=2)
        out[a : a + chunk][ok] = f[ok]
    return out


def _ragged_gather(ptr: np.ndarray, which: np.ndarray):
    """Entry positions of the CSR-style segments ``which`` (concatenated) and each one's segment number."""
    lengths = ptr[which + 1] - ptr[which]
    seg = np.repeat(np.arange(which.size), lengths)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    pos = np.arange(seg.size) - offsets[seg] + ptr[which][seg]
    return pos, seg


def re_ranking(
    q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, chunk_size: int = 256,
    progress=None,
):
    """k-reciprocal re-ranked query x gallery distances (Zhong et al., CVPR 2017).

    Follows the authors' ``re_ranking.py`` step by step, so results match it (to float32 round-off):

    1. ``original_dist`` = the (Q+G) x (Q+G) matrix ``[[q_q, q_g], [q_g^T, g_g]]``, squared (the reference
       expects plain Euclidean distances and squares them; pass ``pairwise_distance(..., "euclidean")``),
       divided by its column maxima and transposed.
    2. k-reciprocal set ``R(p, k1)`` (eq. 4), expanded to ``R*`` by every ``R(q, round(k1/2))`` of a member
       ``q`` that shares more than 2/3 of its elements with ``R(p, k1)`` (eq. 6).
    3. ``V_p`` = Gaussian kernel ``exp(-d(p, g))`` on ``R*``, normalised to sum 1 (eq. 7).
    4. Local query expansion: ``V_p`` <- mean of ``V`` over the ``k2`` nearest neighbours of ``p`` (eq. 11).
    5. Jaccard distance ``d_J = 1 - sum min(V_p, V_g) / sum max(V_p, V_g)`` (eq. 10), with the
       reference's ``sum max = 2 - sum min`` (rows of ``V`` sum to 1).
    6. ``d* = (1 - lambda) d_J + lambda d`` (eq. 12).

    Memory: the reference holds five or more dense N x N arrays (N = Q + G: the concatenation, the
    normalised copy, ``initial_rank``, ``V``, ``V_qe``); for Market-1501 (N = 23,100) that is ~10 GB.
    Here no N x N array is built: rows of ``original_dist`` are recomputed ``chunk_size`` at a time from
    the caller's blocks (which already hold the N^2 distances the method needs), so working memory is
    O(chunk_size x N) dense plus O(N x max(k1, k2)) neighbour lists, a sparse ``V`` with
    O(N x k1^2 x k2) non-zeros at most (one to two hundred per row in practice), the Jaccard step's
    O(chunk_size x nnz(row) x nnz(column)) gathered pairs, and the Q x G float32 output. Measured:
    N = 8,000 (1,000 x 7,000) in ~6 s with a 114 MB peak, where one dense N x N float32 is 244 MB.

    Ties in distance are ordered by index (stable), the reference's quicksort leaves them arbitrary.

    Args:
        q_g_dist, q_q_dist, g_g_dist: (Q, G), (Q, Q), (G, G) distances; numpy arrays or torch tensors.
        k1: size of the k-reciprocal neighbourhood (paper: 20).
        k2: neighbours averaged in the local query expansion (paper: 6; 1 disables it).
        lambda_value: weight of the original distance in the final mix (paper: 0.3).
        chunk_size: rows processed at once.
        progress: optional ``progress(done, total)``, called after each chunk of rows of each pass (``total``
            counts the rows of all passes: 2N, 3N with the query expansion, plus Q).

    Returns:
        (Q, G) float32 numpy array of re-ranked distances.
    """
    qg = _as_numpy(q_g_dist)
    qq = _as_numpy(q_q_dist)
    gg = _as_numpy(g_g_dist)
    if qg.ndim != 2 or qg.size == 0:
        raise ValueError(f"q_g_dist must be a non-empty 2-D (Q, G) array, got shape {qg.shape}")
    nq, ng = qg.shape
    if qq.shape != (nq, nq):
        raise ValueError(f"q_q_dist must have shape (Q, Q) = {(nq, nq)} to match q_g_dist {qg.shape}, got {qq.shape}")
    if gg.shape != (ng, ng):
        raise ValueError(f"g_g_dist must have shape (G, G) = {(ng, ng)} to match q_g_dist {qg.shape}, got {gg.shape}")
    _check_settings(k1, k2, lambda_value)
    dtype = np.result_type(qg, qq, gg)

    def orig_rows(a: int, b: int) -> np.ndarray:
        """Rows [a, b) of the reference's normalised ``original_dist``: row i is column i of the
        concatenated matrix, squared and divided by that column's maximum."""
        parts = []
        if a < nq:
            s, e = a, min(b, nq)
            parts.append(np.concatenate([qq[:, s:e].T, qg[s:e]], axis=1))
        if b > nq:
            s, e = max(a, nq) - nq, b - nq
            parts.append(np.concatenate([qg[:, s:e].T, gg[:, s:e].T], axis=1))
        return _normalised(np.power(np.concatenate(parts, axis=0).astype(dtype, copy=False), 2))

    return _re_rank(orig_rows, nq, ng, k1, k2, lambda_value, _check_chunk(chunk_size),
                    ("q_q_dist or q_g_dist", "q_g_dist or g_g_dist"), progress)


def re_ranking_features(query_features, gallery_features, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                        chunk_size: int = 256, progress=None):
    """:func:`re_ranking` of the Euclidean distances between features, without any of the three distance
    matrices: each ``chunk_size`` rows of ``original_dist`` are computed from the features when a pass needs
    them (row i: sample i's squared Euclidean distances to every query and gallery sample, by
    :func:`~ureid.evaluation.metrics.pairwise_distance`, divided by their maximum). Memory O(chunk_size x N)
    beside the sparse V and the (Q, G) output, so a gallery whose G x G matrix would not fit (MSMT17's 82,161:
    27 GB) is re-ranked too; the price is computing the N x N products twice (the neighbour lists, then V)
    and the queries' rows a third time. Equal to :func:`re_ranking` of ``pairwise_distance(..., "euclidean")``
    blocks up to the products' float32 rounding (tested).

    Args: ``query_features`` (Q, d), ``gallery_features`` (G, d), numpy arrays or torch tensors; the rest as
    :func:`re_ranking`. Returns the (Q, G) float32 re-ranked distances."""
    q = _as_numpy(query_features).astype(np.float32, copy=False)
    g = _as_numpy(gallery_features).astype(np.float32, copy=False)
    if q.ndim != 2 or g.ndim != 2 or not len(q) or not len(g) or q.shape[1] != g.shape[1]:
        raise ValueError(f"query_features and gallery_features must be non-empty (Q, d) and (G, d) arrays, "
                         f"got shapes {q.shape} and {g.shape}")
    for name, f in (("query_features", q), ("gallery_features", g)):
        bad = np.flatnonzero(~np.isfinite(f).all(axis=1))  # every row of original_dist would be NaN
        if bad.size:
            raise ValueError(f"{name} has a NaN or infinite value in row {bad[0]}")
    _check_settings(k1, k2, lambda_value)
    x = np.concatenate([q, g])

    def orig_rows(a: int, b: int) -> np.ndarray:
        return _normalised(np.power(pairwise_distance(x[a:b], x, metric="euclidean"), 2))

    return _re_rank(orig_rows, len(q), len(g), k1, k2, lambda_value, _check_chunk(chunk_size),
                    ("query_features", "gallery_features"), progress)


def _check_settings(k1, k2, lambda_value) -> None:
    for name, k in (("k1", k1), ("k2", k2)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{name} must be a positive int, got {k!r}")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")


def _normalised(sq: np.ndarray) -> np.ndarray:
    """Squared distances as float32, each row divided by its maximum (the reference's column maxima)."""
    sq = sq.astype(np.float32)
    mx = sq.max(axis=1, keepdims=True)
    return sq / np.where(mx > 0, mx, np.float32(1))  # all-zero column: the reference divides 0/0


def _re_rank(orig_rows, nq: int, ng: int, k1: int, k2: int, lambda_value: float, chunk: int, names,
             progress=None) -> np.ndarray:
    """Passes 1-4 of :func:`re_ranking` over ``orig_rows(a, b)`` (rows [a, b) of the normalised
    ``original_dist``); ``names``: what to blame for a NaN in a query's row and in a gallery sample's;
    ``progress(done, total)`` after each chunk, counting the rows of every pass."""
    n = nq + ng
    all_rows = (3 if k2 != 1 else 2) * n + nq
    done = 0

    def advance(rows: int) -> None:
        nonlocal done
        done += rows
        if progress is not None:
            progress(done, all_rows)

    # Pass 1: nearest neighbours of every row (the reference's initial_rank, first columns only).
    kk = min(max(k1 + 1, k2), n)
    topk = []
    for a in range(0, n, chunk):
        rows = orig_rows(a, min(a + chunk, n))
        if np.isnan(rows).any():  # checked block by block: a whole-matrix isnan would cost N^2 bytes
            bad = a + int(np.flatnonzero(np.isnan(rows).any(axis=1))[0])
            which = names[bad >= nq]
            raise ValueError(f"{which} contains NaN (column {bad if bad < nq else bad - nq})")
        topk.append(stable_topk_rows(rows, kk))
        advance(len(rows))
    topk = np.concatenate(topk)
    R = _reciprocal(topk, min(k1 + 1, n), chunk)
    R_half = _reciprocal(topk, min(int(np.around(k1 / 2.0)) + 1, n), chunk)

    # Pass 2: V (eqs. 6-7) as CSR (indptr, indices, data).
    counts, indices, data = [], [], []
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        r = R[a:b]  # (B, K1), -1 = not reciprocal
        cand = R_half[np.maximum(r, 0)]  # (B, K1, Kh): R(q, k1/2) of each candidate q
        cand_len = (cand >= 0).sum(axis=2)
        shared = ((cand[..., None] == r[:, None, None, :]) & (cand[..., None] >= 0)).any(axis=3).sum(axis=2)
        take = (r >= 0) & (shared > 2.0 / 3 * cand_len)
        member = np.zeros((b - a, n), dtype=bool)
        rr, cc = np.nonzero(r >= 0)
        member[rr, r[rr, cc]] = True
        tb, tk = np.nonzero(take)
        extra = cand[tb, tk]  # (M, Kh)
        ok = extra >= 0
        member[np.repeat(tb, ok.sum(axis=1)), extra[ok]] = True
        rows, cols = np.nonzero(member)
        w = np.exp(-orig_rows(a, b)[rows, cols])
        total = np.bincount(rows, weights=w, minlength=b - a)
        counts.append(np.bincount(rows, minlength=b - a))
        indices.append(cols)
        data.append((w / total[rows]).astype(np.float32))
        advance(b - a)
    indptr = np.concatenate(([0], np.cumsum(np.concatenate(counts))))
    indices, data = np.concatenate(indices), np.concatenate(data)

    # Pass 3: local query expansion (eq. 11), sparse: sum the k2 neighbour rows, then divide.
    if k2 != 1:
        k2n = min(k2, n)
        counts, new_idx, new_data = [], [], []
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            pos, seg = _ragged_gather(indptr, topk[a:b, :k2n].ravel())
            keys = (seg // k2n) * n + indices[pos]
            uniq, inv = np.unique(keys, return_inverse=True)
            new_data.append((np.bincount(inv, weights=data[pos]) / k2n).astype(np.float32))
            new_idx.append(uniq % n)
            counts.append(np.bincount(uniq // n, minlength=b - a))
            advance(b - a)
        indptr = np.concatenate(([0], np.cumsum(np.concatenate(counts))))
        indices, data = np.concatenate(new_idx), np.concatenate(new_data)

    # Pass 4: Jaccard distance (eq. 10) through the inverted index (columns of V), queries only.
    entry_row = np.repeat(np.arange(n), np.diff(indptr))
    by_col = np.argsort(indices, kind="stable")
    col_ptr = np.concatenate(([0], np.cumsum(np.bincount(indices, minlength=n))))
    col_rows, col_data = entry_row[by_col], data[by_col]
    out = np.empty((nq, ng), dtype=np.float32)
    for a in range(0, nq, chunk):
        b = min(a + chunk, nq)
        mine = np.arange(indptr[a], indptr[b])  # V entries (p, k) of the queries in this chunk
        pos, seg = _ragged_gather(col_ptr, indices[mine])  # every (g, k) sharing column k
        g = col_rows[pos]
        keep = g >= nq  # only gallery columns are returned
        contrib = np.minimum(data[mine][seg[keep]], col_data[pos][keep])
        flat = (entry_row[mine][seg[keep]] - a) * ng + (g[keep] - nq)
        tmin = np.bincount(flat, weights=contrib, minlength=(b - a) * ng).reshape(b - a, ng)
        jaccard = 1.0 - tmin / (2.0 - tmin)
        out[a:b] = jaccard * (1 - lambda_value) + orig_rows(a, b)[:, nq:] * lambda_value
        advance(b - a)
    return out
