"""DBC, PUL and SSL label updates against plain dense float64 reference implementations."""

import itertools

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from ureid.clustering import dbc, ssl
from ureid.clustering._common import import_faiss
from ureid.clustering.dbc import dispersion_merge
from ureid.clustering.pul import inertia, kmeans, select_reliable
from ureid.clustering.ssl import reliable_neighbors


@pytest.fixture(autouse=True)
def one_thread():
    """The arrays here are tiny: threads gain nothing, and on a busy machine spinning OpenMP workers turn a
    0.3 s k-means into 30 s. Limit torch, faiss, BLAS and scikit-learn to one thread per test."""
    faiss = import_faiss()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(old)
    faiss.omp_set_num_threads(old)


def canonical(labels):
    """Relabel 0..C-1 in order of each cluster's first sample (the partition, independent of ids)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse]


def groups_to_labels(groups, n):
    out = np.empty(n, dtype=np.int64)
    for gid, members in groups.items():
        out[members] = gid
    return canonical(out)


def sq_dist(x):
    diff = x[:, None, :] - x[None, :, :]
    return np.einsum("ijk,ijk->ij", diff, diff)


def reference_dbc_stage(x, labels, num_merges, intra_weight):
    """The public DBC code's procedure: a looped cluster-pair linkage matrix (mean of the dense squared
    distances), every pair i<j sorted by (score, i, j), skip a pair whose cluster was absorbed, the smaller
    id absorbs, stop after num_merges merges."""
    dist = sq_dist(x)
    c = labels.max() + 1
    members = [np.flatnonzero(labels == k) for k in range(c)]
    link = np.zeros((c, c))
    for i in range(c):
        for j in range(i, c):
            link[i, j] = link[j, i] = dist[np.ix_(members[i], members[j])].mean()
    pairs = sorted((link[i, j] + intra_weight * (link[i, i] + link[j, j]), i, j)
                   for i in range(c) for j in range(i + 1, c))
    groups = {k: list(members[k]) for k in range(c)}
    merged = 0
    for _, i, j in pairs:
        if merged == num_merges:
            break
        if i not in groups or j not in groups:
            continue
        groups[i] += groups.pop(j)
        merged += 1
    return groups_to_labels(groups, len(x))


def reference_dbc_merge(x, labels, num_merges, intra_weight):
    """The paper's Algorithm 1, naively: recompute every dispersion from the dense matrix after each merge."""
    dist = sq_dist(x)
    groups = {k: list(np.flatnonzero(labels == k)) for k in range(labels.max() + 1)}
    for _ in range(num_merges):
        intra = {k: dist[np.ix_(m, m)].mean() for k, m in groups.items()}
        _, i, j = min((dist[np.ix_(groups[i], groups[j])].mean() + intra_weight * (intra[i] + intra[j]), i, j)
                      for i, j in itertools.combinations(sorted(groups), 2))
        groups[i] += groups.pop(j)
    return groups_to_labels(groups, len(x))


