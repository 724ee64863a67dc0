"""Label-free stage scores: equal to scikit-learn's definitions, deterministic, and they rank a partition
that matches well-separated blobs above a random one."""

import numpy as np
import pytest
from conftest import assert_scores_close
from sklearn.metrics import adjusted_rand_score, davies_bouldin_score, normalized_mutual_info_score, silhouette_score

from ureid.evaluation.label_free import (agreement, davies_bouldin, label_free_scores, silhouette,
                                         soft_neighborhood_density)


def _blobs(n_ids=8, per_id=25, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    labels = np.repeat(np.arange(n_ids), per_id)
    x = centres[labels] + rng.normal(size=(labels.size, dim)) * 0.15
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def test_scores_equal_scikit_learn_on_unit_features():
    x, labels = _blobs()
    noisy = labels.copy()
    noisy[::7] = (noisy[::7] + 1) % 8
    assert silhouette(x, noisy, sample=None) == pytest.approx(silhouette_score(x, noisy, metric="sqeuclidean"), abs=1e-6)
    assert davies_bouldin(x, noisy, sample=None) == pytest.approx(davies_bouldin_score(x, noisy), rel=1e-6)
    got = agreement(labels, noisy)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(labels, noisy), abs=1e-9)
    assert got["ari"] == pytest.approx(adjusted_rand_score(labels, noisy), abs=1e-9)
    assert agreement(labels, labels) == {"nmi": 1.0, "ari": 1.0}


