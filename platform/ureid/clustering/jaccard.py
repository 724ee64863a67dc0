"""Cluster Contrast label update: k-reciprocal Jaccard distance, then DBSCAN, without an N x N matrix.

Dai et al., *Cluster Contrast for Unsupervised Person Re-Identification* (2021), and SpCL before it,
cluster with DBSCAN on the k-reciprocal Jaccard distance of Zhong et al., *Re-ranking Person
Re-identification with k-reciprocal Encoding*, CVPR 2017 (Sec. 3.2 k-reciprocal nearest neighbours,
Sec. 3.3 Jaccard distance, Sec. 3.4 local query expansion), as computed by their public code
(``compute_jaccard_distance`` in ``clustercontrast/utils/faiss_rerank.py``, then
``sklearn.cluster.DBSCAN(metric="precomputed")``). That code builds dense N x N float32 matrices
(V, its query expansion and the distances: 24 GB each at N = 77,616). V has O(k1) nonzeros per row
and the distance is exactly 1 between rows of V that share no column, so this module computes the
same numbers from sparse rows and stores only the pairs below 1 (or below DBSCAN's eps).
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from ._common import as_numpy_features, map_threads, relabel_by_first_index, resolve_threads
from .topk import ExactKnn, knn_search_block

# Candidate (row, column, row') triples held at once in the expansion and Jaccard passes (~60 bytes
# each in temporaries): bounds the working memory independently of N and of how clustered the data is.
_TRIPLE_BUDGET = 1 << 21


def _threaded_budget() -> int:
    """Triples per row block when blocks run on the caller's threads: the same total in flight."""
    return max(1, _TRIPLE_BUDGET // resolve_threads())


def kreciprocal_jaccard(features, k1: int = 30, k2: int = 6, max_distance=None, map_blocks=None,
                        block_size: int = 4096, *, device=None, stats=None) -> sp.csr_matrix:
    """The k-reciprocal Jaccard distance matrix of Cluster Contrast / SpCL, as a sparse CSR matrix.

    The public code's procedure, step by step (quirks included):

    1. ``initial_rank``: the ``k1`` nearest neighbours of every sample by squared L2 distance, the
       sample itself normally first (faiss ``IndexFlatL2``, here through ``topk.ExactKnn``).
    2. ``R(i)``: the forward neighbours ``j`` in ``initial_rank[i, :L]`` with ``i`` in
       ``initial_rank[j, :L]`` (k-reciprocal, Zhong et al. Sec. 3.2). The code slices ``:k1 + 1`` of
       a list that has only ``k1`` columns, so ``L = k1``; ``R_half`` uses ``:int(np.around(k1 / 2)) + 1``,
       i.e. ``L_half = round_half_even(k1 / 2) + 1`` entries (16 for k1 = 30), capped at ``k1``.
    3. Expansion: ``R*(i) = R(i)`` plus ``R_half(c)`` for every ``c`` in ``R(i)`` with
       ``|R_half(c) & R(i)| > 2/3 |R_half(c)|`` (the float comparison of the code), as a set.
    4. ``V[i, j] = softmax_j(-(2 - 2 x_i . x_j))`` over ``j`` in ``R*(i)``, 0 elsewhere (Sec. 3.3's
       Gaussian kernel, normalised; the formula assumes L2-normalised features and is applied as is).
    5. Local query expansion (Sec. 3.4) when ``k2 != 1``: ``V[i] <- mean of V[initial_rank[i, :k2]]``
       (``k2 = 1`` skips it, as the code does, rather than replacing ``V[i]`` by its first neighbour's).
    6. ``t_ij = sum_c min(V[i, c], V[j, c])`` and ``d_ij = 1 - t_ij / (2 - t_ij)``, negatives set
       to 0. (``2 - t`` is ``sum_c max(V_i, V_j)`` because the rows of V sum to 1.)

    **Sparsity.** A pair that shares no column of V has ``t = 0`` and distance exactly 1; those are
    the entries the returned matrix leaves out, so read an absent entry as distance 1.0 (this is
    what :func:`dbscan` does). Step 6 runs one block of rows at a time from an inverted index (the
    CSC form of V): for row ``i`` and each column ``c`` of its support, the rows ``j >= i`` holding
    ``c``; their ``min(V_ic, V_jc)`` are summed per ``(i, j)`` by a COO-to-CSR scatter. Each
    unordered pair is computed once and mirrored, so the matrix is exactly symmetric. Memory is
    O(nnz) of V, V_qe and the result plus a bounded block of candidate triples (and faiss' copy of
    the features during the search); nothing N x N, not even one dense row per sample.

    **Numerics.** The k-NN lists are faiss' own (float32). Dot products, softmax, query expansion and
    ``t`` are computed in float64 from the float32 features (the code uses float32), and the distance
    is rounded to float32 once, so it agrees with the code to float32 rounding (~1e-7). Every pair
    with ``t > 0`` has ``t >= e^-4 / (k2 |R*|_max)`` (unit features: softmax weights of distances in
    [0, 4]), far above float32's 2^-24 for any practical k1, so its float32 distance is < 1: the
    stored support is exactly the set of entries < 1 of the dense matrix.

    **Explicit zeros.** Self distances (exactly 0: ``t_ii`` is the sum of row i of V, which is 1;
    the code's float32 arithmetic leaves up to ~1e-7 there) and clamped negatives are *stored* as 0.0:
    DBSCAN must count them as neighbours. SciPy drops explicit zeros in some operations (``A + B``,
    ``A.multiply``, ``eliminate_zeros``, some conversions): pass this matrix to :func:`dbscan` as
    returned.

    **Neighbour blocks.** The k-NN search runs in consecutive blocks of ``block_size`` queries;
    with ``map_blocks`` (and more than one block) the blocks go through it, with the same queries,
    so the result is bit-identical with or without it. faiss' float32 distances can differ in the
    last bit with the query block shape, which can swap neighbours whose distances tie to ~1e-6;
    faiss itself works in query blocks of 4096 (``faiss.cvar.distance_compute_blas_query_bs``), so
    a ``block_size`` that is a multiple of 4096 (the default) gives exactly the lists of the public
    code's single ``index.search`` call.

    Args:
        features: (N, d) L2-normalised features, numpy array or torch tensor (copied to float32).
        k1: neighbours of step 1 (Cluster Contrast: 30), ``1 <= k1 <= N``.
        k2: query-expansion neighbours (Cluster Contrast: 6), ``1 <= k2 <= k1``.
        max_distance: None keeps every pair with distance < 1; a number in [0, 1) keeps only the
            pairs with distance <= max_distance (all DBSCAN with ``eps = max_distance`` needs; memory
            then scales with the close pairs only). The cut is applied to the stored float32 values
            and keeps every value that ``<= max_distance`` selects whether NumPy compares in float32
            (a Python float against float32 data, as scikit-learn's DBSCAN does) or in float64.
        map_blocks: optional executor ``map_blocks(fn, shared, items) -> [fn(shared, item) for item in
            items]`` (see ``topk.knn_search_block``) through which the k-NN blocks run, e.g. as Ray tasks.
        block_size: queries per k-NN block (>= 1).
        device: None: the k-NN search in faiss (CPU); a torch device (``"cuda"``): the search there, in
            torch (``topk.ExactKnn``'s torch backend; ``map_blocks`` unused), the sparse steps on CPU.
            torch's float32 distances can differ from faiss' in the last bit, so neighbours whose
            distances tie to ~1e-6 may come in the other order (the same caveat as ``block_size``).
        stats: optional dict, filled with ``knn_blocks``, ``mapped_blocks``, ``expansion_pairs``
            (nnz of V), ``qe_pairs`` (nnz of V after query expansion), ``triples`` (candidate
            ``(i, c, j)`` terms summed in step 6) and ``stored_pairs`` (nnz of the result).

    Returns:
        ``scipy.sparse.csr_matrix`` (N, N), float32, canonical (sorted indices, no duplicates),
        symmetric, with explicit zeros kept.
    """
    X = as_numpy_features(features)
    n = X.shape[0]
    k1 = _check_int(k1, "k1", 1, n, f"the number of samples N = {n}")
    k2 = _check_int(k2, "k2", 1, k1, f"k1 = {k1} (it slices the k1-NN lists)")
    cut = None
    if max_distance is not None:
        md = _check_real(max_distance, "max_distance")
        if not 0.0 <= float(md) < 1.0:
            raise ValueError(f"max_distance must be None or in [0, 1) (pairs that share no neighbour have "
                             f"distance 1 and are never stored), got {max_distance!r}")
        cut = max(float(md), float(np.float32(md)))
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    info = {"knn_blocks": 0, "mapped_blocks": 0, "expansion_pairs": 0, "qe_pairs": 0, "triples": 0,
            "stored_pairs": 0}
    if stats is not None:
        stats.clear()
        stats.update(info)
        info = stats

    rank = _knn_ranks(X, k1, int(block_size), map_blocks, info, device)
    r_ptr, r_idx = _reciprocal(rank, k1)
    h_ptr, h_idx = _reciprocal(rank, min(int(np.around(k1 / 2)) + 1, k1))
    e_ptr, e_idx = _expand(n, r_ptr, r_idx, h_ptr, h_idx)
    V = sp.csr_matrix((_softmax_weights(X, e_ptr, e_idx), e_idx, e_ptr), shape=(n, n))
    info["expansion_pairs"] = int(V.nnz)
    del r_ptr, r_idx, h_ptr, h_idx, e_ptr, e_idx
    if k2 != 1:
        qe = sp.csr_matrix((np.ones(n * k2), rank[:, :k2].reshape(-1), np.arange(0, n * k2 + 1, k2)),
                           shape=(n, n))
        V = qe @ V  # sum of the k2 rows; all terms > 0, so no cancellation can drop an entry
        V.data /= k2
        V.sort_indices()
    info["qe_pairs"] = int(V.nnz)
    return _jaccard(V, cut, info)


def dbscan(distances, eps, min_samples: int = 4) -> np.ndarray:
    """DBSCAN on a sparse precomputed distance matrix; labels equal to scikit-learn's on the dense matrix.

    ``distances`` is read as the dense matrix whose absent entries are 1.0 (the Jaccard distance of
    pairs sharing no neighbour; :func:`kreciprocal_jaccard`'s output), and the result equals
    ``sklearn.cluster.DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dense)``.
    ``eps`` must compare below 1.0, so absent entries are never neighbours. (scikit-learn given the
    *sparse* matrix differs: it reads absent entries as "not neighbours" too but adds every missing
    diagonal entry as an explicit 0, and a stored 0 is a neighbour; here a missing diagonal is 1.0.)

    Closed form of scikit-learn's procedure (Ester et al., KDD 1996, as ``dbscan_inner`` runs it):

    * neighbourhood ``N(i) = {j : D[i, j] <= eps}`` (row ``i``; the point itself only if its stored
      diagonal is ``<= eps``), compared exactly as scikit-learn does, ``data <= eps`` with NumPy's
      promotion (float32 data and a Python float eps compare in float32: an entry equal to
      ``float32(eps)`` counts even when it is above ``eps`` in float64);
    * core points: ``|N(i)| >= min_samples``;
    * clusters: connected components of the graph on core points with edges ``j in N(i)``, numbered
      in ascending order of their smallest core index. scikit-learn grows one cluster at a time by
      depth-first search from the smallest unlabelled core point, expanding through cores only; with
      a symmetric core-core relation what that search reaches is exactly the component;
    * a non-core point gets the *smallest* label among the clusters of the cores ``c`` with it in
      ``N(c)`` (the cluster expanded first claims it; later ones skip labelled points), else -1.

    The core-core relation must be symmetric (it is for :func:`kreciprocal_jaccard`, which is
    exactly symmetric); otherwise the search's result depends on the visiting order and this raises.
    Border-point relations may be asymmetric.

    Args:
        distances: (N, N) scipy sparse matrix (CSR preferred; other formats are converted), floating
            point, finite and >= 0; duplicate entries are summed, as ``toarray()`` would.
        eps: neighbourhood radius, a real number > 0 that compares below 1.0 against the data's dtype.
        min_samples: neighbourhood size (the point included) that makes a core point, integer >= 1.

    Returns:
        (N,) int64 labels, clusters ``0..C-1``, -1 for noise.
    """
    D = _check_distances(distances)
    n = D.shape[0]
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"eps must be a real number in (0, 1), got {eps!r}")
    if not float(eps) > 0.0 or bool((np.ones(1, dtype=D.dtype) <= eps)[0]):
        raise ValueError(f"eps must be > 0 and below 1.0 (the distance of absent entries, which would otherwise "
                         f"all be neighbours) in {D.dtype} comparison, got {eps!r}")
    min_samples = _check_int(min_samples, "min_samples", 1, None, None)

    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(D.indptr))
    near = D.data <= eps  # the very comparison scikit-learn makes, dtype promotion included
    src, dst = rows[near], D.indices[near].astype(np.int64)
    core = np.bincount(src, minlength=n) >= min_samples

    cc = core[src] & core[dst]
    a, b = src[cc], dst[cc]
    if not np.array_equal(np.sort(a * n + b), np.sort(b * n + a)):
        raise ValueError("distances: the neighbourhood relation between core points is not symmetric "
                         "(D[i, j] <= eps but not D[j, i]); DBSCAN's result would depend on the visiting order")
    labels = np.full(n, -1, dtype=np.int64)
    core_ids = np.flatnonzero(core)
    if core_ids.size == 0:
        return labels
    graph = sp.csr_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    labels[core_ids] = relabel_by_first_index(component[core_ids])

    border = core[src] & ~core[dst]
    if border.any():
        claim = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(claim, dst[border], labels[src[border]])
        claimed = claim != np.iinfo(np.int64).max
        labels[claimed] = claim[claimed]
    return labels