def features(seed, n=72, d=6, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    x[: n // 3] = 0.3 * x[: n // 3] + 1.0  # a denser region, so clusters differ in size and dispersion
    return x.astype(dtype)


# ----------------------------------------------------------------------------------------------- DBC


@pytest.mark.parametrize("update", ["stage", "merge"])
@pytest.mark.parametrize("intra_weight", [0.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dbc_matches_reference_over_two_stages(update, intra_weight, seed):
    x = features(seed)
    ref = reference_dbc_stage if update == "stage" else reference_dbc_merge
    first = dispersion_merge(x, np.arange(len(x)), 25, intra_weight, update=update)
    assert np.array_equal(first, ref(x, np.arange(len(x)), 25, intra_weight))
    assert first.max() + 1 == len(x) - 25 and np.array_equal(first, canonical(first))
    second = dispersion_merge(x, first, 12, intra_weight, update=update)  # from non-singleton clusters
    assert np.array_equal(second, ref(x, first, 12, intra_weight))
    assert second.max() + 1 == len(x) - 37


def test_dbc_stage_from_shuffled_labels_and_unit_features():
    x = features(3, n=60, d=8)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.random.default_rng(0).permutation(np.arange(60) // 2)  # 30 two-member clusters, ids shuffled
    for w in (0.0, 1.0):
        out = dispersion_merge(x, labels, 10, w)
        assert np.array_equal(out, reference_dbc_stage(x, labels, 10, w))


def test_dbc_stage_candidate_growth_is_exact(monkeypatch):
    """Force the adaptive candidate bound to start at 1 partner and to compute in many blocks: the
    safety check must grow the lists until the result equals the full-matrix procedure."""
    rounds = []
    original = dbc._candidates
    monkeypatch.setattr(dbc, "_INITIAL_CANDIDATES", 1)
    monkeypatch.setattr(dbc, "_BLOCK_BYTES", 4 * 96 * 7)
    monkeypatch.setattr(dbc, "_candidates", lambda *a: rounds.append(a[3]) or original(*a))
    for seed in range(3):
        x = features(seed, n=96)
        labels = np.arange(96)
        for w in (0.0, 0.5):
            out = dispersion_merge(x, labels, 40, w)
            assert np.array_equal(out, reference_dbc_stage(x, labels, 40, w))
    assert rounds, "the test must exercise candidate growth"


def test_dbc_stage_through_map_blocks_gives_the_same_labels(monkeypatch):
    """The candidate search as row blocks through an executor (what Ray tasks run), with candidate growth
    forced (1 initial partner, small blocks): same labels as in-process and as the full-matrix reference."""
    blocks = []

    def executor(fn, shared, items):
        blocks.append(len(items))
        return [fn(shared, item) for item in items]

    monkeypatch.setattr(dbc, "_INITIAL_CANDIDATES", 1)
    monkeypatch.setattr(dbc, "_MAP_MIN_CLUSTERS", 0)  # fan out even at this size
    for seed in range(3):
        x = features(seed, n=96)
        for w in (0.0, 0.5):
            stats = {}
            out = dispersion_merge(x, np.arange(96), 40, w, map_blocks=executor, stats=stats)
            assert np.array_equal(out, dispersion_merge(x, np.arange(96), 40, w))
            assert np.array_equal(out, reference_dbc_stage(x, np.arange(96), 40, w))
            assert stats["mapped_blocks"] >= 8
    assert len(blocks) > 6, "candidate growth must have sent further rounds through the executor"
    x = features(4, n=80)  # merge mode has no candidate search: the executor is not used
    stats = {}
    assert np.array_equal(dispersion_merge(x, np.arange(80), 20, 0.5, update="merge", map_blocks=executor,
                                           stats=stats), dispersion_merge(x, np.arange(80), 20, 0.5, update="merge"))
    assert "mapped_blocks" not in stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dbc_merge_is_average_linkage_without_intra(seed):
    x = features(seed, n=80)
    for num_merges in (30, 70):
        ours = dispersion_merge(x, np.arange(80), num_merges, 0.0, update="merge")
        tree = linkage(pdist(x, "sqeuclidean"), method="average")
        theirs = fcluster(tree, t=80 - num_merges, criterion="maxclust")
        assert np.array_equal(ours, canonical(theirs))


def test_dbc_dtypes_and_torch_inputs_agree():
    x32 = features(4, dtype=np.float32)
    for update in ("stage", "merge"):
        base = dispersion_merge(x32.astype(np.float64), np.arange(72), 30, 0.3, update=update)
        assert np.array_equal(dispersion_merge(x32, np.arange(72), 30, 0.3, update=update), base)
        tensor_out = dispersion_merge(torch.from_numpy(x32), torch.arange(72), 30, 0.3, update=update,
                                      device="cpu")
        assert np.array_equal(tensor_out, base) and tensor_out.dtype == np.int64


@pytest.mark.parametrize("update", ["stage", "merge"])
def test_dbc_ties_go_to_smaller_ids(update):
    x = np.array([[0.0], [1.0], [2.0], [10.0]])  # pairs (0, 1) and (1, 2) tie exactly at 1
    assert dispersion_merge(x, np.arange(4), 1, 0.0, update=update).tolist() == [0, 0, 1, 2]
    x = np.array([[0.0], [10.0], [11.0], [12.0]])  # (1, 2) and (2, 3) tie: (1, 2) has the smaller id pair
    assert dispersion_merge(x, np.arange(4), 1, 0.0, update=update).tolist() == [0, 1, 1, 2]
    # exact ties between a merged cluster and a cached partner (found by search over small integer sets)
    x = np.array([[6.0], [7.0], [3.0], [5.0], [7.0], [5.0]])
    ref = reference_dbc_stage if update == "stage" else reference_dbc_merge
    assert np.array_equal(dispersion_merge(x, np.arange(6), 3, 0.0, update=update), ref(x, np.arange(6), 3, 0.0))


def test_dbc_zero_merges_relabels_only():
    x = features(5, n=10)
    labels = np.array([3, 3, 0, 1, 2, 0, 1, 2, 4, 4])
    assert np.array_equal(dispersion_merge(x, labels, 0, 0.0), canonical(labels))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_merges=10), "num_merges"),
    (dict(num_merges=-1), "num_merges"),
    (dict(num_merges=2.0), "num_merges"),
    (dict(intra_weight=-0.1), "intra_weight"),
    (dict(intra_weight=float("nan")), "intra_weight"),
    (dict(update="average"), "update"),
    (dict(labels=np.array([0, 1, 1, 3, 0, 1, 3, 3, 4, 5])), "contiguous"),
    (dict(labels=np.arange(9)), "length"),
])
def test_dbc_errors(kwargs, match):
    args = dict(features=features(6, n=10), labels=np.arange(10), num_merges=3, intra_weight=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dispersion_merge(**args)


def test_dbc_rejects_non_finite_features():
    x = features(6, n=10)
    x[4, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        dispersion_merge(x, np.arange(10), 2, 0.0)


# ----------------------------------------------------------------------------------------------- PUL


def reference_select(x, labels, threshold, match):
    centres = []
    for k in range(labels.max() + 1):
        members = np.flatnonzero(labels == k)
        mean = x[members].mean(0)
        dist = [np.sum((x[i] - mean) ** 2) for i in members]
        centres.append(x[members[int(np.argmin(dist))]])
    mask = np.zeros(len(x), dtype=bool)
    for i in range(len(x)):
        cos = [x[i] @ c / (np.linalg.norm(x[i]) * np.linalg.norm(c)) for c in centres]
        mask[i] = cos[labels[i]] > threshold if match == "own" else max(cos) > threshold
    return mask


@pytest.mark.parametrize("match", ["any", "own"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_reliable_matches_reference(match, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((150, 8)) + 2.0
    labels = canonical(rng.integers(0, 12, 150))
    for threshold in (0.6, 0.85, 0.95):
        ours = select_reliable(x, labels, threshold, match=match)
        assert ours.dtype == bool
        assert np.array_equal(ours, reference_select(x, labels, threshold, match))
    assert np.array_equal(select_reliable(torch.from_numpy(x), labels, 0.85, match=match),
                          reference_select(x, labels, 0.85, match))


@pytest.mark.parametrize("match", ["any", "own"])
def test_select_reliable_over_many_chunks_matches_one_chunk(match, monkeypatch):
    """The three passes reuse two chunk buffers: with 7-row chunks (the last one short) the mask is the one
    of a single chunk and the reference's."""
    from ureid.clustering import pul

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((150, 8)) + 2.0).astype(np.float32)
    labels = canonical(rng.integers(0, 12, 150))
    whole = select_reliable(x, labels, 0.9, match=match)
    monkeypatch.setattr(pul, "_CHUNK_BYTES", 7 * 8 * 12)
    assert np.array_equal(select_reliable(x, labels, 0.9, match=match), whole)
    assert np.array_equal(whole, reference_select(x.astype(np.float64), labels, 0.9, match))


def test_select_reliable_threshold_is_strict_and_modes_differ():
    x = np.array([[1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    # cluster 0 = {0, 1, 2, 5}: mean (1.5, 0, 0.25); samples 0 and 1 tie for nearest -> centre 0 (e0).
    # cluster 1 = {3, 4}: identical -> centre 3 (e1). Sample 5 (e2) has cosine exactly 0 with both centres:
    # not selected at threshold 0, since selection needs cosine strictly above it.
    labels = np.array([0, 0, 0, 1, 1, 0])
    assert select_reliable(x, labels, 0.0).tolist() == [True, True, True, True, True, False]
    # sample 4 (e1) moved into cluster 0: far from its own centre (e0), on top of cluster 1's centre (e1)
    labels = np.array([0, 0, 0, 1, 0, 1])
    assert select_reliable(x, labels, 0.5, match="any").tolist() == [True, True, True, True, True, False]
    assert select_reliable(x, labels, 0.5, match="own").tolist() == [True, True, True, True, False, False]


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(match="all"), "match"),
    (dict(labels=np.array([0, 2, 2, 0])), "contiguous"),
])
def test_select_reliable_errors(kwargs, match):
    args = dict(features=np.eye(4), labels=np.array([0, 1, 1, 0]), threshold=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        select_reliable(**args)


# -------------------------------------------------------------------------------------------- k-means


def clustered(seed, n=2000, d=32, k=50, noise=1.5):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    return (centres[rng.integers(0, k, n)] + noise * rng.standard_normal((n, d))).astype(np.float32)


def test_inertia_matches_loop():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3))
    labels = rng.integers(0, 5, 40)
    expected = sum(((x[labels == k] - x[labels == k].mean(0)) ** 2).sum() for k in np.unique(labels))
    assert inertia(x, labels) == pytest.approx(expected, rel=1e-12)


def test_restart_scores_are_the_inertias_and_the_same_together_or_one_by_one():
    """Each restart's score, from its own centre sums, agrees with the two-pass inertia of its labels, on raw
    features far from the origin (the cancellation case), and is the same alone (one per task) as with the
    others; a restart that empties a cluster (a seed taken twice) included."""
    from ureid.clustering.pul import _kmeanspp, _lloyd_runs

    x = (clustered(5, n=3000, d=64, k=30, noise=0.3) + 20.0).astype(np.float32)
    seeds = _kmeanspp(torch.from_numpy(x), 30, 3, torch.Generator().manual_seed(6)).numpy()
    seeds[2, 1] = seeds[2, 0]
    together = _lloyd_runs(x, seeds, 300)
    for r, (labels, value) in enumerate(together):
        assert value == pytest.approx(inertia(x, labels), rel=1e-9)
        alone = _lloyd_runs(x, seeds[r:r + 1], 300)[0]
        assert np.array_equal(alone[0], labels) and alone[1] == value


def _bisector_samples(scale, n, d=64):
    """Three centres around a point ``scale`` x N(0, 1) from the origin and ``n`` samples on the bisector of
    the first two, give or take 1e-4 along their axis: (rng, that point, centres, samples), float64."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(d) * scale
    centres = np.stack([base + rng.standard_normal(d), base + rng.standard_normal(d), base + 5 * rng.standard_normal(d)])
    mid = (centres[0] + centres[1]) / 2
    axis = (centres[1] - centres[0]) / np.linalg.norm(centres[1] - centres[0])
    x = mid + rng.standard_normal((n, d)) * 0.5
    x -= np.outer((x - mid) @ axis, axis)  # on the bisector of centres 0 and 1 ...
    x += np.outer(rng.uniform(-1e-4, 1e-4, len(x)), axis)  # ... give or take a hair
    return rng, base, centres, x


def test_nearest_centres_are_decided_exactly_where_float32_rounding_misleads():
    """Samples far from the origin, almost equidistant from two centres: float32 products pick the wrong centre
    for some of them; the lockstep assignment gives the float64 answer, and exact ties go to the lower index."""
    from ureid.clustering.pul import _UNIT, _nearest_exact, _row_sq64

    rng, base, centres, x = _bisector_samples(300, 4000)
    x, centres = x.astype(np.float32), centres.astype(np.float32)
    x64, c64 = x.astype(np.float64), centres.astype(np.float64)
    want = np.argmin((c64 * c64).sum(1) - 2 * x64 @ c64.T, axis=1)
    f32 = np.argmin((centres * centres).sum(1) - 2 * x @ centres.T, axis=1)
    assert (f32 != want).sum() > 10, "the case must defeat float32"
    d = x.shape[1]
    gamma = d * _UNIT / (1 - d * _UNIT)
    got = _nearest_exact(x, _row_sq64(x), centres[None], gamma)[0][0]
    assert np.array_equal(got, want)
    # exact ties (every product exact): the lower index, as argmin
    ties = np.array([[0, 0, 0, 0], [2, 2, 2, 2]], dtype=np.float32)
    twins = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [3, 3, 3, 3], [1, 1, 1, 1]], dtype=np.float32)
    assert _nearest_exact(ties, _row_sq64(ties), twins[None], gamma)[0][0].tolist() == [0, 0]


def test_lockstep_restarts_give_each_restart_the_labels_it_gets_alone():
    from ureid.clustering.pul import _kmeanspp, _lloyd_lockstep

    x = clustered(6, n=1500, d=48, k=25, noise=1.2)
    seeds = _kmeanspp(torch.from_numpy(x), 25, 4, torch.Generator().manual_seed(3)).numpy()
    together = _lloyd_lockstep(x, seeds, 300)
    for r in range(4):
        assert np.array_equal(_lloyd_lockstep(x, seeds[r:r + 1], 300)[0], together[r])
    assert np.array_equal(_lloyd_lockstep(x, seeds[:1], 300)[0], together[0])
    # a fixed point: one more Lloyd step from the final means keeps every label
    means = np.stack([x[together[0] == c].mean(0) for c in range(25)])
    assert np.array_equal(np.argmin(((x[:, None, :] - means[None]) ** 2).sum(2), 1), together[0])


def _plain_lloyd(x, seed_rows, max_iter=300):
    """Lloyd as written down: float64 distances to every centre on every pass, float64 means stored as float32
    centres, an emptied cluster's centre moved to the sample farthest from its own centre (the code's rule)."""
    x64 = x.astype(np.float64)
    centres = x[seed_rows].copy()
    k = len(seed_rows)

    def assign():
        c64 = centres.astype(np.float64)
        return np.argmin((c64 * c64).sum(1) - 2 * x64 @ c64.T, axis=1)

    def move(labels, counts):
        full = counts > 0
        for c in np.flatnonzero(full):
            centres[c] = (x64[labels == c].sum(0) / counts[c]).astype(np.float32)
        empty = np.flatnonzero(~full)
        if empty.size:
            own = ((x64 - centres[labels].astype(np.float64)) ** 2).sum(1)
            centres[empty] = x[np.argsort(-own, kind="stable")[:empty.size]]

    labels = assign()
    counts = np.bincount(labels, minlength=k)
    move(labels, counts)
    for _ in range(max_iter):
        new = assign()
        if np.array_equal(new, labels) and counts.all():
            break
        labels, counts = new, np.bincount(new, minlength=k)
        move(labels, counts)
    return labels


def test_lloyd_skips_rows_whose_label_cannot_change_and_gives_plain_lloyds_labels(monkeypatch):
    """The distance bounds leave most rows out of the later passes, and every restart still ends with the
    labels of Lloyd computed in full (an emptied cluster included: the last restart seeds one sample twice,
    and the tie goes to the lower index)."""
    from ureid.clustering import pul

    computed, full = [], []
    inner = pul._nearest_exact

    def counting(x, xsq, centres, gamma, rows=None, *args):
        computed.append(centres.shape[0] * (len(x) if rows is None else len(rows)))
        full.append(centres.shape[0] * len(x))
        return inner(x, xsq, centres, gamma, rows, *args)

    monkeypatch.setattr(pul, "_nearest_exact", counting)
    for x, k in ((clustered(6, n=1500, d=48, k=25, noise=1.2), 25), (clustered(8, n=800, d=16, k=25, noise=0.05), 40)):
        seeds = pul._kmeanspp(torch.from_numpy(x), k, 4, torch.Generator().manual_seed(3)).numpy()
        seeds[3, 1] = seeds[3, 0]
        computed.clear(), full.clear()
        got = pul._lloyd_lockstep(x, seeds, 300)
        assert sum(computed) < 0.8 * sum(full), "the bounds must spare rows"
        for r in range(4):
            assert np.array_equal(got[r], _plain_lloyd(x, seeds[r]))
        for moves in range(1, 9):  # and after every move on the way (a wrong skip can heal by the end)
            assert all(np.array_equal(a, _plain_lloyd(x, s, moves))
                       for a, s in zip(pul._lloyd_lockstep(x, seeds, moves), seeds))
    # small heavy-tailed sets, where centres jump far relative to the gaps: a wrong skip shows within a few
    # moves (a search found one in the first set when the upper bound did not grow with its centre's shift)
    for case in range(8):
        rng = np.random.default_rng(case)
        n, d, k = int(rng.integers(6, 40)), int(rng.integers(1, 4)), int(rng.integers(2, 5))
        x = (rng.standard_normal((n, d)) * rng.uniform(0.5, 3, (n, 1))).astype(np.float32)
        seeds = rng.choice(n, (1, k), replace=False)
        for moves in range(1, 6):
            assert np.array_equal(pul._lloyd_lockstep(x, seeds, moves)[0], _plain_lloyd(x, seeds[0], moves)), case


def test_seeding_gives_the_same_seeds_on_any_thread_count_and_as_one_product():
    """k-means++ seeding in fixed column blocks: the same seeds on 1 and 3 threads, and as the plain procedure
    with one product over all samples per step."""
    from ureid.clustering import pul

    x = torch.from_numpy(clustered(9, n=5000, d=40, k=60, noise=1.0))  # eight column blocks
    one = pul._kmeanspp(x, 60, 5, torch.Generator().manual_seed(4), threads=1)
    assert torch.equal(pul._kmeanspp(x, 60, 5, torch.Generator().manual_seed(4), threads=3), one)

    gen = torch.Generator().manual_seed(4)
    sq = (x * x).sum(1)
    seeds = torch.empty(5, 60, dtype=torch.long)
    seeds[:, 0] = torch.randint(len(x), (5,), generator=gen)
    closest = (sq[seeds[:, :1]] + sq[None, :] - 2 * (x[seeds[:, 0]] @ x.T)).clamp_min_(0)
    for c in range(1, 60):
        cdf = torch.cumsum(closest.double(), 1)
        r = torch.rand(5, 2 + int(np.log(60)), generator=gen, dtype=torch.float64) * cdf[:, -1:]
        cand = torch.searchsorted(cdf, r).clamp_max_(len(x) - 1)
        dist = sq[cand, None] + sq[None, None, :] - 2 * (x[cand.reshape(-1)] @ x.T).reshape(5, -1, len(x))
        dist = torch.minimum(dist.clamp_min_(0), closest[:, None, :])
        best = torch.argmin(dist.sum(2, dtype=torch.float64), dim=1)
        seeds[:, c] = cand[torch.arange(5), best]
        closest = dist[torch.arange(5), best]
    assert torch.equal(one, seeds)


def test_first_pass_from_the_seeding_is_exact_where_float32_misleads():
    """Lloyd's first pass taken from k-means++ seeding's own float32 distances: rows near a bisector, far
    enough from the origin that the seeding's nearest seed is wrong for some of them, are left to the exact
    pass; every restart's labels are the float64 nearest seeds (exact ties between twin seeds to the lower
    position), and the whole run gives the labels and scores of a run without it."""
    from ureid.clustering import pul

    rng, base, centres, x = _bisector_samples(30, 3000)
    x = np.concatenate([x, base + 3 * rng.standard_normal((1000, len(base))), centres, centres[:2]]).astype(np.float32)
    x64 = x.astype(np.float64)
    first = []
    seeds = pul._kmeanspp(torch.from_numpy(x), 6, 8, torch.Generator().manual_seed(6), first=first).numpy()
    nearest, start = first[0], pul._first_pass(x, seeds, *first)
    undecided = np.isinf(start[1]).mean(1)
    assert 0 < undecided.max() < 0.5 and (undecided == 0).any()
    wrong = 0
    for r, (labels, _) in enumerate(pul._lloyd_runs(x, seeds, 0, first=start)):
        c64 = x64[seeds[r]]
        want = np.argmin((c64 * c64).sum(1) - 2 * x64 @ c64.T, axis=1)
        assert np.array_equal(labels, want)
        wrong += int((nearest[r] != want).sum())
    assert wrong > 0, "the case must defeat the seeding's float32 distances"
    plain = pul._lloyd_runs(x, seeds, 300)
    for (a, va), (b, vb) in zip(pul._lloyd_runs(x, seeds, 300, first=start), plain):
        assert np.array_equal(a, b) and va == vb


def test_lloyd_row_blocks_on_three_threads_give_the_one_thread_labels():
    """Each pass's rows go in fixed blocks over the caller's threads (eight blocks here): the labels of every
    restart are those of one thread and of plain Lloyd, and the threads' setting is restored."""
    from ureid.clustering import pul

    assert len(pul._row_blocks(3000, 10**6)) == 8 and len(pul._row_blocks(900, 10**6)) == 2
    assert len(pul._row_blocks(5000, 1000)) == 12 and len(pul._row_blocks(100, 10**6)) == 1
    x = clustered(4, n=3000, d=24, k=30, noise=1.3)
    seeds = pul._kmeanspp(torch.from_numpy(x), 30, 3, torch.Generator().manual_seed(2)).numpy()
    one = pul._lloyd_lockstep(x, seeds, 300)
    torch.set_num_threads(3)
    three = pul._lloyd_lockstep(x, seeds, 300)
    assert torch.get_num_threads() == 3
    for r in range(3):
        assert np.array_equal(three[r], one[r]) and np.array_equal(one[r], _plain_lloyd(x, seeds[r]))


def test_kmeans_through_map_blocks_gives_the_in_process_labels():
    """The restarts go out in groups (one task each); the winner and its labels are the in-process ones."""
    from ureid.clustering.pul import RESTARTS_PER_TASK

    x = clustered(7, n=1200, d=24, k=30, noise=1.4)
    calls = []

    def executor(fn, shared, items):
        calls.append(len(items))
        return [fn(shared, item) for item in items]

    for n_init in (10, 7):
        stats = {}
        got = kmeans(x, 30, seed=2, n_init=n_init, map_blocks=executor, stats=stats)
        assert np.array_equal(got, kmeans(x, 30, seed=2, n_init=n_init))
        assert stats["mapped_blocks"] == calls[-1] == -(-n_init // RESTARTS_PER_TASK) > 1


@pytest.mark.parametrize("device", [None, "cpu"])  # lockstep Lloyd, torch Lloyd
@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_inertia_within_one_percent_of_sklearn(device, seed):
    x = clustered(seed)
    theirs = KMeans(n_clusters=50, n_init=10, random_state=seed).fit(x)
    ours = kmeans(x, 50, seed=seed, device=device)
    assert ours.dtype == np.int64 and ours.max() + 1 == 50 and np.array_equal(ours, canonical(ours))
    assert inertia(x, ours) <= 1.01 * inertia(x, theirs.labels_)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_kmeans_deterministic_per_seed(device):
    x = clustered(3, n=600, k=20)
    a = kmeans(x, 20, seed=7, n_init=2, device=device)
    assert np.array_equal(a, kmeans(x, 20, seed=7, n_init=2, device=device))
    one = kmeans(x, 1, device=device)
    assert (one == 0).all()


def test_kmeans_high_dim_few_restarts():
    x = clustered(4, n=500, d=300, k=10, noise=0.5)
    theirs = KMeans(n_clusters=10, n_init=10, random_state=0).fit(x)
    assert inertia(x, kmeans(x, 10, n_init=3)) <= 1.01 * inertia(x, theirs.labels_)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_clusters=0), "num_clusters"),
    (dict(num_clusters=11), "num_clusters"),
    (dict(n_init=0), "n_init"),
    (dict(max_iter=0), "max_iter"),
])
def test_kmeans_errors(kwargs, match):
    args = dict(features=np.random.default_rng(0).standard_normal((10, 3)), num_clusters=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kmeans(**args)


# ----------------------------------------------------------------------------------------------- SSL


def reference_neighbors(g, parts, cams, k, part_weight, camera_penalty):
    n = len(g)
    out = np.empty((n, k), dtype=np.int64)
    for a in range(n):
        dist = []
        for b in range(n):
            if a == b:
                continue
            d = (1 - part_weight) * np.linalg.norm(g[a] - g[b])
            if parts is not None:
                d += part_weight * np.mean([np.linalg.norm(parts[a, p] - parts[b, p]) for p in range(parts.shape[1])])
            d += camera_penalty * (cams[a] == cams[b])
            dist.append((d, b))
        out[a] = [b for _, b in sorted(dist)[:k]]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("part_weight, camera_penalty", [(0.5, 0.02), (0.0, 0.3), (1.0, 0.0)])
def test_reliable_neighbors_matches_reference(seed, part_weight, camera_penalty, monkeypatch):
    monkeypatch.setattr(ssl, "_BLOCK_BYTES", 8 * 70 * 40)  # several row blocks
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((70, 10))
    parts = rng.standard_normal((70, 4, 5))
    cams = rng.integers(0, 3, 70)
    ours = reliable_neighbors(g, parts, cams, 4, part_weight, camera_penalty)
    assert ours.shape == (70, 4) and ours.dtype == np.int64
    assert np.array_equal(ours, reference_neighbors(g, parts, cams, 4, part_weight, camera_penalty))
    if part_weight == 0:
        assert np.array_equal(reliable_neighbors(g, None, cams, 4, 0.0, camera_penalty), ours)
    torch_out = reliable_neighbors(torch.from_numpy(g), torch.from_numpy(parts), torch.from_numpy(cams), 4,
                                   part_weight, camera_penalty, device="cpu")
    assert np.array_equal(torch_out, ours)


def test_dbc_stage_scores_exactly_only_the_pairs_before_the_stop(monkeypatch):
    """Exact (float64) scores are computed for the known pairs whose search score can come before the
    stage's last merge, raising the cut until the simulation stops below it: fewer than all known pairs,
    with the labels of the full-matrix procedure, over merge counts from one to most clusters."""
    scored, known = [], []
    original_exact, original_sim = dbc._exact_scores, dbc._simulate_scored
    monkeypatch.setattr(dbc, "_exact_scores", lambda mu, h, keys: scored.append(keys.size) or original_exact(mu, h, keys))
    monkeypatch.setattr(dbc, "_simulate_scored", lambda *a: known.append(a[2].size) or original_sim(*a))
    x = features(7, n=300, d=5)
    for num_merges in (1, 10, 30, 150, 280):
        for w in (0.0, 0.5):
            scored.clear(), known.clear()
            out = dispersion_merge(x, np.arange(300), num_merges, w)
            assert np.array_equal(out, reference_dbc_stage(x, np.arange(300), num_merges, w)), (num_merges, w)
            assert sum(scored) <= known[-1]  # each known pair scored at most once
            if num_merges <= 30:
                assert sum(scored) < known[-1] / 2, (num_merges, sum(scored), known[-1])


def test_reliable_neighbors_ties_at_the_cut_equal_a_full_stable_sort():
    """Rows whose k-th and (k+1)-th smallest D tie (coarse features, many exact ties) take the smallest
    indices among the tied, as a stable sort of the whole row does; every k from 1 to N-1."""
    rng = np.random.default_rng(4)
    g = np.round(rng.standard_normal((40, 3)))  # integer coordinates: many equal distances
    cams = rng.integers(0, 3, 40)
    for penalty in (0.0, 1.0):
        d = np.sqrt(((g[:, None] - g[None]) ** 2).sum(-1)) + penalty * (cams[:, None] == cams[None])
        np.fill_diagonal(d, np.inf)
        full = np.argsort(d, axis=1, kind="stable")
        for k in (1, 3, 10, 39):
            out = reliable_neighbors(g, None, cams, k, 0.0, penalty)
            assert np.array_equal(out, full[:, :k]), (penalty, k)


def test_reliable_neighbors_candidates_give_the_full_rows_neighbours_bitwise(monkeypatch):
    """Without stripes a block forms D only at 2k + 16 candidates per row (and whole rows where the bound
    cannot rule the rest out): the same neighbours as forming every row in full, on clustered float32 and
    float64 features with exact duplicates (more tied at the cut than there are candidates)."""
    rng = np.random.default_rng(9)
    centres = rng.standard_normal((30, 16))
    g = centres[rng.integers(0, 30, 300)] + 0.3 * rng.standard_normal((300, 16))
    g[250:] = g[0]  # 51 identical rows
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    cams = rng.integers(0, 3, 300)
    widths = []
    original = ssl._euclid_
    monkeypatch.setattr(ssl, "_euclid_", lambda sq, dot: widths.append(dot.shape) or original(sq, dot))
    monkeypatch.setattr(ssl, "_BLOCK_BYTES", 3 * 300 * 8 * 64)  # several row blocks
    for dtype in (np.float32, np.float64):
        for penalty in (0.0, 0.02, 0.5):
            for k in (1, 4, 9):
                widths.clear()
                fast = reliable_neighbors(g.astype(dtype), None, cams, k, 0.0, penalty)
                in_full = sum(rows for rows, width in widths if width == 300)
                assert ssl._candidates(k) in {w for _, w in widths} and 51 <= in_full < 100, in_full
                with monkeypatch.context() as m:
                    m.setattr(ssl, "_candidates", lambda k: 10 ** 9)  # every row in full
                    full = reliable_neighbors(g.astype(dtype), None, cams, k, 0.0, penalty)
                assert np.array_equal(fast, full), (dtype, penalty, k)
    assert np.array_equal(reliable_neighbors(g[:100], None, cams[:100], 4, 0.0, 0.02),
                          reference_neighbors(g[:100], None, cams[:100], 4, 0.0, 0.02))


def test_reliable_neighbors_ties_by_index_and_self_excluded():
    g = np.zeros((6, 3))
    g[5] = 1.0  # samples 0..4 are identical: all at distance 0 from each other
    out = reliable_neighbors(g, None, np.zeros(6, dtype=int), 3, 0.0, 0.0)
    assert out.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], [0, 1, 2], [0, 1, 2]]
    # a same-camera penalty pushes same-camera twins behind the other camera's
    cams = np.array([0, 0, 1, 1, 0, 1])
    out = reliable_neighbors(g, None, cams, 2, 0.0, 0.02)
    assert out[0].tolist() == [2, 3] and out[2].tolist() == [0, 1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_neighbors=0), "num_neighbors"),
    (dict(num_neighbors=8), "num_neighbors"),
    (dict(part_weight=1.5), "part_weight"),
    (dict(part_weight=-0.1), "part_weight"),
    (dict(camera_penalty=-0.02), "camera_penalty"),
    (dict(part_features=None), "part_features is None"),
    (dict(part_features=np.zeros((7, 2, 3))), "part_features has 7 rows"),
    (dict(part_features=np.zeros((8, 6))), "part_features must be a 3-D"),
    (dict(cameras=np.zeros(7, dtype=int)), "cameras"),
    (dict(cameras=np.zeros(8)), "cameras"),
])
def test_reliable_neighbors_errors(kwargs, match):
    rng = np.random.default_rng(0)
    args = dict(global_features=rng.standard_normal((8, 4)), part_features=rng.standard_normal((8, 2, 3)),
                cameras=np.zeros(8, dtype=int), num_neighbors=3, part_weight=0.5, camera_penalty=0.02)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        reliable_neighbors(**args)


