"""Dispersion-based clustering (DBC) label update.

Ding, Khan, Tang, "Dispersion based Clustering for Unsupervised Person Re-identification", BMVC 2019
(extended as arXiv:1906.01308). With squared Euclidean distances the paper's dispersions are

* inter-dispersion  d_AB = mean over a in A, b in B of |a - b|^2   (average linkage)
* intra-dispersion  d_A  = mean over all ORDERED pairs (a, a') of A, self pairs included, of |a - a'|^2

and two clusters are ranked by ``d_AB + intra_weight * (d_A + d_B)``. Both have a closed form in each
cluster's mean ``mu`` and mean squared norm ``q = mean |a|^2``::

    d_AB = q_A + q_B - 2 mu_A . mu_B          d_A = 2 q_A - 2 |mu_A|^2

so the score is ``h_A + h_B - 2 mu_A . mu_B`` with ``h = (1 + 2 intra_weight) q - 2 intra_weight |mu|^2``:
only C x C products of cluster means are ever needed, and they are formed block by block, the means of a
block from its clusters' rows.
For unit features (what the trainer passes) this is DESIGN.md's ``2 - 2 mu_A . mu_B`` and ``2 - 2 |mu_A|^2``;
the general form keeps the function exact for any features.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np
import torch

from ._common import (UnionFind, as_torch_features, check_labels, matmul_t, relabel_by_first_index, resolve_device,
                      shared_tensor)

UPDATE_MODES = ("stage", "merge")

# Bytes of one block of scores held at once; bounds peak memory independently of the cluster count.
_BLOCK_BYTES = 256 * 2**20
# Candidate partners first fetched per cluster in stage mode; clusters that turn out to need more get 4x more.
_INITIAL_CANDIDATES = 16
# Below this many clusters the symmetric in-process search is faster than any fan-out.
_MAP_MIN_CLUSTERS = 2048
# Side of the square blocks of the symmetric search: blocks on and above the diagonal are computed, so the
# narrower, the closer to half the products (2,048 at C = 12,936: 58%; 8,192: 77%), at more top-k merges.
_SYMMETRIC_WIDTH = 2048
# Bytes of the means of one band of row blocks in the symmetric search (each column block's means are
# formed once per band: 4 bands' worth at C = 12,936, d = 2048, instead of once per row block).
_BAND_BYTES = 64 * 2**20
# Bytes of one chunk of exact scores: the float64 means of its pairs' clusters, the gathered pairs and products.
_EXACT_BYTES = 64 * 2**20
# Bytes of one row chunk of the float64 passes over the samples (the chunk, its squares, the gathered rows).
_CHUNK_BYTES = 32 * 2**20


def dispersion_merge(features, labels, num_merges, intra_weight, update="stage", device=None,
                     map_blocks=None, stats=None) -> np.ndarray:
    """Merge ``num_merges`` cluster pairs by dispersion (DBC) and return new labels 0..C'-1 (int64, numpy).

    Args:
        features: (N, d) array or tensor; the trainer passes L2-normalised pooled features. float64 input is
            processed in float64; every score that decides a merge is evaluated in float64 either way.
        labels: (N,) current labels, contiguous 0..C-1 (singletons at stage 0).
        num_merges: merges to perform this call, 0 <= num_merges <= C-1 (``int(merge_percent * N0)`` in DBC).
        intra_weight: the paper's lambda >= 0 weighting the intra-dispersions (0 reproduces the public code).
        update: ``"stage"`` -- the public code: scores frozen for the call, pairs taken in ascending score
            (ties by the smaller cluster id, then the larger), a pair skipped when either cluster has already
            been *absorbed* in this call (an absorbing cluster stays live and may absorb again, or be absorbed
            later, so merges chain), the smaller id absorbs the larger; stops after ``num_merges`` merges.
            ``"merge"`` -- the paper's Algorithm 1 (eqs. 6 and 7): after every merge the dispersions of the
            merged cluster are recomputed exactly and the global minimum is taken again (ties by the smaller
            id pair). With ``intra_weight=0`` this is average linkage on squared Euclidean distances.
        device: torch device to compute on; default: the device of a tensor input, else CPU.
        map_blocks: optional executor ``map_blocks(fn, shared, items)`` (as for :func:`bottom_up_merge`): in
            stage mode on CPU with at least ``_MAP_MIN_CLUSTERS`` clusters, each round's candidate search runs
            as row blocks of the cluster means through
            it (:func:`candidate_block`), e.g. parallel Ray tasks. The candidate lists may break ties
            differently, never the merges: the search is exact for any candidate set (see _stage_merges).
        stats: optional dict, filled with ``mapped_blocks`` (blocks sent through ``map_blocks``).

    Returns:
        (N,) int64 labels, numbered in ascending order of each cluster's smallest sample index.

    Cost: stage mode holds, besides the features, O(N) integers (the rows sorted by cluster), O(C) float64
    values per cluster, candidate lists of O(C k) pairs and fixed-size blocks: the cluster means are formed
    from the member rows when a block needs them (``_Means``), never as a C x d matrix; time is one blockwise
    C x C x d product (see ``_stage_merges`` for why per-cluster top-k candidates make it exact) plus O(N d)
    per band of the search for the means. Merge mode needs O(C d) memory (its means change with every merge)
    and O(C^2 d + num_merges * C d) time (see ``_agglomerate``).
    """
    dev = resolve_device(features, device)
    x = as_torch_features(features, dev)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    lab = check_labels(labels, x.shape[0])
    num_clusters = int(lab.max()) + 1
    if update not in UPDATE_MODES:
        raise ValueError(f"update must be one of {UPDATE_MODES}, got {update!r}")
    if isinstance(num_merges, bool) or not isinstance(num_merges, numbers.Integral):
        raise ValueError(f"num_merges must be an integer, got {num_merges!r}")
    if not 0 <= num_merges <= num_clusters - 1:
        raise ValueError(f"num_merges must be in [0, C-1] = [0, {num_clusters - 1}] for C={num_clusters} "
                         f"clusters, got {num_merges}")
    if not (isinstance(intra_weight, numbers.Real) and math.isfinite(intra_weight) and intra_weight >= 0):
        raise ValueError(f"intra_weight must be a finite number >= 0, got {intra_weight!r}")

    if num_merges == 0:
        merges = []
    elif update == "stage":
        means = _StageMeans(x, lab, num_clusters, float(intra_weight))
        use = map_blocks if map_blocks is not None and x.device.type == "cpu" and num_clusters >= _MAP_MIN_CLUSTERS \
            else None
        merges = _stage_merges(means, means.h, int(num_merges), search_dtype=x.dtype, map_blocks=use, stats=stats)
    else:
        mu, q, sizes = _cluster_moments(x, lab, num_clusters)
        merges = _agglomerate(mu, q, sizes, float(intra_weight), int(num_merges))
    uf = UnionFind(num_clusters)
    for a, b in merges:
        uf.union(a, b)
    return relabel_by_first_index(uf.roots()[lab])


def _cluster_moments(x: torch.Tensor, lab: np.ndarray, num_clusters: int):
    """float64 cluster means (C, d), mean squared norms (C,) and sizes (C,), accumulated in row chunks so that
    no float64 copy of the whole feature matrix is ever made."""
    dev, (n, d) = x.device, x.shape
    idx = torch.from_numpy(lab).to(dev)
    mu = torch.zeros(num_clusters, d, dtype=torch.float64, device=dev)
    q = torch.zeros(num_clusters, dtype=torch.float64, device=dev)
    step = max(1, _CHUNK_BYTES // (8 * d))
    for s in range(0, n, step):
        xb = x[s:s + step].double()
        mu.index_add_(0, idx[s:s + step], xb)
        q.index_add_(0, idx[s:s + step], (xb * xb).sum(1))
    sizes = torch.bincount(idx, minlength=num_clusters).double()
    mu /= sizes[:, None]
    q /= sizes
    return mu, q, sizes


class _Means:
    """Cluster means formed on demand from the member rows, never held as a (C, d) matrix: the features
    ``x`` (N, d), the rows sorted by cluster (``order``, ascending index within a cluster: a stable sort of
    the labels) and each cluster's start in that order (``starts``, C + 1): O(N) integers besides ``x``.
    What a block task receives too (``candidate_block``), so a fanned-out search forms its own means.

    Every value is bitwise that of the dense float64 moments (``_cluster_moments``): a cluster's sum adds its
    rows in ascending order into 0.0 (``index_add_`` adds in index order) and is divided by the size; a
    singleton's mean is its row + 0.0 (-0.0 becomes 0.0, as in the sum from 0.0), which the features' own
    dtype holds exactly, so its search row is its float64 mean."""

    def __init__(self, x: torch.Tensor, order: np.ndarray, starts: np.ndarray):
        self.x, self.order, self.starts = x, order, starts
        self.shape, self.device = (starts.size - 1, x.shape[1]), x.device
        self._scratch = None

    def _rows(self, ids: np.ndarray):
        """Member rows of the clusters ``ids`` (cluster by cluster, each in ascending order), the position
        in ``ids`` each belongs to, and the sizes."""
        lo = self.starts[ids]
        sizes = self.starts[ids + 1] - lo
        first = np.cumsum(sizes) - sizes
        pos = np.arange(int(sizes.sum())) - np.repeat(first - lo, sizes)
        return self.order[pos], np.repeat(np.arange(ids.size), sizes), sizes

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device)

    def _buffers(self):
        """Scratch kept across calls (``_CHUNK_BYTES`` each): the gathered rows, as the features and as
        float64, and a block of float64 sums. Fresh blocks of that size fault in every page on each call: a
        block task forms every cluster's mean, and with fresh chunks an update of three-member clusters
        through a serial executor took 2.9 s against 2.1 s (N = 12,936, one thread)."""
        if self._scratch is None:
            step, d = max(1, _CHUNK_BYTES // (8 * self.shape[1])), self.shape[1]
            rows = torch.empty(step, d, dtype=self.x.dtype, device=self.device)
            rows64 = rows if self.x.dtype == torch.float64 else torch.empty(step, d, dtype=torch.float64,
                                                                             device=self.device)
            self._scratch = rows, rows64, torch.empty(step, d, dtype=torch.float64, device=self.device)
        return self._scratch

    def _means_into(self, ids: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """The float64 means of ``ids`` into ``out`` (zeros, (len(ids), d)): each cluster's rows added in
        ascending order, then divided by the size."""
        rows, dest, sizes = self._rows(ids)
        rows, dest = self._tensor(rows), self._tensor(dest)
        got, got64, _ = self._buffers()
        step = got.shape[0]
        for s in range(0, rows.numel(), step):
            m = min(step, rows.numel() - s)
            torch.index_select(self.x, 0, rows[s:s + m], out=got[:m])
            if got64 is not got:
                got64[:m].copy_(got[:m])
            out.index_add_(0, dest[s:s + m], got64[:m])
        return out.div_(self._tensor(sizes).double()[:, None])

    def means(self, ids) -> torch.Tensor:
        """float64 means of the clusters ``ids`` (len(ids), d)."""
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        return self._means_into(ids, torch.zeros(ids.size, self.shape[1], dtype=torch.float64, device=self.device))

    def search(self, ids) -> torch.Tensor:
        """The means of the clusters ``ids`` in the search dtype (the features'): the float64 means rounded,
        formed ``_CHUNK_BYTES`` of float64 means at a time."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        sizes = self.starts[ids + 1] - self.starts[ids]
        first = self.order[self.starts[ids]]
        if first.size and first[-1] - first[0] == first.size - 1 and (np.diff(first) == 1).all():
            out = self.x[first[0]:first[-1] + 1] + 0.0  # a run of rows (stage 0): one pass, no gather
        else:
            out = self.x[self._tensor(first)].add_(0.0)
        big = np.flatnonzero(sizes > 1)
        sums = self._buffers()[2]
        for s in range(0, big.size, sums.shape[0]):
            part = big[s:s + sums.shape[0]]
            out[self._tensor(part)] = self._means_into(ids[part], sums[:part.size].zero_()).to(self.x.dtype)
        return out

    def __getitem__(self, ids) -> torch.Tensor:
        return self.means(ids)


class _StageMeans(_Means):
    """A stage's means (``_Means``) with the per-cluster float64 ``sq`` = |mu|^2 and ``h`` (``_h``), bitwise
    those of the dense moments. At stage 0 (every cluster a singleton) a (C, d) float64 matrix of means
    would be twice the features, and a search-dtype copy one more matrix: neither is ever made.

    A singleton's ``|mu|^2`` is its row's squared length, the very sum its ``q`` adds into 0.0 (the mean is the
    row + 0.0, and squares do not see the sign of a zero): only the clusters of two or more rows have their
    means formed, from their rows. (Forming every mean read the rows a second time: this constructor took 0.31 s
    at stage 0 at N = 12,936, d = 2048, now 0.14 s.)"""

    def __init__(self, x: torch.Tensor, lab: np.ndarray, num_clusters: int, w: float):
        counts = np.bincount(lab, minlength=num_clusters)
        super().__init__(x, np.argsort(lab, kind="stable"), np.concatenate([[0], np.cumsum(counts)]))
        dev, (n, d) = x.device, x.shape
        idx = torch.from_numpy(lab).to(dev)
        q = torch.zeros(num_clusters, dtype=torch.float64, device=dev)
        step = max(1, _CHUNK_BYTES // (8 * d))
        for s in range(0, n, step):
            xb = x[s:s + step].double()
            q.index_add_(0, idx[s:s + step], (xb * xb).sum(1))
        self.sq = q.clone()  # the singletons' |mu|^2
        q /= torch.from_numpy(counts).to(dev).double()
        big = np.flatnonzero(counts > 1)
        for s in range(0, big.size, step):
            part = big[s:s + step]
            m = self.means(part)
            self.sq[self._tensor(part)] = (m * m).sum(1)
        self.h = (1 + 2 * w) * q - 2 * w * self.sq


def _h(mu: torch.Tensor, q: torch.Tensor, w: float) -> torch.Tensor:
    """Per-cluster constant of the score: score(A, B) = h_A + h_B - 2 mu_A . mu_B (module docstring)."""
    return (1 + 2 * w) * q - 2 * w * (mu * mu).sum(-1)


@contextlib.contextmanager
def _full_fp32_matmul():
    """TF32/bf16 matmuls would void the rounding bound used by the exactness proof: force full float32."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _stage_merges(mu: _StageMeans, h: torch.Tensor, num_merges: int, search_dtype, map_blocks=None,
                  stats=None) -> list[tuple[int, int]]:
    """The public DBC stage (frozen scores, skip pairs with an absorbed cluster) without the C x C matrix.

    Exactness. Let ``K`` be the pairs known so far: for each cluster c its ``k_c`` best partners under a fast
    *search* score (float32 for float32 input). Every known pair gets one *exact* score (float64), computed
    once, and the public procedure is simulated on K alone in exact (score, i, j) order. From the simulation:
    ``e_c`` = exact score of the pair that absorbed c, or of the ``num_merges``-th merge if that comes first
    (inf if neither happened). Every pair (c, x) outside c's list has search score >= ``b_c`` (the k-th best
    search score of c) and so exact score >= ``b_c - delta``, where ``delta`` bounds |search - exact|
    (``_search_error_bound``). Call c *safe* if its list is complete (k_c = C-1) or ``b_c - delta > e_c``.
    Claim: if every unknown pair has a safe end, the simulation equals the procedure run on all C(C-1)/2
    pairs. Induction along the true order: known pairs are decided identically because the state so far is
    identical; an unknown pair (c, x) with safe end c has score > e_c, so it comes after c was absorbed (the
    procedure skips it) or after the last merge (the procedure has stopped): it changes nothing.
    We require every cluster to be safe (sufficient) and give each unsafe cluster 4x more candidates until
    it is; a complete list is safe, so this terminates. The absorbing cluster of a merge stays live in the
    public code (only the absorbed one is skipped later), which is why ``e_c`` is per cluster.
    """
    num_clusters, d = mu.shape
    h_s = h.to(search_dtype)
    delta = _search_error_bound(d, float(mu.sq.max()), float(h.abs().max()), search_dtype)
    bound = np.full(num_clusters, np.inf)  # b_c
    complete = np.zeros(num_clusters, dtype=bool)
    keys = np.empty(0, dtype=np.int64)  # known pairs as i * C + j with i < j
    search = np.empty(0, dtype=np.float64)  # their search scores
    exact = np.empty(0, dtype=np.float64)  # their exact scores, NaN until computed
    cut = -np.inf  # every known pair with search score <= cut + delta has its exact score
    rows, k = np.arange(num_clusters), min(num_clusters - 1, _INITIAL_CANDIDATES)
    shared = (mu.x.cpu().numpy(), mu.order, mu.starts, h_s.cpu().numpy()) if map_blocks is not None else None
    while True:
        if map_blocks is not None:
            cand, vals, b = _candidates_mapped(map_blocks, shared, rows, k, stats)
        elif rows.size == num_clusters:
            cand, vals, b = _candidates_all(mu, h_s, k)
        else:
            cand, vals, b = _candidates(mu, h_s, rows, k)
        bound[rows] = b
        complete[rows] = k >= num_clusters - 1
        fresh = ~np.isin(cand, keys)  # each pair is scored at most once
        keys = np.concatenate([keys, cand[fresh]])
        search = np.concatenate([search, vals[fresh]])
        exact = np.concatenate([exact, np.full(int(fresh.sum()), np.nan)])
        merges, end, cut = _simulate_scored(mu, h, keys, search, exact, cut, delta, num_clusters, num_merges)
        unsafe = np.flatnonzero(~(complete | (bound - delta > end)))
        if unsafe.size == 0:
            return merges
        rows, k = unsafe, min(num_clusters - 1, 4 * k)


def _simulate_scored(mu, h, keys, search, exact, cut, delta, num_clusters, num_merges):
    """``_simulate_stage`` over the known pairs, computing exact scores only for the pairs that can come
    before the stop (fills ``exact`` in place; returns merges, e_c and the new cut).

    A known pair without an exact score has search score > cut + delta, so exact score > cut. If the
    simulation over the scored pairs makes its ``num_merges``-th merge at a score ``stop <= cut``, every
    unscored pair comes after it, where the procedure has stopped: the result is that of all known pairs,
    as if each had been scored. Otherwise the cut is raised (about doubling the scored pairs) and the
    simulation rerun; with every known pair scored this is ``_stage_merges``'s plain simulation.
    At a stage's merge count (10% of the clusters) about a fifth of the known pairs need an exact score.
    """
    order = None
    while True:
        need = np.flatnonzero(np.isnan(exact) & (search <= cut + delta))
        if need.size:
            exact[need] = _exact_scores(mu, h, keys[need])
        scored = ~np.isnan(exact)
        merges, end, stop = _simulate_stage(keys[scored], exact[scored], num_clusters, num_merges)
        if scored.all() or (len(merges) == num_merges and stop <= cut):
            return merges, end, cut
        if order is None:
            order = np.sort(search)
        nxt = order[min(order.size - 1, max(2 * int(scored.sum()), 2 * num_merges))]
        cut = max(nxt, stop if len(merges) == num_merges else -np.inf)


def _search_error_bound(d: int, max_sq_norm: float, max_abs_h: float, dtype) -> float:
    """Upper bound on |search score - exact score| for any pair.

    The search score is fl(h_j - 2 fl(mu_i . mu_j)) + h_i in ``dtype`` (unit roundoff u) from rounded means.
    Rounding mu costs <= 2.01 u |mu_i||mu_j| in the dot product, the dot product itself <= gamma_d |mu_i||mu_j|
    (gamma_d = d u / (1 - d u), Cauchy-Schwarz on sum |a_k b_k|), and the three additions with the rounded h
    <= 5 u max|h| + 4.1 u max|mu|^2. The float64 exact score adds its own gamma_d(2^-53) term. A 1.5 factor
    keeps the bound safely conservative; it only decides how many candidates are fetched, never the result.
    """
    u = torch.finfo(dtype).eps / 2
    gamma = d * u / (1 - d * u)
    gamma64 = d * 2.0**-53 / (1 - d * 2.0**-53)
    return 1.5 * ((2 * gamma + 9 * u) * max_sq_norm + 5 * u * max_abs_h) + 2 * gamma64 * max_sq_norm


def _merge_topk(best_val: torch.Tensor, best_col: torch.Tensor, rows, block: torch.Tensor, offset: int):
    """Fold a block of scores (columns ``offset`` ...) into the running k smallest of ``rows``."""
    k = best_val.shape[1]
    val, col = torch.topk(block, min(k, block.shape[1]), dim=1, largest=False, sorted=False)
    val = torch.cat([best_val[rows], val], 1)
    col = torch.cat([best_col[rows], col + offset], 1)
    val, pick = torch.topk(val, k, dim=1, largest=False, sorted=False)
    best_val[rows], best_col[rows] = val, col.gather(1, pick)


def _search_width(src: _Means) -> int:
    """Side of the square score blocks of a search (bounded by ``_BLOCK_BYTES``)."""
    return max(1, min(_SYMMETRIC_WIDTH, math.isqrt(_BLOCK_BYTES // src.x.element_size())))


def _candidates_all(src: _Means, h_s: torch.Tensor, k: int):
    """``_candidates`` for every cluster at half the work: each B x B block of the symmetric score matrix is
    computed once (blocks I <= J) and feeds the running top-k of its rows (I) and of its columns (J).

    The means are formed a band of row blocks at a time (``_BAND_BYTES``) and each column block once per
    band; a block's lists receive their merges in the order of a plain walk over I, then J (every merge into
    block X as columns, from I < X, comes before those as rows), so the lists do not depend on the band."""
    num_clusters, d = src.shape
    dev, dtype = src.device, src.x.dtype
    width = _search_width(src)
    band = width * max(1, _BAND_BYTES // (src.x.element_size() * width * d))
    best_val = torch.full((num_clusters, k), torch.inf, dtype=dtype, device=dev)
    best_col = torch.zeros((num_clusters, k), dtype=torch.long, device=dev)
    with _full_fp32_matmul():
        for b0 in range(0, num_clusters, band):
            b1 = min(num_clusters, b0 + band)
            mine = src.search(np.arange(b0, b1))
            for j0 in range(b0, num_clusters, width):
                cols = slice(j0, j0 + width)
                m_j = mine[j0 - b0:j0 - b0 + width] if j0 < b1 else \
                    src.search(np.arange(j0, min(num_clusters, j0 + width)))
                for i0 in range(b0, min(b1, j0 + 1), width):
                    rows = slice(i0, i0 + width)
                    # (h_j - 2 mu_i . mu_j) + h_i, the rounding _search_error_bound covers; the product by NumPy's BLAS
                    block = matmul_t(mine[i0 - b0:i0 - b0 + width], m_j).mul_(-2).add_(h_s[None, cols]) \
                        .add_(h_s[rows, None])
                    if j0 == i0:
                        block.fill_diagonal_(torch.inf)
                    _merge_topk(best_val, best_col, rows, block, j0)
                    if j0 != i0:
                        _merge_topk(best_val, best_col, cols, block.T, i0)
    i = torch.arange(num_clusters, device=dev)[:, None].expand_as(best_col)
    keys = (torch.minimum(i, best_col) * num_clusters + torch.maximum(i, best_col)).reshape(-1)
    keys, vals = _unique_pairs(keys.cpu().numpy(), best_val.reshape(-1).double().cpu().numpy())
    return keys, vals, best_val.max(1).values.double().cpu().numpy()


def _unique_pairs(keys: np.ndarray, vals: np.ndarray):
    """Each pair key once, with the smallest of its search scores (a pair found from both of its ends was
    scored twice; either is within the search error bound of the exact score)."""
    order = np.lexsort((vals, keys))
    keys, vals = keys[order], vals[order]
    first = np.ones(keys.size, dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return keys[first], vals[first]


def _row_width(src: _Means) -> int:
    """Columns of one block of a row-wise search: wider than the symmetric search's square blocks, since
    each block feeds a top-k of its own (measured here, one thread: 3.3 ns per score on rows of 2,048,
    2.3 ns on rows of 8,192 or more)."""
    return 4 * _search_width(src)


def _rows_per_chunk(src: _Means, k: int) -> int:
    """Rows of a row-wise search held at once: their means, a block of scores and the running top-k
    (``_BLOCK_BYTES`` in all)."""
    return max(1, _BLOCK_BYTES // (src.x.element_size() * (_row_width(src) + src.shape[1]) + 40 * k))


def _candidates(src: _Means, h_s: torch.Tensor, rows: np.ndarray, k: int):
    """The k best partners (by search score) of each cluster in ``rows``: pair keys i*C+j (i < j), unique,
    their search scores, and b_c. Row-wise: each chunk of rows against every column block, the top-k kept
    running (the means of every cluster formed once per chunk)."""
    num_clusters = src.shape[0]
    dev = src.device
    width, step = _row_width(src), _rows_per_chunk(src, k)
    keys, vals, bounds = [], [], []
    with _full_fp32_matmul():
        for s in range(0, rows.size, step):
            ids = rows[s:s + step]
            blk = torch.from_numpy(ids).to(dev)
            mine = src.search(ids)
            best_val = torch.full((ids.size, k), torch.inf, dtype=mine.dtype, device=dev)
            best_col = torch.zeros((ids.size, k), dtype=torch.long, device=dev)
            every = slice(None)
            for j0 in range(0, num_clusters, width):
                j1 = min(num_clusters, j0 + width)
                # h_j - 2 mu_i . mu_j; h_i is constant per row and added afterwards (in float64: a smaller error)
                scores = matmul_t(mine, src.search(np.arange(j0, j1))).mul_(-2).add_(h_s[None, j0:j1])
                own = np.flatnonzero((ids >= j0) & (ids < j1))
                scores[torch.from_numpy(own).to(dev), torch.from_numpy(ids[own] - j0).to(dev)] = torch.inf
                _merge_topk(best_val, best_col, every, scores, j0)
            val = best_val.double() + h_s[blk].double()[:, None]
            bounds.append(val.max(1).values.cpu().numpy())
            vals.append(val.reshape(-1).cpu().numpy())
            i, j = blk[:, None].expand_as(best_col), best_col
            keys.append((torch.minimum(i, j) * num_clusters + torch.maximum(i, j)).reshape(-1).cpu().numpy())
    return (*_unique_pairs(np.concatenate(keys), np.concatenate(vals)), np.concatenate(bounds))


def candidate_block(shared, job):
    """One row block of a stage's candidate search, ``shared = (features, order, starts, h)`` (numpy, the
    features read zero-copy; ``_Means``), ``job = (rows, k)``: the unit of work a ``map_blocks`` executor
    runs, as ``_candidates`` returns it. The task forms the cluster means it needs from the features."""
    x, order, starts, h = shared
    rows, k = job
    return _candidates(_Means(shared_tensor(x), order, starts), shared_tensor(h), rows, k)


def _candidates_mapped(map_blocks, shared, rows: np.ndarray, k: int, stats=None):
    """``_candidates`` over ``rows`` as blocks through ``map_blocks`` (row-wise: twice the products of the
    symmetric in-process search, spread over the executor's workers; one chunk of rows per task, so each
    task forms every cluster's mean once)."""
    src = _Means(shared_tensor(shared[0]), shared[1], shared[2])
    per_block = max(1, min(_rows_per_chunk(src, k), -(-rows.size // 8)))
    jobs = [(rows[s:s + per_block], k) for s in range(0, rows.size, per_block)]
    out = map_blocks(candidate_block, shared, jobs)
    if stats is not None:
        stats["mapped_blocks"] = stats.get("mapped_blocks", 0) + len(jobs)
    keys, vals = _unique_pairs(np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out]))
    return keys, vals, np.concatenate([o[2] for o in out])


def _exact_scores(mu: _Means, h: torch.Tensor, keys: np.ndarray) -> np.ndarray:
    """float64 score h_i + h_j - 2 mu_i . mu_j of each pair key, in chunks of pairs (the chunk's clusters'
    means formed from their rows; no C x C, no C x d)."""
    num_clusters, d = mu.shape
    out = np.empty(keys.size, dtype=np.float64)
    step = max(1, _EXACT_BYTES // (5 * 8 * d))  # up to 2 means per pair, the two gathered rows and their product
    for s in range(0, keys.size, step):
        kk = keys[s:s + step]
        ids, inv = np.unique(np.concatenate([kk // num_clusters, kk % num_clusters]), return_inverse=True)
        m = mu.means(ids)
        inv = torch.from_numpy(inv).to(mu.device)
        i, j = torch.from_numpy(ids).to(mu.device)[inv].split(kk.size)
        mi, mj = m[inv[:kk.size]], m[inv[kk.size:]]
        out[s:s + step] = (h[i] + h[j] - 2 * (mi * mj).sum(1)).cpu().numpy()
    return out


def _simulate_stage(keys: np.ndarray, scores: np.ndarray, num_clusters: int, num_merges: int):
    """Run the public procedure over the given pairs; return the merges (absorber, absorbed), e_c and the
    score of the ``num_merges``-th merge (inf if the pairs ran out first)."""
    order = np.lexsort((keys, scores))  # ascending score, ties by (i, j) since key = i * C + j
    absorbed = [False] * num_clusters
    end = np.full(num_clusters, np.inf)
    merges, stop = [], np.inf
    for key, s in zip(keys[order].tolist(), scores[order].tolist()):
        i, j = divmod(key, num_clusters)
        if absorbed[i] or absorbed[j]:
            continue
        absorbed[j] = True  # i < j: the smaller id absorbs
        end[j] = s
        merges.append((i, j))
        if len(merges) == num_merges:
            stop = s
            break
    return merges, np.minimum(end, stop), stop


def _agglomerate(mu: torch.Tensor, q: torch.Tensor, sizes: torch.Tensor, w: float,
                 num_merges: int) -> list[tuple[int, int]]:
    """The paper's Algorithm 1: merge the globally closest pair, update its dispersions (eqs. 6-7), repeat.

    No proximity matrix is stored: each live cluster i caches the minimum of its scores against live j > i
    (``row_min``/``row_arg``, first index on ties), so the global minimum in (score, i, j) order is the first
    row attaining min(row_min). After merging B into A (A < B) the merged moments are exact
    (mu_A <- (n_A mu_A + n_B mu_B) / n, likewise q); a row i < A can only improve through its new entry for A
    unless its cached partner was A or B, so only those *stale* rows and A itself are rescanned, all in one
    product with the means (one pass over them per merge). Memory O(C d); time O(C^2 d) for the first scan
    plus O(C d (1 + stale rows)) per merge. Scores are float64 throughout.
    """
    num_clusters = mu.shape[0]
    dev = mu.device
    h = _h(mu, q, w)
    live = torch.ones(num_clusters, dtype=torch.bool, device=dev)
    ids = torch.arange(num_clusters, device=dev)
    step = max(1, _BLOCK_BYTES // (8 * num_clusters))

    def scan(rows: torch.Tensor):
        """Scores of ``rows`` against every live cluster (row blocks), their min over live j > i, and the
        full score row of ``rows[0]``."""
        mins, args, first = [], [], None
        for s in range(0, rows.numel(), step):
            r = rows[s:s + step]
            # a few rows: matrix-vector products (BLAS packs the whole matrix for a skinny GEMM, ~3x slower)
            dots = torch.stack([mu @ mu[i] for i in r]) if r.numel() <= 4 else mu[r] @ mu.T
            sc = dots.mul_(-2).add_(h[None, :]).add_(h[r, None])
            sc.masked_fill_(~live[None, :] | (ids[None, :] == r[:, None]), torch.inf)
            if first is None:
                first = sc[0].clone()
            val, arg = sc.masked_fill_(ids[None, :] <= r[:, None], torch.inf).min(dim=1)
            mins.append(val)
            args.append(arg)
        return torch.cat(mins), torch.cat(args), first

    row_min, row_arg, _ = scan(ids)
    merges = []
    for _ in range(num_merges):
        a = int(torch.argmin(row_min))
        b = int(row_arg[a])
        merges.append((a, b))
        n = sizes[a] + sizes[b]
        mu[a] = (sizes[a] * mu[a] + sizes[b] * mu[b]) / n
        q[a] = (sizes[a] * q[a] + sizes[b] * q[b]) / n
        sizes[a] = n
        h[a] = (1 + 2 * w) * q[a] - 2 * w * (mu[a] * mu[a]).sum()
        live[b] = False
        row_min[b] = torch.inf
        stale = live & (ids != a) & ((row_arg == a) | (row_arg == b))
        rows = torch.cat([ids[a:a + 1], stale.nonzero().reshape(-1)])
        new_min, new_arg, col = scan(rows)  # col: score of every cluster with the merged a
        better = live & (ids < a) & ~stale & ((col < row_min) | ((col == row_min) & (row_arg > a)))
        row_min = torch.where(better, col, row_min)
        row_arg = torch.where(better, a, row_arg)
        row_min[rows], row_arg[rows] = new_min, new_arg
    return merges