# ----------------------------------------------------------------------------------------- helpers


def _check_int(value, name, low, high, high_what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high} ({high_what})"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_real(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return value


def _knn_ranks(X, k, block_size, map_blocks, info, device=None):
    """``initial_rank``: (N, k) int64 neighbour ids, one faiss search per block of queries (torch's on
    ``device`` when given)."""
    n = X.shape[0]
    starts = range(0, n, block_size)
    info["knn_blocks"] = len(starts)
    if device is not None:
        knn = ExactKnn(X, backend="torch", device=device, block_size=block_size)
        results = (knn.search(X[s:s + block_size], k) for s in starts)
    elif map_blocks is not None and len(starts) > 1:
        # Views of X: the executor ships them (e.g. Ray puts X once as `shared`, the queries per task).
        jobs = [(X[s:s + block_size], k) for s in starts]
        results = map_blocks(knn_search_block, X, jobs)
        info["mapped_blocks"] = len(jobs)
        if len(results) != len(jobs):
            raise RuntimeError(f"map_blocks returned {len(results)} results for {len(jobs)} k-NN blocks")
    else:
        knn = ExactKnn(X, backend="faiss", block_size=block_size)
        results = (knn.search(X[s:s + block_size], k) for s in starts)
    rank = np.empty((n, k), dtype=np.int64)
    for s, (_, ids) in zip(starts, results):
        rank[s:s + block_size] = ids
    return rank