def test_reliable_neighbors_through_map_blocks_give_the_same_neighbours(monkeypatch):
    """Row blocks through an executor (what Ray tasks run): the same blocks as in-process, the same result."""
    monkeypatch.setattr(ssl, "_BLOCK_BYTES", 3 * 9 * 70 * 4 * 7)  # 7 rows per block with 8 stripes
    rng = np.random.default_rng(5)
    g = rng.standard_normal((70, 12)).astype(np.float32)
    parts = rng.standard_normal((70, 8, 4)).astype(np.float32)
    cams = rng.integers(0, 3, 70)
    calls = []

    def executor(fn, shared, items):
        calls.append(len(items))
        return [fn(shared, item) for item in items]

    for p, w in ((parts, 0.5), (None, 0.0)):
        stats = {}
        ours = reliable_neighbors(g, p, cams, 4, w, 0.02, map_blocks=executor, stats=stats)
        assert np.array_equal(ours, reliable_neighbors(g, p, cams, 4, w, 0.02))
        assert np.array_equal(ours, reference_neighbors(g, p, cams, 4, w, 0.02))
        assert stats["mapped_blocks"] == calls[-1] > 1


def test_dbc_stage_means_are_bitwise_the_dense_float64_moments(monkeypatch):
    """The stage mode never holds the (C, d) means: it forms them from the member rows when a block of the
    search or a chunk of exact scores needs them. The search rows, every float64 mean (any ids, any order),
    |mu|^2 and h equal the dense moments bit for bit (a -0.0 in a singleton's row included), in float32 and
    float64, over several row chunks and blocks of clusters."""
    monkeypatch.setattr(dbc, "_CHUNK_BYTES", 8 * 24 * 37)

    def bits(t):
        return t.numpy().view(np.int64 if t.dtype == torch.float64 else np.int32)

    rng = np.random.default_rng(2)
    for dtype in (np.float32, np.float64):
        x = rng.normal(size=(400, 24)).astype(dtype)
        lab = np.where(rng.random(400) < 0.5, np.arange(400) + 400, rng.integers(0, 60, 400))
        lab = np.unique(lab, return_inverse=True)[1]
        lone = int(np.flatnonzero(np.bincount(lab)[lab] == 1)[0])
        x[lone, 5] = -0.0
        c = int(lab.max()) + 1
        xt = torch.from_numpy(x)
        mu, q, sizes = dbc._cluster_moments(xt, lab, c)
        assert 0 < int((sizes == 1).sum()) < c and np.signbit(mu[lab[lone], 5].item()) == 0
        for w in (0.0, 0.7):
            means = dbc._StageMeans(xt, lab, c, w)
            assert np.array_equal(bits(means.search(np.arange(c))), bits(mu.to(xt.dtype)))
            ids = rng.permutation(c)[:150]
            assert np.array_equal(bits(means.search(ids)), bits(mu[ids].to(xt.dtype)))
            assert np.array_equal(bits(means.means(np.arange(c))), bits(mu))
            assert np.array_equal(bits(means[torch.tensor([5, 5, 0])]), bits(mu[[5, 5, 0]]))
            assert np.array_equal(bits(means.sq), bits((mu * mu).sum(1)))
            assert np.array_equal(bits(means.h), bits(dbc._h(mu, q, w)))


