"""BUC label update: merge the closest cluster pairs by minimum sample distance plus a size penalty.

Lin et al., *A Bottom-Up Clustering Approach to Unsupervised Person Re-ID*, AAAI 2019: the
dissimilarity of clusters A and B is the paper's *minimum distance criterion* (the smallest distance
over their sample pairs) plus its *diversity regularization* ``lambda * (|A| + |B|)``, i.e.
``D(A, B) + lambda R(A, B)``. As in the authors' public code
(``Bottom_up.get_new_train_data``), the penalty is applied per *sample pair* and all pairs are
processed in one sorted pass, so one call = one stage. The camera-style variant (Lin et al., TIP 2020)
ignores fake-fake pairs.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._common import as_numpy_features, check_labels, nonfinite_rows, relabel_by_first_index
from .topk import ExactKnn, knn_search_block, sqdist_error_bound

METRICS = ("sqeuclidean", "euclidean")
_BACKENDS = ("auto", "faiss", "torch")


def bottom_up_merge(features, labels, num_merges, size_penalty, is_fake=None, metric="sqeuclidean",
                    device=None, block_size=4096, *, backend="auto", k_init=32, num_threads=None,
                    stats=None, map_blocks=None) -> np.ndarray:
    """One BUC stage: merge clusters ``num_merges`` times, return new labels ``0..C'-1`` (int64).

    Score of a sample pair ``i < j`` in different clusters (the paper's ``D(A, B) + lambda R(A, B)``,
    with the minimum over sample pairs taken implicitly by the ascending pass)::

        score_ij = d(x_i, x_j) + size_penalty * (|A_i| + |B_j|)

    with ``d`` the squared Euclidean distance (``metric="sqeuclidean"``, the public code; on unit
    features ``2 - 2 cos``) or the Euclidean distance (``"euclidean"``, the paper), computed in
    float64 from the float32 features, which are used as given (the caller L2-normalises them).
    Cluster sizes are frozen at the start of the call. Pairs are taken in ascending ``score`` with
    ties broken by ``i * N + j``; a pair whose clusters are already joined is a no-op, merges chain,
    the smaller label absorbs the larger, and the pass stops after exactly ``num_merges`` successful
    unions. The result is relabelled ``0..C'-1`` in ascending order of each cluster's smallest sample
    index. With ``is_fake`` (bool per sample) pairs of two fake samples are ignored.

    **Exactness without an N x N matrix.** The pass is Kruskal's algorithm on the cluster graph, so
    it only ever looks at the pairs up to the ``num_merges``-th union ``e*``: running it on any
    subset of pairs that contains every pair ordered before ``e*`` gives the same unions. We build
    such a subset from exact k-nearest-neighbour lists (``topk.ExactKnn``; faiss or torch, blockwise,
    O(N k) memory) over the database of *real* samples (all samples when ``is_fake`` is None; every
    allowed pair has a real endpoint). Same-cluster neighbours and the sample itself are dropped from
    the candidates but still count among the k. Let ``r_i`` be row ``i``'s k-th float32 distance minus
    the rigorous float32 rounding bound (``topk.sqdist_error_bound``), or ``+inf`` if the list holds
    the whole database. A pair ``(i, j)`` missing from row ``i``'s list with ``j`` in the database has
    ``d_ij >= r_i``, hence ``score_ij >= t_i := r_i + size_penalty * (|A_i| + s_min)`` (``s_min`` the
    smallest cluster size). Run the pass on the candidates; if it reaches ``num_merges`` unions at
    score ``s*``, let ``B = {i : t_i <= s*}``. A missing real-real pair has both endpoints' lists as
    witnesses and a missing fake-real pair has the fake's, so if ``B`` holds no fake and at most one
    real sample, every missing pair scores strictly above ``s*`` and the candidate pass is the exact
    pass. Otherwise the k of the offending rows is doubled and the pass redone (adding pairs can only
    lower ``s*``, so ``B`` shrinks); if the candidates run out of unions, every incomplete row grows.
    Rows eventually hold the whole database (``t_i = inf``), so the loop ends. Each row starts with
    ``k_init`` plus (up to ``4 k_init``) the number of database members of its own cluster, which would
    otherwise crowd out useful neighbours in later stages. Float64 distances are computed only for
    the few candidates that can reach the cut (see ``_exact_pass``). Memory is O(N k) plus one
    ``block_size x N_db`` distance block; nothing N x N is ever formed.

    Args:
        features: (N, d) numpy array or torch tensor (a CUDA tensor selects the torch backend).
        labels: (N,) integers ``0..C-1`` with every value used.
        num_merges: number of cluster unions ``m = int(merge_percent * N0)``; ``0 <= m <= C-1``.
        size_penalty: the diversity weight lambda (paper 0.005, public code 0.003), ``>= 0``.
        is_fake: optional (N,) bool; pairs of two fake samples are ignored (camera-style BUC).
        metric: ``"sqeuclidean"`` (public code) or ``"euclidean"`` (paper).
        device: torch device for the torch backend (``None``: the tensor's own, else CPU).
        block_size: queries per k-NN block (bounds the block x database distance buffer).
        backend: ``"faiss"`` (CPU), ``"torch"`` (CPU or CUDA) or ``"auto"`` (torch for CUDA, else faiss).
        k_init: neighbours per sample in the first round (grown per row as needed).
        num_threads: faiss OpenMP threads during the search (None: faiss' default).
        map_blocks: optional executor ``map_blocks(fn, shared, items)`` returning ``[fn(shared, item)
            for item in items]`` in order (see ``topk.knn_search_block``); with the faiss backend and
            more than one block per round, the k-NN blocks of a round go through it (the feature-store
            actor passes parallel Ray tasks). The labels do not depend on it.
        stats: optional dict, filled with ``rounds``, ``k_max``, ``num_candidates``, ``grown_rows``
            (rows re-searched per round), ``backend``, ``last_merge_score`` and ``mapped_blocks`` (k-NN
            blocks sent through ``map_blocks``).

    Returns:
        (N,) int64 labels ``0..C'-1`` with ``C' = C - num_merges``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if isinstance(num_merges, bool) or not isinstance(num_merges, numbers.Integral):
        raise ValueError(f"num_merges must be an integer, got {num_merges!r}")
    num_merges = int(num_merges)
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    size_penalty = float(size_penalty)
    if not np.isfinite(size_penalty) or size_penalty < 0:
        raise ValueError(f"size_penalty must be a finite number >= 0, got {size_penalty}")
    if int(k_init) < 1:
        raise ValueError(f"k_init must be >= 1, got {k_init}")

    X, backend, device = _prepare_features(features, backend, device)
    n, dim = int(X.shape[0]), int(X.shape[1])
    lab = check_labels(labels, n)
    n_clusters = int(lab.max()) + 1
    fake = _check_is_fake(is_fake, n)
    n_real = n - int(fake.sum())
    max_merges = n_clusters - 1 if n_real > 0 else 0
    if num_merges > max_merges:
        why = "all samples are fake and fake-fake pairs are ignored" if n_real == 0 else \
            f"there are only {n_clusters} clusters"
        raise ValueError(f"num_merges={num_merges} is more than the {max_merges} possible merges: {why}")
    info = {"rounds": 0, "k_max": 0, "num_candidates": 0, "grown_rows": [], "backend": backend,
            "last_merge_score": None, "mapped_blocks": 0}
    if stats is not None:
        stats.clear()
        stats.update(info)
        info = stats
    if num_merges == 0:
        return relabel_by_first_index(lab)

    sizes = np.bincount(lab, minlength=n_clusters)
    row_size = sizes[lab].astype(np.float64)
    s_min = float(sizes.min())
    db_ids = np.flatnonzero(~fake) if n_real < n else None  # only real samples are searched
    database = _take(X, db_ids) if db_ids is not None else X
    knn = ExactKnn(database, backend=backend, device=device, block_size=block_size, num_threads=num_threads)
    n_db = knn.n
    norms = _row_norms(X)
    slack = sqdist_error_bound(dim, norms, norms[db_ids].max() if db_ids is not None else norms.max(),
                               knn.float64_matmul)

    # Same-cluster database members take list slots without giving candidates: reserve room for
    # them (capped, so one huge cluster cannot make the lists quadratic; growth covers the rest).
    own = np.bincount(lab[~fake], minlength=n_clusters)[lab]
    k_row = np.minimum(int(k_init) + np.minimum(own, 4 * int(k_init)), n_db).astype(np.int64)
    r = np.empty(n, dtype=np.float64)  # lower bound on the distance of any pair missing from row i
    keys = np.empty(0, dtype=np.int64)  # candidate pairs as i * N + j, i < j
    d32 = np.empty(0, dtype=np.float64)  # their float32 squared distances from the k-NN search
    todo = np.arange(n)
    while True:
        info["rounds"] += 1
        info["grown_rows"].append(int(todo.size))
        info["k_max"] = max(info["k_max"], int(k_row[todo].max()))
        found_keys, found_d = [keys], [d32]
        todo = todo[np.argsort(k_row[todo], kind="stable")]  # blocks of similar k
        blocks = [todo[s:s + block_size] for s in range(0, todo.size, block_size)]
        # One search per block at the block's largest k; each row keeps its own k below.
        if map_blocks is not None and backend == "faiss" and len(blocks) > 1:
            jobs = [(_take(X, rows), int(k_row[rows].max())) for rows in blocks]
            searched = map_blocks(knn_search_block, database, jobs)
            info["mapped_blocks"] += len(jobs)
        else:  # lazily: one block's queries and distances in memory at a time
            searched = (knn.search(_take(X, rows), int(k_row[rows].max())) for rows in blocks)
        for rows, (dk, nbr) in zip(blocks, searched):
            kr = k_row[rows]
            kth = dk[np.arange(rows.size), kr - 1].astype(np.float64)
            r[rows] = np.where(kr < n_db, kth - slack[rows], np.inf)
            keep = np.arange(dk.shape[1]) < kr[:, None]
            ri, cj, dk = np.broadcast_to(rows[:, None], keep.shape)[keep], nbr[keep], dk[keep]
            cj = db_ids[cj] if db_ids is not None else cj
            ok = lab[ri] != lab[cj]  # drops i itself and same-cluster pairs (no-ops in the pass)
            ri, cj = ri[ok], cj[ok]
            found_keys.append(np.minimum(ri, cj) * n + np.maximum(ri, cj))
            found_d.append(dk[ok].astype(np.float64))
        keys, first = np.unique(np.concatenate(found_keys), return_index=True)
        d32 = np.concatenate(found_d)[first]
        info["num_candidates"] = int(keys.size)
        parent, last, s_star = _exact_pass(X, keys, d32, lab, sizes, norms, size_penalty, metric,
                                          num_merges, knn.float64_matmul)

        incomplete = k_row < n_db
        if last is None:  # candidates ran out of unions: every incomplete row needs more neighbours
            if not incomplete.any():  # unreachable given the num_merges check above
                raise RuntimeError("candidate graph exhausted although every pair was searched")
            todo = np.flatnonzero(incomplete)
        else:
            info["last_merge_score"] = s_star
            r_metric = np.sqrt(np.maximum(r, 0.0)) if metric == "euclidean" else r
            low = r_metric + size_penalty * (row_size + s_min) <= s_star  # the set B of the docstring
            low_real = low & ~fake
            grow = (low & fake) | (low_real if low_real.sum() >= 2 else False)
            if not grow.any():
                break
            todo = np.flatnonzero(grow)
        k_row[todo] = np.minimum(2 * k_row[todo], n_db)

    roots = np.array([_find(parent, c) for c in range(n_clusters)], dtype=np.int64)
    return relabel_by_first_index(roots[lab])


def _find(parent: list, a: int) -> int:
    while parent[a] != a:
        parent[a] = parent[parent[a]]  # path halving keeps the chains of min-label unions short
        a = parent[a]
    return a


def _exact_pass(X, keys, d32, lab, sizes, norms, size_penalty, metric, num_merges, float64_matmul):
    """The BUC pass over candidate pairs in exact (float64 score, i*N+j) order.

    Computing float64 distances for all ~N k candidates would cost as much as the search, so we
    first run the pass in float32 order. Its first ``num_merges`` unions form a forest whose float64
    scores are <= ``s32 + E`` (``s32`` its last float32 score, ``E`` the largest rounding bound), and
    the exact pass is greedy on a matroid, so its ``num_merges``-th union scores at most the largest
    score of any such forest: every pair it touches has float32 score <= ``s32 + 2E``. Only those
    pairs get float64 distances. Returns (parent, position of the last union or None, its score).
    """
    n = lab.size
    i, j = keys // n, keys % n
    ci, cj = lab[i], lab[j]
    penalty = size_penalty * (sizes[ci] + sizes[cj])
    err = sqdist_error_bound(X.shape[1], norms[i], norms[j], float64_matmul)
    if metric == "euclidean":  # |sqrt(a) - sqrt(b)| <= sqrt(|a - b|)
        score32, err = np.sqrt(d32) + penalty, np.sqrt(err)
    else:
        score32 = d32 + penalty
    _, last = _merge_in_order(ci, cj, np.argsort(score32, kind="stable"), lab.max() + 1, num_merges)
    if last is None:
        return None, None, None
    sub = np.flatnonzero(score32 <= score32[last] + 2.0 * err.max())
    dist = _pair_sqdist64(X, i[sub], j[sub])
    score = (np.sqrt(dist) if metric == "euclidean" else dist) + penalty[sub]
    order = sub[np.lexsort((keys[sub], score))]
    parent, last = _merge_in_order(ci, cj, order, lab.max() + 1, num_merges)
    if last is None:  # impossible by the argument above; guard against a wrong error bound
        raise RuntimeError("float32 pre-selection lost a merge; the rounding bound is too small")
    return parent, last, float(score[np.searchsorted(sub, last)])


def _merge_in_order(ci, cj, order, n_clusters: int, num_merges: int, chunk: int = 1 << 15):
    """Union-find pass over candidate pairs in ``order``; stop at the ``num_merges``-th union.

    Returns the parent list (smaller cluster id is the root) and the position in ``ci``/``cj`` of the
    last union, or None if the candidates ran out first. Plain Python lists: per-element numpy
    indexing is ~10x slower, and the pass stops early, so only a short prefix is converted.
    """
    parent = list(range(n_clusters))
    unions = 0
    for s in range(0, order.size, chunk):
        sel = order[s:s + chunk]
        for pos, a, b in zip(sel.tolist(), ci[sel].tolist(), cj[sel].tolist()):
            a, b = _find(parent, a), _find(parent, b)
            if a == b:
                continue
            if a < b:
                parent[b] = a
            else:
                parent[a] = b
            unions += 1
            if unions == num_merges:
                return parent, pos
    return parent, None


def _prepare_features(features, backend, device):
    """Validate features: numpy float32 for faiss, a float32 tensor on ``device`` for torch."""
    import torch

    is_tensor = isinstance(features, torch.Tensor)
    dev = torch.device(device) if device is not None else (features.device if is_tensor else None)
    on_cuda = dev is not None and dev.type == "cuda"
    if backend == "auto":
        backend = "torch" if on_cuda else "faiss"
    if backend == "faiss":
        if on_cuda:
            raise ValueError(f"backend='faiss' runs on CPU; use backend='torch' for device={dev}")
        return as_numpy_features(features), backend, None
    dev = dev or torch.device("cpu")
    x = torch.as_tensor(features).to(dev)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty 2-D array (N, d); got shape {tuple(x.shape)}")
    if nonfinite_rows(x):
        raise ValueError("features contains NaN or infinite values")
    return x.float().contiguous(), backend, dev


def _check_is_fake(is_fake, n: int) -> np.ndarray:
    if is_fake is None:
        return np.zeros(n, dtype=bool)
    f = np.asarray(is_fake.cpu() if hasattr(is_fake, "cpu") else is_fake)
    if f.ndim != 1 or f.shape[0] != n:
        raise ValueError(f"is_fake must have shape ({n},) like the features, got {f.shape}")
    if f.dtype != bool:
        if not np.issubdtype(f.dtype, np.integer) or not np.isin(f, (0, 1)).all():
            raise ValueError(f"is_fake must be boolean (or 0/1), got dtype {f.dtype}")
        f = f.astype(bool)
    return f


def _take(X, rows):
    if isinstance(X, np.ndarray):
        return X[rows]
    import torch

    return X[torch.as_tensor(rows, device=X.device)]


def _row_norms(X) -> np.ndarray:
    if isinstance(X, np.ndarray):
        return np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
    return X.double().norm(dim=1).cpu().numpy()


def _pair_sqdist64(X, i, j, budget: int = 1 << 23) -> np.ndarray:
    """Exact-order float64 ``|x_i - x_j|^2`` for candidate pairs, in chunks of ~``budget`` values.

    The difference form is symmetric and gives exactly 0 for duplicate points, so exact ties
    between pairs stay exact ties and the ``i * N + j`` rule decides them.
    """
    out = np.empty(i.size, dtype=np.float64)
    step = max(1, budget // max(1, X.shape[1]))
    for s in range(0, i.size, step):
        if isinstance(X, np.ndarray):
            diff = X[i[s:s + step]].astype(np.float64)
            diff -= X[j[s:s + step]]
            out[s:s + step] = np.einsum("ij,ij->i", diff, diff)
        else:
            a, b = _take(X, i[s:s + step]).double(), _take(X, j[s:s + step]).double()
            out[s:s + step] = ((a - b) ** 2).sum(1).cpu().numpy()
    return out