def test_a_sample_of_rows_is_exact_for_those_rows_and_deterministic():
    x, labels = _blobs()
    a = label_free_scores(x, labels, previous=labels // 2, sample=64, seed=3)
    b = label_free_scores(x, labels, previous=labels // 2, sample=64, seed=3)
    assert a == b and set(a) == {"lf_silhouette", "lf_davies_bouldin", "lf_snd", "lf_nmi_previous", "lf_ari_previous"}
    rows = np.sort(np.random.default_rng(3).choice(len(x), 64, replace=False))
    from sklearn.metrics import silhouette_samples

    assert a["lf_silhouette"] == pytest.approx(silhouette_samples(x, labels, metric="sqeuclidean")[rows].mean(), abs=1e-6)


def test_blob_partition_scores_better_than_a_random_one():
    x, labels = _blobs()
    shuffled = np.random.default_rng(1).permutation(labels)
    assert silhouette(x, labels) > 0.5 > silhouette(x, shuffled)
    assert davies_bouldin(x, labels) < davies_bouldin(x, shuffled)
    # SND is high when each sample has a dense neighbourhood: in a blob of 25 the softmax spreads evenly
    # over the 24 others (entropy near log 24); in structureless features it falls on a few.
    spread = np.random.default_rng(2).normal(size=x.shape)
    spread /= np.linalg.norm(spread, axis=1, keepdims=True)
    assert soft_neighborhood_density(x) == pytest.approx(np.log(24), abs=0.05)
    assert soft_neighborhood_density(x) > soft_neighborhood_density(spread) + 1.0


def test_outliers_and_degenerate_partitions():
    x, labels = _blobs()
    with_outliers = labels.copy()
    with_outliers[:10] = -1
    assert silhouette(x, with_outliers) == pytest.approx(silhouette(x[10:], labels[10:]))
    assert silhouette(x, np.zeros(len(x), int)) == 0.0
    assert davies_bouldin(x, np.arange(len(x))) == float("inf")
    with pytest.raises(ValueError, match="differ in length"):
        agreement(labels, labels[:-1])


def test_rank_correlations_equal_scipy_with_ties():
    from scipy import stats

    from ureid.evaluation.label_free import kendall, spearman

    rng = np.random.default_rng(0)
    for n in (5, 40, 200):
        x = rng.integers(0, 6, n).astype(float)  # many ties
        y = x + rng.normal(0, 2, n)
        y[: n // 4] = np.round(y[: n // 4])
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert kendall(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1) and kendall([1, 2, 3], [1, 2, 3]) == pytest.approx(1)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_memory_bounded_pieces_give_the_scores_of_one_block_and_overwrite_scales_in_place(monkeypatch):
    """At large N the float64 work is cut into pieces of rows (and the cluster means into bands of columns),
    so that no (1,024, N) float64 block is formed: the scores are those of one block (up to the float32
    products' rounding, see ``assert_scores_close``). With ``overwrite`` the caller's float32 matrix is scaled
    to unit length in place, with the same scores."""
    from ureid.evaluation import label_free as lf

    rng = np.random.default_rng(0)
    n, d = 5000, 128
    x = ((rng.normal(size=(250, d))[np.arange(n) % 250] + 0.5 * rng.normal(size=(n, d))) * 3).astype(np.float32)
    labels = np.where(rng.random(n) < 0.8, np.arange(n) + 1000, np.arange(n) % 250)  # ~4,250 clusters
    labels[:50] = -1
    monkeypatch.setattr(lf, "_BLOCK_BYTES", 1 << 40)
    monkeypatch.setattr(lf, "_MEANS_BYTES", 1 << 40)
    whole = lf.label_free_scores(x, labels, labels // 2, seed=1)
    monkeypatch.setattr(lf, "_BLOCK_BYTES", 8 * n * 100)
    sizes = [r.size for _, r in lf._pieces(np.arange(2048), n, 1024)]
    assert sum(sizes) == 2048 and 1 < min(sizes) and max(sizes) <= 100
    assert_scores_close(lf.label_free_scores(x, labels, labels // 2, seed=1), whole)
    monkeypatch.setattr(lf, "_MEANS_BYTES", 4 * d * 300)  # the means formed 150-300 clusters at a time
    clusters = lf._Clusters(labels)
    blocks = clusters.blocks(np.arange(clusters.count), d)
    assert len(blocks) > 10 and min(b.size for b in blocks) >= 150
    assert len(clusters.blocks(np.flatnonzero(clusters.sizes > 1), d)) == 1  # the 250 non-singletons: one block
    assert_scores_close(lf.label_free_scores(x, labels, labels // 2, seed=1), whole)
    merged = np.where(labels >= 0, labels % 1000, -1)  # 1,000 clusters, every one of them a non-singleton
    monkeypatch.setattr(lf, "_MEANS_BYTES", 1 << 40)
    one = lf.label_free_scores(x, merged, seed=1)
    monkeypatch.setattr(lf, "_MEANS_BYTES", 4 * d * 128)
    assert len(lf._Clusters(merged).blocks(np.arange(1000), d)) == 8
    assert_scores_close(lf.label_free_scores(x, merged, seed=1), one)
    y = x.copy()
    assert_scores_close(lf.label_free_scores(y, labels, labels // 2, seed=1, overwrite=True), whole)
    np.testing.assert_array_equal(y, x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    z = x.copy()
    lf.label_free_scores(z, labels, seed=1)  # without overwrite the caller's matrix is left alone
    np.testing.assert_array_equal(z, x)


def test_the_scores_add_no_cluster_means_and_no_copy_without_the_outliers(monkeypatch):
    """At stage 0 of SSL and DBC every sample is a cluster, so all the means are one more feature matrix,
    and Cluster Contrast's outliers made a copy of the features without them: the cluster scores form the
    means a block of clusters at a time and index the kept rows, so beside the unit features they allocate
    O(N) and their fixed blocks (made small here), a small part of one matrix. tracemalloc sees NumPy's
    allocations."""
    import tracemalloc

    from ureid.evaluation import label_free as lf

    rng = np.random.default_rng(0)
    n, d = 20000, 1024  # 80 MB of float32 features
    x = lf._unit(rng.normal(size=(n, d)).astype(np.float32))
    for labels in (np.arange(n), np.where(rng.random(n) < 0.2, -1, rng.integers(0, 3000, n))):
        clusters = lf._Clusters(labels)
        monkeypatch.setattr(lf, "_BLOCK_BYTES", 1 << 40)
        monkeypatch.setattr(lf, "_MEANS_BYTES", 1 << 40)
        whole = lf._cluster_scores(x, clusters, 512, 0, 1024)
        monkeypatch.setattr(lf, "_BLOCK_BYTES", 2 << 20)
        monkeypatch.setattr(lf, "_MEANS_BYTES", 2 << 20)
        tracemalloc.start()
        got = lf._cluster_scores(x, clusters, 512, 0, 1024)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 0.4 * x.nbytes, (peak, x.nbytes)
        names = ("silhouette", "davies_bouldin")
        assert_scores_close(dict(zip(names, got)), dict(zip(names, whole)))