def test_dbc_stage_forms_cluster_means_a_bounded_block_at_a_time(monkeypatch):
    """Issue 14's "one stage's features plus O(N k)": the stage mode never makes a C x d matrix of means
    (nor a search-dtype copy of the features at stage 0). With small byte budgets, every call that forms
    means, in the store's own search, in the exact scores and in every block task, asks for a bounded
    block of clusters, and the labels are the full-matrix procedure's, in-process and fanned out."""
    for name, size in (("_CHUNK_BYTES", 8 * 12 * 16), ("_BAND_BYTES", 4 * 12 * 32), ("_EXACT_BYTES", 5 * 8 * 12 * 8),
                       ("_BLOCK_BYTES", 4 * 32 * 32), ("_INITIAL_CANDIDATES", 2), ("_MAP_MIN_CLUSTERS", 0)):
        monkeypatch.setattr(dbc, name, size)
    asked = []
    original_means = dbc._Means.means
    monkeypatch.setattr(dbc._Means, "means", lambda self, ids: asked.append(np.size(ids)) or original_means(self, ids))
    original_search = dbc._Means.search
    monkeypatch.setattr(dbc._Means, "search", lambda self, ids: asked.append(np.size(ids)) or original_search(self, ids))

    def executor(fn, shared, items):
        return [fn(shared, item) for item in items]

    x = features(11, n=240, d=12, dtype=np.float32)
    stage1 = dispersion_merge(x, np.arange(240), 90, 0.0)  # 150 clusters, most of them with 2+ members
    for labels in (np.arange(240), stage1):
        for w in (0.0, 0.5):
            want = reference_dbc_stage(x, labels, 40, w)
            for mapped in (None, executor):
                asked.clear()
                assert np.array_equal(dispersion_merge(x, labels, 40, w, map_blocks=mapped), want), (w, mapped)
                assert asked and max(asked) <= 128 < int(labels.max()) + 1, max(asked)


