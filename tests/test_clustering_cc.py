"""Cluster Contrast's label update (k-reciprocal Jaccard + DBSCAN) against the public code's dense procedure."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import DBSCAN

from ureid.clustering import dbscan, kreciprocal_jaccard
from ureid.clustering._common import import_faiss, openblas_core_for_cpu


def reference_jaccard(features, k1, k2):
    """``compute_jaccard_distance`` of the public code, step by step, dense N x N float32.

    faiss ``IndexFlatL2`` search of all samples at once for ``initial_rank`` (k1 columns), the
    ``:k + 1`` slices (all k1 columns for R, ``around(k1/2) + 1`` for R_half), the 2/3 expansion with
    ``intersect1d``, softmax of ``-(2 - 2 x.y)`` in float32, the query-expansion mean over
    ``initial_rank[i, :k2]`` unless ``k2 == 1``, and ``1 - t / (2 - t)`` clamped at 0.
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    n = len(x)
    index = import_faiss().IndexFlatL2(x.shape[1])
    index.add(x)
    _, initial_rank = index.search(x, k1)

    def k_reciprocal(i, k):
        forward = initial_rank[i, :k + 1]
        backward = initial_rank[forward, :k + 1]
        return forward[np.where(backward == i)[0]]

    nn_k1 = [k_reciprocal(i, k1) for i in range(n)]
    nn_half = [k_reciprocal(i, int(np.around(k1 / 2))) for i in range(n)]
    V = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        expansion = nn_k1[i]
        for c in nn_k1[i]:
            cand = nn_half[c]
            if len(np.intersect1d(cand, nn_k1[i])) > 2 / 3 * len(cand):
                expansion = np.append(expansion, cand)
        expansion = np.unique(expansion)
        if expansion.size == 0:
            continue
        logits = -(2 - 2 * (x[i:i + 1] @ x[expansion].T)).ravel()
        w = np.exp(logits - logits.max())
        V[i, expansion] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[initial_rank[i, :k2]].mean(axis=0) for i in range(n)])
    dist = np.empty((n, n), dtype=np.float32)
    for i in range(n):
        t = np.minimum(V[i][None, :], V).sum(axis=1, dtype=np.float32)
        dist[i] = 1 - t / (2 - t)
    dist[dist < 0] = 0.0
    return dist


def dense(csr):
    """The dense matrix a sparse Jaccard result stands for: absent entries are distance 1."""
    out = np.ones(csr.shape, dtype=csr.dtype)
    coo = csr.tocoo()
    out[coo.row, coo.col] = coo.data
    return out


