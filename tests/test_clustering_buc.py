"""BUC label update against a dense reference that follows the public code's procedure."""

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from ureid.clustering.buc import bottom_up_merge


def canonical(labels):
    """Relabel 0..C-1 in order of each cluster's first sample (the partition, independent of ids)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse]


def reference_buc(features, labels, num_merges, size_penalty, is_fake=None, metric="sqeuclidean"):
    """Dense N x N float64 scores, every pair i<j sorted by (score, i*N+j), merge with relabelling.

    Mirrors ``Bottom_up.select_merge_data`` + ``generate_new_train_data`` of the public BUC code
    (same-cluster pairs are never merged; the smaller label absorbs the larger each merge).
    """
    x = np.asarray(features, dtype=np.float32).astype(np.float64)
    n = len(x)
    diff = x[:, None, :] - x[None, :, :]
    dist = np.einsum("ijk,ijk->ij", diff, diff)
    if metric == "euclidean":
        dist = np.sqrt(dist)
    label = np.asarray(labels, dtype=np.int64).copy()
    size = np.bincount(label)[label]
    score = dist + size_penalty * (size[:, None] + size[None, :])
    iu, ju = np.triu_indices(n, 1)
    keep = label[iu] != label[ju]
    if is_fake is not None:
        keep &= ~(is_fake[iu] & is_fake[ju])
    iu, ju = iu[keep], ju[keep]
    order = np.lexsort((iu * n + ju, score[iu, ju]))
    merged = 0
    for p in order:
        if merged == num_merges:
            break
        a, b = label[iu[p]], label[ju[p]]
        if a != b:
            label[label == max(a, b)] = min(a, b)
            merged += 1
    assert merged == num_merges
    return canonical(label)


def unit_features(rng, n, d, duplicates=0):
    x = rng.standard_normal((n, d)).astype(np.float32)
    if duplicates:  # exact copies of earlier rows create exactly tied pair scores
        src = rng.choice(n - duplicates, duplicates, replace=False)
        x[n - duplicates:] = x[src]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


CASES = [(0, 60, 8, 0), (1, 150, 16, 10), (2, 300, 32, 0), (3, 200, 8, 30)]  # seed, n, d, duplicates


@pytest.mark.parametrize("k_init", [2, 32])  # 2 forces the adaptive k to grow (see test below)
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("size_penalty", [0.0, 0.02])
@pytest.mark.parametrize("seed,n,d,dup", CASES)
def test_two_stages_match_reference(seed, n, d, dup, size_penalty, metric, k_init):
    rng = np.random.default_rng(seed)
    x = unit_features(rng, n, d, dup)
    m = int(0.2 * n)
    got1 = bottom_up_merge(x, np.arange(n), m, size_penalty, metric=metric, k_init=k_init)
    want1 = reference_buc(x, np.arange(n), m, size_penalty, metric=metric)
    np.testing.assert_array_equal(got1, want1)
    assert got1.dtype == np.int64 and got1.max() + 1 == n - m

    # second stage from clusters; shuffle the label ids so the input is not in first-index order
    perm = rng.permutation(got1.max() + 1)
    lab = perm[got1]
    got2 = bottom_up_merge(x, lab, m, size_penalty, metric=metric, k_init=k_init)
    np.testing.assert_array_equal(got2, reference_buc(x, lab, m, size_penalty, metric=metric))
    assert got2.max() + 1 == n - 2 * m


@pytest.mark.parametrize("seed,n,d,dup", CASES)
def test_fake_fake_pairs_are_ignored(seed, n, d, dup):
    rng = np.random.default_rng(seed + 100)
    x = unit_features(rng, n, d, dup)
    fake = rng.random(n) < 0.7
    m = int(0.3 * n)
    got = bottom_up_merge(x, np.arange(n), m, 0.01, is_fake=fake, k_init=3)
    np.testing.assert_array_equal(got, reference_buc(x, np.arange(n), m, 0.01, is_fake=fake))
    got2 = bottom_up_merge(x, got, m, 0.01, is_fake=fake.astype(int))
    np.testing.assert_array_equal(got2, reference_buc(x, got, m, 0.01, is_fake=fake))


def test_fake_constraint_changes_the_result():
    # two fakes are each other's nearest neighbours, but may not be merged directly
    x = np.array([[1, 0], [0.999, 0.045], [0, 1], [-1, 0]], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert bottom_up_merge(x, np.arange(4), 1, 0.0).tolist() == [0, 0, 1, 2]
    fake = np.array([True, True, False, False])
    got = bottom_up_merge(x, np.arange(4), 1, 0.0, is_fake=fake)
    np.testing.assert_array_equal(got, reference_buc(x, np.arange(4), 1, 0.0, is_fake=fake))
    assert got.tolist() == [0, 1, 1, 2]  # sample 1 leans toward sample 2


def test_fake_rows_grow_when_their_pairs_are_only_on_their_side():
    # Fake samples search only real ones and real ones never list fakes, so a fake-real pair
    # beyond the fake's list has no other witness. Fake f (cluster A) sits at the centre of a ring
    # of 5 reals of its own cluster (squared distance rho2) that fill its list (k_init=1 plus 4
    # reserved same-cluster slots); its nearest other real R (cluster B) is at 1.5 rho2. The only
    # listed pairs are g-R (2.5 rho2) and a far fake-real pair c-dd (2 rho2).
    rho, e = 0.1, np.eye(8, dtype=np.float32)
    ring = [e[0] + rho * (np.cos(t) * e[1] + np.sin(t) * e[2]) for t in np.arange(5) * 2 * np.pi / 5]
    x = np.stack([e[0], *ring, e[0] + np.sqrt(1.5) * rho * e[3], e[4], e[4] + np.sqrt(2) * rho * e[5]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    lab = np.array([0, 0, 0, 0, 0, 0, 1, 2, 3])
    fake = np.array([True, False, False, False, False, False, False, True, False])
    stats = {}
    got = bottom_up_merge(x, lab, 1, 0.0, is_fake=fake, k_init=1, stats=stats)
    assert got.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 2]  # f-R merges A and B, not C and D
    np.testing.assert_array_equal(got, reference_buc(x, lab, 1, 0.0, is_fake=fake))
    assert stats["grown_rows"][0] == 9 and max(stats["grown_rows"][1:]) <= 2  # only f and c grow


def test_two_real_rows_with_short_lists_both_grow():
    # Real hubs i and j each sit at the centre of their own cluster's members (squared distance
    # 0.01, members 0.02 apart), which fill their lists; i-j (0.013) is the closest cross pair but
    # is listed by neither, while a fake-real pair c-dd (0.016) elsewhere is listed.
    e, rho = np.eye(16, dtype=np.float32), 0.1
    i, j = e[0], e[0] + np.sqrt(0.013) * e[6]
    x = np.stack([i, *(i + rho * e[1:6]), j, *(j + rho * e[7:12]), e[12], e[12] + np.sqrt(0.016) * e[13]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    lab = np.repeat([0, 1, 2, 3], [6, 6, 1, 1])
    fake = np.arange(14) == 12
    got = bottom_up_merge(x, lab, 1, 0.0, is_fake=fake, k_init=1)
    assert got.tolist() == [0] * 12 + [1, 2]
    np.testing.assert_array_equal(got, reference_buc(x, lab, 1, 0.0, is_fake=fake))


@pytest.mark.parametrize("seed,n,d,dup", CASES)
def test_torch_backend_equals_faiss_backend(seed, n, d, dup):
    rng = np.random.default_rng(seed + 200)
    x = unit_features(rng, n, d, dup)
    fake = rng.random(n) < 0.5
    for kwargs in ({}, {"is_fake": fake}):
        a = bottom_up_merge(x, np.arange(n), n // 4, 0.01, backend="faiss", k_init=4, **kwargs)
        b = bottom_up_merge(torch.from_numpy(x), np.arange(n), n // 4, 0.01, backend="torch",
                            device="cpu", block_size=37, k_init=4, **kwargs)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, reference_buc(x, np.arange(n), n // 4, 0.01, **kwargs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_penalty_from_singletons_is_single_linkage(seed):
    rng = np.random.default_rng(seed + 300)
    n = 120
    x = unit_features(rng, n, 12)
    for m in (10, 60, 119):
        got = bottom_up_merge(x, np.arange(n), m, 0.0)
        tree = linkage(x.astype(np.float64), method="single", metric="sqeuclidean")
        want = fcluster(tree, t=n - m, criterion="maxclust")
        np.testing.assert_array_equal(got, canonical(want))


def test_adaptive_k_grows_for_tight_clusters():
    rng = np.random.default_rng(7)
    n, d = 160, 16
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:50] = x[0] + 1e-3 * rng.standard_normal((50, d)).astype(np.float32)  # a tight blob
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # (a) singletons: the blob's 49 internal unions come first, then its rows need outside pairs
    stats = {}
    got = bottom_up_merge(x, np.arange(n), 80, 0.005, k_init=2, stats=stats)
    np.testing.assert_array_equal(got, reference_buc(x, np.arange(n), 80, 0.005))
    assert stats["rounds"] > 1 and stats["k_max"] > 2
    # (b) the blob is already one cluster: all of its members' neighbours are same-cluster
    lab = np.concatenate([np.zeros(50, dtype=np.int64), np.arange(1, n - 49)])
    stats = {}
    got = bottom_up_merge(x, lab, 40, 0.0, k_init=3, stats=stats)
    np.testing.assert_array_equal(got, reference_buc(x, lab, 40, 0.0))
    assert stats["k_max"] > 3
    # (c) merging everything still works (unions run out until the lists cover the database)
    assert (bottom_up_merge(x, lab, n - 50, 0.0, k_init=1) == 0).all()


def test_zero_merges_only_relabels():
    x = unit_features(np.random.default_rng(0), 5, 4)
    assert bottom_up_merge(x, [2, 0, 2, 1, 0], 0, 0.01).tolist() == [0, 1, 0, 2, 1]


def test_errors():
    x = unit_features(np.random.default_rng(0), 6, 4)
    lab = np.arange(6)
    with pytest.raises(ValueError, match="num_merges=6 is more than the 5 possible"):
        bottom_up_merge(x, lab, 6, 0.0)
    with pytest.raises(ValueError, match="all samples are fake"):
        bottom_up_merge(x, lab, 1, 0.0, is_fake=np.ones(6, dtype=bool))
    with pytest.raises(ValueError, match="num_merges must be >= 0"):
        bottom_up_merge(x, lab, -1, 0.0)
    with pytest.raises(ValueError, match="num_merges must be an integer"):
        bottom_up_merge(x, lab, 1.5, 0.0)
    with pytest.raises(ValueError, match="size_penalty"):
        bottom_up_merge(x, lab, 1, -0.1)
    with pytest.raises(ValueError, match="size_penalty"):
        bottom_up_merge(x, lab, 1, float("nan"))
    with pytest.raises(ValueError, match="metric"):
        bottom_up_merge(x, lab, 1, 0.0, metric="cosine")
    with pytest.raises(ValueError, match="backend"):
        bottom_up_merge(x, lab, 1, 0.0, backend="annoy")
    with pytest.raises(ValueError, match="not contiguous"):
        bottom_up_merge(x, [0, 0, 2, 2, 3, 3], 1, 0.0)
    with pytest.raises(ValueError, match="length 5"):
        bottom_up_merge(x, lab[:5], 1, 0.0)
    with pytest.raises(ValueError, match="is_fake must have shape"):
        bottom_up_merge(x, lab, 1, 0.0, is_fake=np.zeros(5, dtype=bool))
    with pytest.raises(ValueError, match="is_fake must be boolean"):
        bottom_up_merge(x, lab, 1, 0.0, is_fake=np.full(6, 0.5))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        bottom_up_merge(bad, lab, 1, 0.0)
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        bottom_up_merge(torch.from_numpy(bad), lab, 1, 0.0, backend="torch")