_READ_ONLY_SCRIPT = r'''
import warnings
import numpy as np
warnings.filterwarnings("error", message="The given NumPy array is not writable")
from ureid import clustering as C
from ureid.clustering import dbc, ssl

rng = np.random.default_rng(0)
n, d = 240, 24
x = rng.normal(size=(n, d)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
parts = rng.normal(size=(n, 3, 8)).astype(np.float32)
cams, singletons, groups = np.arange(n) % 6, np.arange(n), np.arange(n) % 12

def frozen(a):
    a = a.copy()
    a.flags.writeable = False
    return a

calls = [
    lambda f, p: C.bottom_up_merge(f, singletons, 24, 0.005),
    lambda f, p: C.dispersion_merge(f, singletons, 24, 0.1),
    lambda f, p: C.dispersion_merge(f, singletons, 24, 0.1, update="merge"),
    lambda f, p: C.kmeans(f, 8, n_init=2),
    lambda f, p: C.select_reliable(f, groups, 0.5),
    lambda f, p: C.inertia(f, groups),
    lambda f, p: C.reliable_neighbors(f, p, cams, 4, 0.5, 0.1),
    lambda f, p: C.kreciprocal_jaccard(f, k1=8, k2=3, max_distance=0.7).toarray(),
    lambda f, p: dbc.candidate_block((f, np.arange(n), np.arange(n + 1), np.ones(n, np.float32)), (np.arange(10), 5))[0],
]
for call in calls:
    f, p = frozen(x), frozen(parts)
    got, want = call(f, p), call(x.copy(), parts.copy())
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)))
    assert np.array_equal(f, x) and np.array_equal(p, parts)  # nothing wrote to the caller's arrays
print("ok")
'''