def stored(csr):
    coo = csr.tocoo()
    return set(zip(coo.row.tolist(), coo.col.tolist()))


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_features(n, d=32, seed=0):
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def clustered_features(n, d=32, per_identity=8, noise=0.6, seed=0):
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((max(1, n // per_identity), d)))
    ident = rng.integers(0, len(centres), n)
    return unit(centres[ident] + noise / np.sqrt(d) * rng.standard_normal((n, d)))


CASES = [  # (features, k1, k2)
    ("random", 120, 30, 6), ("random", 200, 20, 1), ("random", 90, 7, 3), ("random", 40, 1, 1),
    ("clustered", 160, 30, 6), ("clustered", 240, 20, 6), ("clustered", 150, 11, 1), ("clustered", 80, 5, 5),
    ("random", 500, 10, 1), ("clustered", 600, 15, 6),  # large enough for a sparse support
    ("duplicates", 150, 10, 1), ("duplicates", 150, 20, 6),
]


def make(kind, n, seed=0):
    if kind == "duplicates":  # exact copies: ties in the k-NN lists, a sample not always first in its own
        x = clustered_features(n - n // 3, seed=seed)
        return np.concatenate((x, x[np.random.default_rng(seed).integers(0, len(x), n // 3)]))
    return random_features(n, seed=seed) if kind == "random" else clustered_features(n, seed=seed)


_REF = {}


def case(kind, n, k1, k2):
    key = (kind, n, k1, k2)
    if key not in _REF:
        x = make(kind, n)
        _REF[key] = x, reference_jaccard(x, k1, k2)
    return _REF[key]


@pytest.mark.parametrize("kind,n,k1,k2", CASES)
def test_jaccard_matches_dense_reference(kind, n, k1, k2):
    x, ref = case(kind, n, k1, k2)
    stats = {}
    D = kreciprocal_jaccard(x, k1=k1, k2=k2, stats=stats)
    assert isinstance(D, sp.csr_matrix) and D.dtype == np.float32 and D.shape == (n, n)
    assert D.has_canonical_format
    np.testing.assert_allclose(dense(D), ref, rtol=0, atol=1e-5)
    # The support is exactly the pairs of distance < 1 (those sharing a column of V).
    assert stored(D) == set(zip(*map(np.ndarray.tolist, np.nonzero(ref < 1))))
    if n >= 500:  # there the support is sparse, so the check above is about which pairs are left out
        assert (ref < 1).mean() < 0.5
    # Exactly symmetric, and the self distances are stored even though they are 0.
    assert (D != D.T).nnz == 0
    diag_stored = np.array([i in set(D.indices[D.indptr[i]:D.indptr[i + 1]].tolist()) for i in range(n)])
    assert diag_stored.all()
    assert (D.data == 0).sum() >= n
    assert stats["stored_pairs"] == D.nnz and stats["knn_blocks"] == 1


@pytest.mark.parametrize("kind,n,k1,k2", [c for c in CASES if c[2] > 1])
@pytest.mark.parametrize("max_distance", [0.3, 0.6, 0.85])
def test_max_distance_keeps_exactly_the_close_pairs(kind, n, k1, k2, max_distance):
    x, ref = case(kind, n, k1, k2)
    full = kreciprocal_jaccard(x, k1=k1, k2=k2)
    cut = kreciprocal_jaccard(x, k1=k1, k2=k2, max_distance=max_distance)
    # Same values as the full matrix, on exactly its entries <= max_distance (float32 comparison, as DBSCAN).
    f = full.tocoo()
    expect = {(i, j): v for i, j, v in zip(f.row.tolist(), f.col.tolist(), f.data.tolist())
              if v <= np.float32(max_distance)}
    c = cut.tocoo()
    assert dict(zip(zip(c.row.tolist(), c.col.tolist()), c.data.tolist())) == expect
    assert 0 < cut.nnz < full.nnz
    # And against the reference up to its float32 rounding.
    assert set(zip(*map(np.ndarray.tolist, np.nonzero(ref <= max_distance - 1e-5)))) <= set(expect)
    assert all(ref[p] <= max_distance + 1e-5 for p in expect)
    assert (cut.data == 0).sum() >= n  # explicit zeros survive the filter


def test_max_distance_cut_is_inclusive_in_float32_and_float64():
    x = clustered_features(160)
    full = kreciprocal_jaccard(x, k1=20, k2=6)
    v = np.sort(full.data[(full.data > 0.2) & (full.data < 0.8)])[7]  # an actual stored float32 value
    below = float(np.nextafter(np.float64(v), 0))  # < v in float64, == v once rounded to float32
    assert np.float32(below) == v and below < float(v)
    for md in (below, np.float64(below), float(v), np.float32(v)):
        cut = kreciprocal_jaccard(x, k1=20, k2=6, max_distance=md)
        # DBSCAN compares float32 data with a Python float in float32, so v is within eps = below:
        # the cut must keep it, and DBSCAN on the cut equals DBSCAN on the full matrix.
        assert (cut.data == v).sum() == (full.data == v).sum() > 0
        assert np.array_equal(dbscan(cut, md, 3), dbscan(full, md, 3))
        assert np.array_equal(dbscan(cut, md, 3), sklearn_dbscan(dense(full), md, 3))


def serial_map_blocks(calls):
    def run(fn, shared, items):
        calls.append(len(items))
        return [fn(shared, item) for item in items]
    return run


def thread_map_blocks(calls):
    def run(fn, shared, items):
        calls.append(len(items))
        with ThreadPoolExecutor(max_workers=3) as pool:
            return list(pool.map(lambda item: fn(shared, item), items))
    return run


@pytest.mark.parametrize("executor", [serial_map_blocks, thread_map_blocks])
@pytest.mark.parametrize("max_distance", [None, 0.6])
def test_map_blocks_gives_identical_results(executor, max_distance):
    x = clustered_features(230)
    plain = kreciprocal_jaccard(x, k1=30, k2=6, max_distance=max_distance, block_size=50)
    calls, stats = [], {}
    mapped = kreciprocal_jaccard(x, k1=30, k2=6, max_distance=max_distance, block_size=50,
                                 map_blocks=executor(calls), stats=stats)
    assert calls == [5] and stats["mapped_blocks"] == 5 and stats["knn_blocks"] == 5
    for a, b in ((plain.indptr, mapped.indptr), (plain.indices, mapped.indices), (plain.data, mapped.data)):
        assert np.array_equal(a, b)
    # One block of 4096 is faiss' own query block: the same lists as the reference's single search.
    _, ref = case("clustered", 160, 30, 6)
    one = kreciprocal_jaccard(clustered_features(160), k1=30, k2=6, map_blocks=executor([]))
    np.testing.assert_allclose(dense(one), ref, atol=1e-5, rtol=0)


def test_torch_input_and_degenerate_sizes():
    import torch

    x = clustered_features(100)
    a = kreciprocal_jaccard(x, k1=10, k2=3)
    b = kreciprocal_jaccard(torch.from_numpy(x), k1=10, k2=3)
    assert np.array_equal(a.data, b.data) and np.array_equal(a.indices, b.indices)
    one = kreciprocal_jaccard(x[:1], k1=1, k2=1)
    assert one.nnz == 1 and one[0, 0] == 0
    np.testing.assert_allclose(dense(kreciprocal_jaccard(x[:30], k1=30, k2=30)),
                               reference_jaccard(x[:30], 30, 30), atol=1e-5, rtol=0)



@pytest.mark.parametrize("d", [7, 2048, 9000])
def test_softmax_logits_are_bitwise_the_pairwise_ones(d):
    """Step 4's dot products, batched by rows of equal length with x_i broadcast, equal float64 einsum over
    the gathered pairs (the previous code) bit for bit, rows without pairs included, on 1 and 2 threads;
    a small chunk makes many row ranges."""
    import torch

    from ureid.clustering.jaccard import _logits

    rng = np.random.default_rng(d)
    n = 600
    x = rng.standard_normal((n, d), dtype=np.float32)
    ptr = np.concatenate(([0], np.cumsum(rng.integers(0, 30, n))))
    idx = rng.integers(0, n, ptr[-1])
    rows = np.repeat(np.arange(n), np.diff(ptr))
    want = -(2.0 - 2.0 * np.einsum("ij,ij->i", x[rows], x[idx], dtype=np.float64))
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for chunk in (1 << 22, 50 * d):
                assert np.array_equal(_logits(x, ptr, idx, chunk_floats=chunk), want)
    finally:
        torch.set_num_threads(old)

# --------------------------------------------------------------------------------------------- DBSCAN


def sklearn_dbscan(dense_matrix, eps, min_samples):
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dense_matrix)


@pytest.mark.parametrize("kind,n,k1,k2", [c for c in CASES if c[2] >= 5])
def test_dbscan_matches_sklearn_on_jaccard(kind, n, k1, k2):
    x, ref = case(kind, n, k1, k2)
    D = kreciprocal_jaccard(x, k1=k1, k2=k2)
    dense_ours = dense(D)
    found_clusters = False
    for eps in (0.3, 0.5, 0.6, 0.7, 0.8):
        cut = kreciprocal_jaccard(x, k1=k1, k2=k2, max_distance=eps)
        for min_samples in (1, 2, 4, 7):
            want = sklearn_dbscan(dense_ours, eps, min_samples)
            got = dbscan(D, eps, min_samples)
            assert got.dtype == np.int64
            assert np.array_equal(got, want), (eps, min_samples)
            assert np.array_equal(dbscan(cut, eps, min_samples), want)
            assert np.array_equal(sklearn_dbscan(ref, eps, min_samples), want)
            found_clusters |= 1 < want.max() + 1 < n and (want == -1).any()
    assert found_clusters


def test_dbscan_border_goes_to_the_cluster_discovered_first():
    # Cluster 0: cores {1, 9, 10, 11}; cluster 1: cores {3, 4, 5, 6} (smallest core 3 > 1).
    # Point 0 is a border of both, nearer to core 3, first in its row: scikit-learn still gives it 0.
    # Point 2 borders cluster 1 only; point 7 is noise; point 8 is isolated (no diagonal: dense 1.0).
    n, edges = 12, []
    for group in ([1, 9, 10, 11], [3, 4, 5, 6]):
        edges += [(a, b, 0.1) for a in group for b in group if a < b]
    edges += [(0, 3, 0.05), (0, 9, 0.2), (2, 4, 0.3), (7, 2, 0.25)]
    rows = [a for a, b, _ in edges] + [b for a, b, _ in edges] + [i for i in range(n) if i != 8]
    cols = [b for a, b, _ in edges] + [a for a, b, _ in edges] + [i for i in range(n) if i != 8]
    vals = [v for *_, v in edges] * 2 + [0.0] * (n - 1)
    D = sp.csr_matrix((np.array(vals, dtype=np.float32), (rows, cols)), shape=(n, n))
    assert (D.diagonal() == 0).sum() == n and D.nnz == 2 * len(edges) + n - 1  # explicit zeros are there
    got = dbscan(D, 0.5, 4)
    assert got.tolist() == [0, 0, 1, 1, 1, 1, 1, -1, -1, 0, 0, 0]
    assert np.array_equal(got, sklearn_dbscan(dense(D), 0.5, 4))
    # With min_samples 2, point 2 (neighbours 2, 4, 7) and 7 (neighbours 7, 2) are cores too.
    assert np.array_equal(dbscan(D, 0.5, 2), sklearn_dbscan(dense(D), 0.5, 2))


def shared_border_graph(seed, eps=0.5, min_samples=4):
    """A random sparse distance matrix built to have many border points shared by clusters.

    Cliques of ``min_samples`` .. ``min_samples + 3`` points (cores, pairwise <= eps), a few core-core
    bridges that merge cliques into one cluster (never touching cliques 0 and 1), border points joined
    to one core of each of 1 or 2 cliques (always cliques 0 and 1 for the first), a few border-border
    links, noise, stored far pairs (> eps) and sometimes missing diagonals; indices shuffled so
    clusters, borders and noise interleave. Returns (csr, number of borders touching >= 2 cliques).
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(min_samples, min_samples + 4, int(rng.integers(4, 9)))
    cliques = np.split(np.arange(sizes.sum()), np.cumsum(sizes)[:-1])
    n_border, n_noise = int(rng.integers(8, 20)), int(rng.integers(2, 8))
    n = int(sizes.sum()) + n_border + n_noise
    near = [(a, b) for c in cliques for a in c for b in c if a < b]
    for _ in range(int(rng.integers(0, 3))):
        p, q = rng.choice(np.arange(2, len(cliques)), 2, replace=False)
        near.append((int(rng.choice(cliques[p])), int(rng.choice(cliques[q]))))
    borders = np.arange(sizes.sum(), sizes.sum() + n_border)
    degree = np.ones(n, dtype=int)  # the point itself
    multi = 0
    for k, b in enumerate(borders):
        touched = [0, 1] if k == 0 else rng.choice(len(cliques), int(rng.integers(1, min_samples - 1)), replace=False)
        multi += len(touched) > 1
        for c in touched:
            near.append((int(rng.choice(cliques[c])), int(b)))
        degree[b] += len(touched)
    for _ in range(3):  # border-border links, keeping every border below min_samples neighbours
        p, q = rng.choice(borders, 2, replace=False)
        if degree[p] < min_samples - 1 and degree[q] < min_samples - 1:
            near.append((int(min(p, q)), int(max(p, q))))
            degree[p] += 1
            degree[q] += 1
    near = sorted({(min(a, b), max(a, b)) for a, b in near})
    far = {(int(a), int(b)) for a, b in rng.integers(0, n, (3 * n, 2)) if a < b} - set(near)
    pairs = near + sorted(far)
    vals = np.concatenate((rng.uniform(0, eps, len(near)), rng.uniform(eps + 0.01, 0.99, len(far))))
    diag = np.flatnonzero(rng.uniform(size=n) > (0.2 if seed % 2 else 0.0))
    perm = rng.permutation(n)  # perm[old] = new index
    r = perm[np.concatenate(([a for a, _ in pairs], [b for _, b in pairs], diag))]
    c = perm[np.concatenate(([b for _, b in pairs], [a for a, _ in pairs], diag))]
    v = np.concatenate((vals, vals, np.zeros(diag.size))).astype(np.float32)
    return sp.csr_matrix((v, (r, c)), shape=(n, n)), multi


@pytest.mark.parametrize("seed", range(16))
def test_dbscan_matches_sklearn_with_many_shared_border_points(seed):
    D, multi = shared_border_graph(seed)
    assert (D.data == 0).sum() == D.diagonal().size - (D.diagonal() == 1).sum() or seed % 2
    dm = dense(D)
    model = DBSCAN(eps=0.5, min_samples=4, metric="precomputed").fit(dm)
    want = model.labels_
    assert np.array_equal(dbscan(D, 0.5, 4), want)
    # The case is what it claims: borders adjacent to cores of two different clusters.
    core = np.zeros(len(dm), dtype=bool)
    core[model.core_sample_indices_] = True
    shared = sum(len(set(want[core & (dm[:, b] <= 0.5)].tolist())) > 1 for b in np.flatnonzero(~core))
    assert shared >= 1 and multi >= 1
    for eps in (0.2, 0.35, 0.7):
        for min_samples in (2, 3, 5, 6):
            assert np.array_equal(dbscan(D, eps, min_samples), sklearn_dbscan(dm, eps, min_samples)), \
                (eps, min_samples)


def test_dbscan_eps_compares_like_sklearn():
    v = np.float32(0.6)  # 0.6000000238 > 0.6 in float64
    D = sp.csr_matrix(np.array([[0, v, 0.9], [v, 0, 0.9], [0.9, 0.9, 0]], dtype=np.float32))
    D.setdiag(0)  # csr_matrix(dense) drops zeros; put the diagonal back explicitly
    for eps in (0.6, np.float64(0.6), np.float32(0.6)):
        assert np.array_equal(dbscan(D, eps, 2), sklearn_dbscan(dense(D), eps, 2)), type(eps)
    assert dbscan(D, 0.6, 2).tolist() == [0, 0, -1] and dbscan(D, np.float64(0.6), 2).tolist() == [-1, -1, -1]
    # float64 data: a missing diagonal (dense 1.0) means the point is not its own neighbour.
    E = sp.csr_matrix((np.array([0.2, 0.2]), ([0, 1], [1, 0])), shape=(3, 3))
    assert dbscan(E, 0.5, 2).tolist() == sklearn_dbscan(dense(E), 0.5, 2).tolist() == [-1, -1, -1]
    assert dbscan(E, 0.5, 1).tolist() == sklearn_dbscan(dense(E), 0.5, 1).tolist() == [0, 0, -1]


def test_dbscan_asymmetric_border_matches_sklearn_asymmetric_cores_raise():
    # Border 3 is in core 0's row but 0 is not in 3's row: scikit-learn still labels 3 from core 0.
    rows, cols, vals = [0, 0, 0, 1, 1, 2, 2, 0], [1, 2, 3, 0, 2, 0, 1, 0], [0.1] * 7 + [0.0]
    rows, cols, vals = rows + [1, 2, 3], cols + [1, 2, 3], vals + [0.0, 0.0, 0.0]
    D = sp.csr_matrix((np.array(vals, dtype=np.float32), (rows, cols)), shape=(4, 4))
    assert np.array_equal(dbscan(D, 0.5, 3), sklearn_dbscan(dense(D), 0.5, 3))
    assert dbscan(D, 0.5, 3).tolist() == [0, 0, 0, 0]
    A = sp.csr_matrix((np.array([0.0, 0.0, 0.1], dtype=np.float32), ([0, 1, 0], [0, 1, 1])), shape=(2, 2))
    with pytest.raises(ValueError, match="distances.*not symmetric"):
        dbscan(A, 0.5, 1)


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,name", [
    ({"k1": 41}, "k1"), ({"k1": 0}, "k1"), ({"k1": 2.5}, "k1"), ({"k1": True}, "k1"),
    ({"k1": 10, "k2": 11}, "k2"), ({"k1": 10, "k2": 0}, "k2"),
    ({"max_distance": 1.0}, "max_distance"), ({"max_distance": -0.1}, "max_distance"),
    ({"max_distance": float("nan")}, "max_distance"), ({"block_size": 0}, "block_size"),
])
def test_jaccard_argument_errors(kwargs, name):
    x = random_features(40)
    args = {"k1": 20, "k2": 6, **kwargs}
    with pytest.raises(ValueError, match=name):
        kreciprocal_jaccard(x, **args)


def test_jaccard_rejects_bad_features():
    x = random_features(40)
    x[3, 5] = np.nan
    with pytest.raises(ValueError, match="features contains NaN"):
        kreciprocal_jaccard(x, k1=10, k2=3)
    with pytest.raises(ValueError, match="features must be a 2-D"):
        kreciprocal_jaccard(x[0], k1=1, k2=1)


def test_dbscan_argument_errors():
    good = kreciprocal_jaccard(random_features(40), k1=10, k2=3)
    for eps in (0, -0.1, 1.0, 1.5, 0.99999999, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="eps"):
            dbscan(good, eps, 4)
    for min_samples in (0, -1, 2.0, None):
        with pytest.raises(ValueError, match="min_samples"):
            dbscan(good, 0.5, min_samples)
    with pytest.raises(TypeError, match="distances must be a scipy.sparse"):
        dbscan(dense(good), 0.5, 4)
    with pytest.raises(ValueError, match="distances must be square"):
        dbscan(good[:30], 0.5, 4)
    broken = sp.csr_matrix((np.array([0.1, 0.2], dtype=np.float32), np.array([0, 5]), np.array([0, 1, 2])),
                           shape=(2, 2))  # column 5 in a 2 x 2 matrix
    with pytest.raises(ValueError, match="distances is not a consistent CSR"):
        dbscan(broken, 0.5, 1)
    with pytest.raises(ValueError, match="distances must be >= 0"):
        dbscan(sp.csr_matrix(np.array([[0.0, -0.1], [-0.1, 0.0]])), 0.5, 1)
    with pytest.raises(ValueError, match="distances contains NaN"):
        dbscan(sp.csr_matrix(np.array([[np.nan, 0.1], [0.1, 0.3]])), 0.5, 1)
    with pytest.raises(ValueError, match="distances must hold floating"):
        dbscan(sp.csr_matrix(np.eye(3, dtype=np.int64)), 0.5, 1)


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
cpu family\t: {family}
model\t\t: 207
flags\t\t: fpu sse2 {flags}

processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl
"""


_AVX512_FLAGS = "avx avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl"


@pytest.mark.parametrize("vendor, family, flags, core", [
    ("GenuineIntel", 6, _AVX512_FLAGS + " avx512_bf16", "SkylakeX"),
    ("GenuineIntel", 6, "avx avx2 fma avx512f avx512cd", "Haswell"),  # Knights Landing's subset: no bw/dq/vl
    ("GenuineIntel", 6, "avx avx2 fma", "Haswell"),
    ("GenuineIntel", 6, "avx", None),
    ("AuthenticAMD", 26, _AVX512_FLAGS, "SkylakeX"),  # Zen 5: OpenBLAS 0.3.15 ran Barcelona's kernels
    ("AuthenticAMD", 27, "avx avx2 fma", "Haswell"),
    ("AuthenticAMD", 25, _AVX512_FLAGS, None),  # Zen 4: its own detection ("Zen")
    ("AuthenticAMD", 23, "avx avx2 fma", None),
    ("AuthenticAMD", "", _AVX512_FLAGS, None),
    ("HygonGenuine", 24, "avx avx2 fma", None),
])
def test_openblas_core_follows_the_first_processors_vector_unit(vendor, family, flags, core):
    assert openblas_core_for_cpu(CPUINFO.format(vendor=vendor, family=family, flags=flags)) == core
    assert openblas_core_for_cpu("") is None


def _blas_cores(env_core=None):
    """faiss's and NumPy's OpenBLAS kernels in a fresh interpreter that loads faiss through import_faiss."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if env_core:
        env["OPENBLAS_CORETYPE"] = env_core
    code = ("import json, os, numpy\n"
            "from threadpoolctl import threadpool_info\n"
            "def numpy_core():\n"
            "    return [p['architecture'] for p in threadpool_info()"
            " if p.get('internal_api') == 'openblas' and 'numpy' in p['filepath']]\n"
            "before = numpy_core()\n"
            "from ureid.clustering._common import faiss_blas_core, import_faiss\n"
            "import_faiss()\n"
            "print(json.dumps({'faiss': faiss_blas_core(), 'numpy_before': before, 'numpy_after': numpy_core(),"
            " 'env': os.environ.get('OPENBLAS_CORETYPE')}))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_faiss_loads_its_openblas_on_the_cpus_kernels():
    """faiss-cpu 1.15.1's OpenBLAS 0.3.15 does not know recent Xeons or Zen 5 EPYCs and falls back to older
    kernels (4.5x slower k-NN); import_faiss sets its kernel family for the load only, and a user's choice
    wins."""
    expected = openblas_core_for_cpu()
    seen = _blas_cores()
    assert seen["faiss"] is not None  # faiss's own OpenBLAS, found
    if expected is not None:
        assert seen["faiss"] == expected
    assert seen["env"] is None  # removed again: child processes keep their own detection
    assert seen["numpy_after"] == seen["numpy_before"]  # NumPy's OpenBLAS untouched
    forced = _blas_cores("Prescott")
    assert forced["faiss"] == "Prescott" and forced["env"] == "Prescott"