def _reciprocal(rank, length):
    """Rows ``R(i) = {j in rank[i, :length] : i in rank[j, :length]}`` as CSR (indptr, indices).

    Membership is tested on the sorted pair keys ``i * N + j`` (N * length of them), not on a dense mask.
    """
    n = rank.shape[0]
    rows = np.repeat(np.arange(n, dtype=np.int64), length)
    cols = rank[:, :length].reshape(-1)
    keys = np.sort(rows * n + cols)
    back = cols * n + rows
    pos = np.minimum(np.searchsorted(keys, back), keys.size - 1)
    keep = keys[pos] == back
    return _indptr(rows[keep], n), cols[keep]


def _indptr(sorted_rows, n):
    return _indptr_from_counts(np.bincount(sorted_rows, minlength=n))


def _row_blocks(weight, budget):
    """Consecutive row ranges whose summed ``weight`` stays within ``budget`` (at least one row each)."""
    n = weight.size
    cum = np.cumsum(weight, dtype=np.int64)
    s, out = 0, []
    while s < n:
        before = cum[s - 1] if s else 0
        e = max(s + 1, int(np.searchsorted(cum, before + budget, side="right")))
        out.append((s, min(e, n)))
        s = e
    return out


def _spans(start, length):
    """Positions ``start[k] .. start[k] + length[k] - 1`` for all k, flattened, with their k."""
    which = np.repeat(np.arange(start.size, dtype=np.int64), length)
    offset = np.arange(which.size, dtype=np.int64) - np.repeat(np.cumsum(length) - length, length)
    return which, start[which] + offset