def test_read_only_inputs_are_used_without_a_warning_and_never_written():
    """Features from an object store, ``np.load(mmap_mode="r")`` or a frozen array are read-only: every
    public update takes them as they are (no copy, no torch warning about undefined writes, which is
    shown once per process, hence a fresh interpreter) and gives the labels of a writable copy, and none
    writes to its input."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _READ_ONLY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_row_norms_and_finiteness_checks_work_a_chunk_of_rows_at_a_time(monkeypatch):
    """SSL's and PUL's squared row norms and every update's finiteness check made an (N, d) temporary (606 MB
    at N = 77,616): now a chunk of rows at a time, with the whole expression's values bitwise, and the same
    count of bad rows for numpy and torch input of any dimension."""
    import torch

    from ureid.clustering import _common

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((1000, 2048), dtype=np.float32))
    parts = torch.from_numpy(rng.standard_normal((3, 1000, 64), dtype=np.float32))
    whole, whole_parts = (x * x).sum(1), (parts * parts).sum(2)
    for chunk_bytes in (1, 3 * 2048 * 4, 100 * 2048 * 4, 1 << 30):  # 1, 3, 100 rows; all rows
        monkeypatch.setattr(_common, "_ROW_CHUNK_BYTES", chunk_bytes)
        assert torch.equal(_common.row_sq(x), whole)
        assert torch.equal(_common.row_sq(x.double()), (x.double() * x.double()).sum(1))
        assert torch.equal(torch.stack([_common.row_sq(p) for p in parts]), whole_parts)
        bad = x.clone()
        bad[[3, 500, 999], [0, 7, 2047]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        assert _common.nonfinite_rows(bad) == 3 and _common.nonfinite_rows(x) == 0
        assert _common.nonfinite_rows(bad.numpy()) == 3
        assert _common.nonfinite_rows(bad.reshape(1000, 32, 64)) == 3
    monkeypatch.setattr(_common, "_ROW_CHUNK_BYTES", 5 * 2048 * 4)
    with pytest.raises(ValueError, match="NaN or infinite values in 3 row"):
        _common.as_torch_features(bad, torch.device("cpu"))


_STRIPES_MEMORY_SCRIPT = r'''
import numpy as np
from ureid.clustering import _common, ssl

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

rng = np.random.default_rng(0)
n, p, d = 2000, 8, 1024
g = rng.normal(size=(n, 64)).astype(np.float32)
parts = rng.normal(size=(n, p, d)).astype(np.float32)
cams = np.arange(n) % 6
ssl.reliable_neighbors(g[:50], parts[:50], cams[:50], 4, 0.5, 0.02)  # thread pools and buffers started
ssl._BLOCK_BYTES = 2 * 2**20  # block x N tensors and row chunks of a few MB: what remains is any copy
_common._ROW_CHUNK_BYTES = 2**20  # of the stripes
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := the current RSS
start = status("VmRSS")
ssl.reliable_neighbors(g, parts, cams, 4, 0.5, 0.02)
print((status("VmHWM") - start) / parts.nbytes)
'''


def test_ssl_stripes_are_read_in_place_not_copied():
    """SSL's stripe features are P times the global ones (8 x 2048 a row in the paper's config, 4.9 GB at
    N = 77,616): the batched product reads them as strided views of the caller's (N, P, d_p) array, so the
    update's peak stays far below one more copy of them (the previous code made a (P, N, d_p) transposed
    copy: a ratio of about 1). Measured in a fresh interpreter from its peak RSS (``clear_refs``)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _STRIPES_MEMORY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip()) < 0.3, out.stdout