def _expand(n, r_ptr, r_idx, h_ptr, h_idx):
    """``R*(i)`` of step 3 as CSR with sorted, unique columns.

    For every pair (i, c in R(i)) each m in R_half(c) is one triple; ``|R_half(c) & R(i)|`` counts the
    triples whose key ``i * N + m`` is in R (R_half(c) has no repeats, so no intersect1d de-duplication
    is needed). The comparison ``count > (2/3) * |R_half(c)|`` is the code's float expression.
    """
    r_len, h_len = np.diff(r_ptr), np.diff(h_ptr)
    if r_idx.size == 0:  # nobody is in its own list (more than k1 duplicates of every sample)
        return r_ptr, r_idx
    pair_rows = np.repeat(np.arange(n, dtype=np.int64), r_len)
    r_keys = np.sort(pair_rows * n + r_idx)
    row_triples = np.bincount(pair_rows, weights=h_len[r_idx], minlength=n).astype(np.int64)

    def block(span):
        s, e = span
        pair_i = np.repeat(np.arange(s, e, dtype=np.int64), r_len[s:e])
        pair_c = r_idx[r_ptr[s]:r_ptr[e]]
        which, pos = _spans(h_ptr[pair_c], h_len[pair_c])
        m = h_idx[pos]
        t_keys = pair_i[which] * n + m
        pos = np.minimum(np.searchsorted(r_keys, t_keys), r_keys.size - 1)
        hits = np.bincount(which[r_keys[pos] == t_keys], minlength=pair_c.size)
        accept = hits > (2 / 3) * h_len[pair_c]
        return np.unique(np.concatenate((pair_i * n + pair_c, t_keys[accept[which]])))

    # Row blocks are independent: on the caller's threads (see _common.map_threads), each as in the loop.
    out = map_threads(block, _row_blocks(row_triples + r_len, _threaded_budget()))
    keys = np.concatenate(out) if out else np.empty(0, dtype=np.int64)
    return _indptr(keys // n, n), keys % n


def _logits(X, ptr, idx, chunk_floats=1 << 22):
    """``-(2 - 2 x_i . x_j)`` in float64 for the pairs (i, idx[ptr[i]:ptr[i + 1]]), in ranges of whole rows of
    about ``chunk_floats`` gathered floats on the caller's threads; bitwise float64 einsum over the gathered
    pairs, ``np.einsum("ij,ij->i", X[rows], X[idx], dtype=np.float64)`` (tested)."""
    counts = np.diff(ptr)
    logits = np.empty(idx.size, dtype=np.float64)

    def dot_rows(span) -> None:
        # Rows with equal counts in one batched product: only the partners are gathered (x_i is broadcast),
        # half the copying of a gather of both sides, and einsum sums each product in the same order as the
        # pairwise "ij,ij->i": the softmax weights at N = 12,936 on 2 threads in 0.23 s instead of 0.53
        # (k1 = 15; k1 = 30: 0.70 s instead of 1.68).
        a, b = span
        order = np.argsort(counts[a:b], kind="stable")
        same = np.split(order, np.flatnonzero(np.diff(counts[a:b][order])) + 1)
        for group in same:
            m = int(counts[a + group[0]])
            if m == 0:
                continue
            r = a + group
            pos = ptr[r][:, None] + np.arange(m)
            dots = np.einsum("bij,bj->bi", X[idx[pos]], X[r], dtype=np.float64)
            logits[pos] = -(2.0 - 2.0 * dots)

    map_threads(dot_rows, _row_blocks(counts, max(1, chunk_floats // max(1, X.shape[1]))))
    return logits


def _softmax_weights(X, ptr, idx, chunk_floats=1 << 22):
    """Step 4 in float64: per row, softmax of ``-(2 - 2 x_i . x_j)`` over the row's columns. The logits
    (:func:`_logits`) and the softmax (in ranges of whole rows) run on torch's thread count
    (``_common.map_threads``; each piece as in a loop, so the weights are bitwise the one-thread ones)."""
    logits = _logits(X, ptr, idx, chunk_floats)
    starts = ptr[:-1][np.diff(ptr) > 0]  # reduceat over non-empty rows only (empty rows stay empty)
    if starts.size == 0:
        return logits
    counts = np.diff(np.append(starts, idx.size))
    weights = np.empty_like(logits)

    def rows_softmax(span):  # whole rows: each row's max, exp and sum as over the full array
        a, b = span
        lo, hi = starts[a], starts[a] + counts[a:b].sum()
        z = logits[lo:hi]
        ex = np.exp(z - np.repeat(np.maximum.reduceat(z, starts[a:b] - lo), counts[a:b]))
        weights[lo:hi] = ex / np.repeat(np.add.reduceat(ex, starts[a:b] - lo), counts[a:b])

    threads = resolve_threads()
    pieces = 1 if threads == 1 else 4 * threads  # row ranges of about equal pairs
    cuts = np.searchsorted(np.cumsum(counts), np.arange(1, pieces) * (idx.size / pieces), side="right")
    bounds = np.unique(np.concatenate(([0], cuts, [starts.size])))
    map_threads(rows_softmax, list(zip(bounds[:-1], bounds[1:])))
    return weights


def _jaccard(V, cut, info):
    """Step 6 over pairs ``i <= j`` that share a column of V, mirrored into a symmetric CSR matrix."""
    n = V.shape[0]
    C = V.tocsc()  # inverted index: rows holding each column, ascending
    c_keys = np.repeat(np.arange(n, dtype=np.int64), np.diff(C.indptr)) * n + C.indices
    v_rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(V.indptr))
    v_cols = V.indices.astype(np.int64)
    # Each entry (i, c) meets the rows j >= i of column c: a suffix of the column, starting at i itself.
    first = np.searchsorted(c_keys, v_cols * n + v_rows)
    length = C.indptr[v_cols + 1] - first
    del c_keys, v_cols
    info["triples"] = int(length.sum())
    per_row = np.bincount(v_rows, weights=length, minlength=n).astype(np.int64)
    has_diag = np.zeros(n, dtype=bool)
    up_count = np.zeros(n, dtype=np.int64)

    def rows(span):  # strictly upper pairs of rows s..e-1, row-major; the diagonal goes to has_diag
        s, e = span
        lo, hi = V.indptr[s], V.indptr[e]
        which, pos = _spans(first[lo:hi], length[lo:hi])
        vmin = np.minimum(V.data[lo:hi][which], C.data[pos])
        block = sp.coo_matrix((vmin, (v_rows[lo:hi][which] - s, C.indices[pos])),
                              shape=(e - s, n)).tocsr()  # sums the terms of each pair
        del which, pos, vmin
        bi = np.repeat(np.arange(s, e, dtype=np.int64), np.diff(block.indptr))
        bj = block.indices
        # t_ii is the sum of row i of V, 1 exactly: d_ii = 0 (rounding would leave +-1e-16), always kept.
        diag = bi == bj
        has_diag[bi[diag]] = True
        t = block.data
        d = (1.0 - t / (2.0 - t)).astype(np.float32)
        d[d < 0] = 0.0
        keep = ~diag if cut is None else ~diag & (d.astype(np.float64) <= cut)
        up_count[s:e] = np.bincount(bi[keep] - s, minlength=e - s)
        return bj[keep].astype(np.int32 if n < 2**31 else np.int64), d[keep]

    # Row blocks are independent: on the caller's threads (see _common.map_threads), each as in the loop.
    parts = map_threads(rows, _row_blocks(per_row, _threaded_budget()))
    up_j, up_d = [p[0] for p in parts], [p[1] for p in parts]
    del C, first, length, v_rows, parts
    upper = sp.csr_matrix((_concat(up_d, np.float32), _concat(up_j, np.int32), _indptr_from_counts(up_count)),
                          shape=(n, n))
    del up_j, up_d
    out = _mirror(upper, has_diag)
    info["stored_pairs"] = int(out.nnz)
    return out


def _concat(parts, dtype):
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _indptr_from_counts(counts):
    return np.concatenate(([0], np.cumsum(counts))).astype(np.int64)


def _mirror(upper, has_diag):
    """Row r of the result = [row r of upper.T (columns < r), 0.0 at r if has_diag[r], row r of upper].

    Assembled by position from (data, indices, indptr), never by sparse arithmetic, which would drop
    the explicit zeros; the transpose is a structural copy, and no sort of all pairs is needed.
    """
    n = upper.shape[0]
    lower = upper.T.tocsr()  # strictly lower, sorted
    lc, uc, dc = np.diff(lower.indptr), np.diff(upper.indptr), has_diag.astype(np.int64)
    indptr = _indptr_from_counts(lc + dc + uc)
    nnz = int(indptr[-1])
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=np.int32 if n < 2**31 else np.int64)
    pos = np.arange(lower.nnz, dtype=np.int64) + np.repeat(indptr[:-1] - lower.indptr[:-1], lc)
    data[pos], indices[pos] = lower.data, lower.indices
    pos = np.arange(upper.nnz, dtype=np.int64) + np.repeat(indptr[:-1] + lc + dc - upper.indptr[:-1], uc)
    data[pos], indices[pos] = upper.data, upper.indices
    del pos
    rows = np.flatnonzero(has_diag)
    data[indptr[rows] + lc[rows]], indices[indptr[rows] + lc[rows]] = 0.0, rows
    out = sp.csr_matrix((data, indices, indptr), shape=(n, n))
    out.has_sorted_indices = True
    return out


def _check_distances(distances):
    if not sp.issparse(distances):
        raise TypeError(f"distances must be a scipy.sparse matrix (N x N, absent entries = distance 1.0), "
                        f"got {type(distances).__name__}")
    if distances.ndim != 2 or distances.shape[0] != distances.shape[1]:
        raise ValueError(f"distances must be square (N x N), got shape {distances.shape}")
    D = sp.csr_matrix(distances)  # keeps explicit zeros; a view of a csr_matrix's arrays
    try:
        D.check_format(full_check=True)
    except ValueError as exc:
        raise ValueError(f"distances is not a consistent CSR matrix: {exc}") from None
    if not np.issubdtype(D.dtype, np.floating):
        raise ValueError(f"distances must hold floating-point values, got dtype {D.dtype}")
    if not D.has_canonical_format:
        D = D.copy()
        D.sum_duplicates()
    if D.nnz and not np.isfinite(D.data).all():
        raise ValueError("distances contains NaN or infinite values")
    if D.nnz and D.data.min() < 0:
        raise ValueError(f"distances must be >= 0, got a minimum of {D.data.min()}")
    return D
