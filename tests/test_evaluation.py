"""ureid.evaluation: Market-1501 CMC/mAP against the official per-query procedure, and re-ranking
against a literal port of Zhong et al.'s code (both references live in ureid.evaluation.reference)."""

import numpy as np
import pytest
import torch

from ureid.evaluation import evaluate, pairwise_distance, re_ranking, valid_queries
from ureid.evaluation.metrics import stable_argsort_rows
from ureid.evaluation.reference import reference_evaluate, reference_re_ranking


def random_problem(seed, nq=40, ng=120, tied=False):
    """Random ids with junk (-1), distractors (0), same-camera matches, unmatched queries and ties."""
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, 12, nq)
    q_pids[:3] = 99  # identity absent from the gallery: no valid match
    g_pids = rng.integers(-1, 12, ng)  # -1 junk and 0 distractors included
    q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    g_pids[:4], g_cams[:4] = 5, 1  # identity 5 only seen by camera 1: same-camera-only queries occur
    q_pids[3], q_cams[3] = 5, 1
    g_pids[g_pids == 5] = np.where(g_cams[g_pids == 5] == 1, 5, 6)
    dist = rng.random((nq, ng))
    if tied:
        dist = np.round(dist * 6)  # 7 distinct values: many ties, broken by gallery index
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("ap", ["trapezoid", "step"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_official_per_query_procedure(seed, ap):
    dist, qp, gp, qc, gc = random_problem(seed, tied=seed % 2 == 1)
    assert (gp == -1).any() and (gp == 0).any()
    ng = dist.shape[1]
    out = evaluate(dist, qp, gp, qc, gc, max_rank=ng + 5, ap=ap, chunk_size=7)
    ref_map, ref_cmc, ref_valid = reference_evaluate(dist, qp, gp, qc, gc, max_rank=ng + 5, ap=ap)
    assert out["num_valid_queries"] == ref_valid < len(qp)  # the unmatched queries were skipped
    assert out["mAP"] == pytest.approx(ref_map, abs=1e-6)
    np.testing.assert_allclose(out["cmc"], ref_cmc, atol=1e-12)
    assert np.isnan(out["ap_per_query"][:4]).all()  # absent identity / same-camera-only matches


def test_ties_matter_and_follow_gallery_index():
    # Same distance for a negative (index 0) and a match (index 1): the negative ranks first.
    out = evaluate(np.zeros((1, 2)), [1], [2, 1], [0], [1, 1])
    assert out["rank1"] == 0.0 and out["mAP"] == pytest.approx((0 + 0.5) / 2)
    out = evaluate(np.zeros((1, 2)), [1], [1, 2], [0], [1, 1])
    assert out["rank1"] == 1.0 and out["mAP"] == 1.0


# g0 same id + same camera (junk), g1 negative, g2 match, g3 id -1 (junk), g4 distractor, g5 match.
HAND_DIST = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
HAND = (HAND_DIST, [1], [1, 2, 1, -1, 0, 1], [0], [0, 1, 1, 1, 2, 2])


def test_hand_computed_case():
    # Junk removed: [neg, match, distractor, match] -> matches at positions 2 and 4.
    trap = evaluate(*HAND, max_rank=5)
    # i=1, r=2: p=1/2, p_old=0/1;  i=2, r=4: p=2/4, p_old=1/3.  AP = 1/2*(0+1/2)/2 + 1/2*(1/3+1/2)/2 = 1/3
    assert trap["mAP"] == pytest.approx(1 / 3, abs=1e-12)
    assert evaluate(*HAND, ap="step")["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2, abs=1e-12)
    np.testing.assert_array_equal(trap["cmc"], [0, 1, 1, 1, 1])
    assert (trap["rank1"], trap["rank5"], trap["num_valid_queries"]) == (0.0, 1.0, 1)


def test_hand_computed_first_hit_uses_initial_precision_one():
    # Matches at positions 1 and 3 of [match, neg, match].
    dist, q, g, qc, gc = np.array([[0.0, 1.0, 2.0]]), [3], [3, 4, 3], [0], [1, 1, 2]
    # i=1, r=1: (1 + 1)/2;  i=2, r=3: (1/2 + 2/3)/2;  each weighted 1/2 -> 19/24
    assert evaluate(dist, q, g, qc, gc)["mAP"] == pytest.approx(19 / 24, abs=1e-12)
    assert evaluate(dist, q, g, qc, gc, ap="step")["mAP"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-12)


def test_skipped_query_does_not_count():
    dist = np.vstack([HAND_DIST, HAND_DIST])
    out = evaluate(dist, [1, 7], HAND[2], [0, 0], HAND[4], ap="step")
    assert out["num_valid_queries"] == 1 and out["mAP"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no query has a valid gallery match"):
        evaluate(HAND_DIST, [7], HAND[2], [0], HAND[4])


def test_rank_k_beyond_max_rank_and_cmc_consistency():
    dist, qp, gp, qc, gc = random_problem(3)
    full = evaluate(dist, qp, gp, qc, gc, max_rank=20)
    short = evaluate(dist, qp, gp, qc, gc, max_rank=5)
    assert len(short["cmc"]) == 5 and short["rank20"] == full["rank20"] == full["cmc"][19]
    assert [full[f"rank{k}"] for k in (1, 5, 10)] == [full["cmc"][k - 1] for k in (1, 5, 10)]
    assert np.all(np.diff(full["cmc"]) >= 0) and 0 <= full["mAP"] <= 1


def test_chunk_size_invariance_and_torch_input():
    dist, qp, gp, qc, gc = random_problem(4, tied=True)
    base = evaluate(dist, qp, gp, qc, gc)
    for chunk in (1, 3, 1000):
        other = evaluate(dist, qp, gp, qc, gc, chunk_size=chunk)
        assert other["mAP"] == base["mAP"]
        np.testing.assert_array_equal(other["cmc"], base["cmc"])
    t = evaluate(torch.from_numpy(dist), *(torch.from_numpy(x) for x in (qp, gp, qc, gc)))
    assert t["mAP"] == base["mAP"]
    np.testing.assert_array_equal(t["cmc"], base["cmc"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ap": "interpolated"}, r"ap must be one of \('trapezoid', 'step'\)"),
        ({"query_pids": [1, 2]}, "query_pids"),
        ({"gallery_pids": [1, 2]}, "gallery_pids"),
        ({"query_cams": [0, 0]}, "query_cams"),
        ({"gallery_cams": [0]}, "gallery_cams"),
        ({"gallery_pids": [1.0, 2, 1, -1, 0, 1]}, "gallery_pids must hold integers"),
        ({"distmat": HAND_DIST[0]}, "distmat must be 2-D"),
        ({"distmat": np.array([[0.1, np.nan, 0.3, 0.4, 0.5, 0.6]])}, "NaN"),
        ({"max_rank": 0}, "max_rank"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_invalid_inputs(kwargs, match):
    args = dict(zip(["distmat", "query_pids", "gallery_pids", "query_cams", "gallery_cams"], HAND))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        evaluate(**args)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("levels", [None, 1e6, 1e3, 10])
def test_stable_argsort_rows_matches_numpy_stable(levels, dtype):
    rng = np.random.default_rng(0)
    d = rng.random((20, 3000)) - 0.5
    if levels:  # from a few ties per row to ties everywhere; k/levels is not exact in float32
        d = np.round(d * levels) / levels
    d = d.astype(dtype)
    d[:, ::97] = -0.0  # -0.0 == 0.0: a tie, ordered by index like any other
    np.testing.assert_array_equal(stable_argsort_rows(d), np.argsort(d, axis=1, kind="stable"))


def test_pairwise_distance():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(7, 5)), rng.normal(size=(11, 5))
    diff = q[:, None, :] - g[None, :, :]
    sq = (diff**2).sum(-1)
    cos = 1 - (q @ g.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(g, axis=1)[None, :]
    np.testing.assert_allclose(pairwise_distance(q, g, chunk_size=3), sq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pairwise_distance(q, g, "euclidean"), np.sqrt(sq), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pairwise_distance(torch.from_numpy(q), g, "cosine"), cos, atol=1e-6)
    assert pairwise_distance(q, q).dtype == np.float32 and (np.diag(pairwise_distance(q, q)) >= 0).all()
    with pytest.raises(ValueError, match="metric must be one of"):
        pairwise_distance(q, g, "manhattan")
    with pytest.raises(ValueError, match="dim 5 but gallery_features have dim 4"):
        pairwise_distance(q, g[:, :4])


@pytest.mark.parametrize("k", [1, 3, 40, 200])
def test_nearest_is_the_stable_argsort_of_each_row_in_chunks(k):
    """``nearest`` gives each query's ``argsort(kind="stable")[:k]`` of ``pairwise_distance`` exactly, ties
    in gallery order (features on a coarse grid: many exact ties, also at the k-th place), whatever the
    chunk of queries, with a skipped gallery row per query and rows padded when too few are left."""
    from ureid.evaluation import nearest, nearest_by_distance

    rng = np.random.default_rng(3)
    g = rng.integers(0, 3, size=(40, 4)).astype(np.float32)
    q = np.concatenate([g[:5], rng.integers(0, 3, size=(6, 4)).astype(np.float32)])
    skip = np.array([0, 1, 2, 3, 4] + [-1] * 6)
    full = pairwise_distance(q, g)
    full[np.arange(5), skip[:5]] = np.inf
    want = np.argsort(full, axis=1, kind="stable")[:, :min(k, 40)]
    ordered = np.sort(full, axis=1)
    assert k >= 40 or (ordered[:, k - 1] == ordered[:, k]).any()  # ties across the k-th place
    for chunk_bytes in (1, 4 * 40 * 4, 2**20):
        idx, dist = nearest(q, g, k, skip=skip, chunk_bytes=chunk_bytes)
        assert idx.shape == dist.shape == (11, min(k, 40)) and dist.dtype == np.float32
        finite = np.isfinite(np.take_along_axis(full, want, 1))
        np.testing.assert_array_equal(np.where(finite, want, -1), idx)
        np.testing.assert_array_equal(np.where(finite, np.take_along_axis(full, want, 1), np.nan), dist)
        if k >= 40:  # a skipped query has 39 rows: its last place is empty
            assert (idx[:5, -1] == -1).all() and np.isnan(dist[:5, -1]).all() and (idx[5:, -1] >= 0).all()
    # the same on a given matrix (re-ranked distances, say), which it leaves as it was
    given = pairwise_distance(q, g)
    kept = given.copy()
    by_matrix = nearest_by_distance(given, k, skip=skip)
    np.testing.assert_array_equal(by_matrix[0], nearest(q, g, k, skip=skip)[0])
    np.testing.assert_array_equal(by_matrix[1], nearest(q, g, k, skip=skip)[1])
    np.testing.assert_array_equal(given, kept)
    given.flags.writeable = False  # nothing to skip: read in place, no copy of the matrix
    for none in (None, np.full(11, -1)):
        got = nearest_by_distance(given, k, skip=none)
        np.testing.assert_array_equal(got[0], nearest(q, g, k)[0])
        np.testing.assert_array_equal(got[1], nearest(q, g, k)[1])
    np.testing.assert_array_equal(given, kept)
    with pytest.raises(ValueError, match="dist must be a 2-D"):
        nearest_by_distance(given[0], 3)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        nearest(q, g, 0)
    with pytest.raises(ValueError, match="skip must hold one gallery index"):
        nearest(q, g, 3, skip=[40] * 11)


def euclidean_blocks(q, g):
    return (pairwise_distance(q, g, "euclidean"), pairwise_distance(q, q, "euclidean"),
            pairwise_distance(g, g, "euclidean"))


@pytest.mark.parametrize("k1, k2, lam", [(20, 6, 0.3), (5, 3, 0.5), (4, 1, 0.0), (60, 70, 1.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_re_ranking_equals_reference_port(seed, k1, k2, lam):
    rng = np.random.default_rng(seed)
    qg, qq, gg = euclidean_blocks(rng.normal(size=(15, 8)), rng.normal(size=(40, 8)))
    ours = re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam, chunk_size=6)
    ref = reference_re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
    assert ours.shape == (15, 40) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_re_ranking_with_tied_distances_chunks_and_torch():
    rng = np.random.default_rng(2)  # integer features: many equal distances
    qg, qq, gg = euclidean_blocks(rng.integers(0, 3, (15, 3)).astype(float), rng.integers(0, 3, (40, 3)).astype(float))
    ref = reference_re_ranking(qg, qq, gg)
    for chunk in (1, 7, 500):
        np.testing.assert_allclose(re_ranking(qg, qq, gg, chunk_size=chunk), ref, atol=1e-5)
    as_torch = re_ranking(*(torch.from_numpy(x) for x in (qg, qq, gg)))
    np.testing.assert_allclose(as_torch, ref, atol=1e-5)


def test_re_ranking_helps_on_clustered_toy_problem():
    rng = np.random.default_rng(0)
    n_ids, cams = 25, 3
    centres = rng.normal(size=(n_ids, 16))
    pids = np.repeat(np.arange(1, n_ids + 1), cams * 2)
    camids = np.tile(np.repeat(np.arange(cams), 2), n_ids)
    feats = centres[pids - 1] + 0.9 * rng.normal(size=(len(pids), 16))
    is_q = np.zeros(len(pids), bool)
    is_q[:: cams * 2] = True  # the first image of each identity is its query
    qg, qq, gg = euclidean_blocks(feats[is_q], feats[~is_q])
    args = (pids[is_q], pids[~is_q], camids[is_q], camids[~is_q])
    before = evaluate(qg, *args)["mAP"]
    after = evaluate(re_ranking(qg, qq, gg, k1=6, k2=3), *args)["mAP"]
    assert after > before  # deterministic seed: 0.61 -> 0.69


def test_re_ranking_from_features_equals_the_three_matrices():
    """``re_ranking_features`` computes ``original_dist`` rows from the features (no Q x Q, Q x G or G x G
    matrix): the reference's re-ranking of the three Euclidean blocks, on clustered unit features (as a run's)
    and on features with many exact ties, for any chunk; and a NaN feature is named."""
    from ureid.evaluation import re_ranking_features

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(12, 32))
    feats = centres[rng.integers(0, 12, 70)] + 0.6 * rng.normal(size=(70, 32))
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
    ties = rng.integers(0, 3, (55, 3)).astype(np.float32)
    for x, nq, k1, k2 in ((feats, 14, 20, 6), (ties, 15, 20, 6), (feats, 10, 5, 1)):
        ref = reference_re_ranking(*euclidean_blocks(x[:nq], x[nq:]), k1=k1, k2=k2)
        for chunk in (1, 9, 500):
            got = re_ranking_features(x[:nq], torch.from_numpy(x[nq:]), k1=k1, k2=k2, chunk_size=chunk)
            assert got.shape == (nq, len(x) - nq) and got.dtype == np.float32
            np.testing.assert_allclose(got, ref, atol=1e-5)
    bad = feats.copy()
    bad[20, 3] = np.nan
    with pytest.raises(ValueError, match=r"gallery_features has a NaN or infinite value in row 6"):
        re_ranking_features(bad[:14], bad[14:])
    with pytest.raises(ValueError, match="must be non-empty"):
        re_ranking_features(feats[:3], feats[3:, :5])


def test_re_ranking_reports_the_rows_of_every_pass():
    """``progress(done, total)`` after each chunk of each pass: ``done`` rises to ``total`` = 3N + Q (2N + Q
    without the query expansion, k2 = 1), and the distances are those of a call without it."""
    from ureid.evaluation import re_ranking_features

    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 16)).astype(np.float32)
    for k2, total in ((6, 3 * 40 + 12), (1, 2 * 40 + 12)):
        calls = []
        got = re_ranking_features(x[:12], x[12:], k1=5, k2=k2, chunk_size=7, progress=lambda *a: calls.append(a))
        np.testing.assert_array_equal(got, re_ranking_features(x[:12], x[12:], k1=5, k2=k2, chunk_size=7))
        done = [c[0] for c in calls]
        assert {c[1] for c in calls} == {total} and done[-1] == total
        assert all(0 < b - a <= 7 for a, b in zip([0, *done], done)), done
    calls = []
    re_ranking(*euclidean_blocks(x[:12], x[12:]), k1=5, progress=lambda *a: calls.append(a))
    assert calls[-1] == (3 * 40 + 12, 3 * 40 + 12) and len(calls) == 4  # one chunk (256 rows) per pass


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"q_q_dist": np.zeros((3, 3))}, "q_q_dist must have shape"),
        ({"g_g_dist": np.zeros((4, 5))}, "g_g_dist must have shape"),
        ({"q_g_dist": np.full((2, 4), np.nan)}, "q_g_dist contains NaN"),
        ({"g_g_dist": np.diag([1.0, 1.0, np.nan, 1.0])}, r"g_g_dist contains NaN \(column 2\)"),
        ({"k1": 0}, "k1 must be a positive int"),
        ({"k2": 2.5}, "k2 must be a positive int"),
        ({"lambda_value": 1.5}, r"lambda_value must be in \[0, 1\]"),
    ],
)
def test_re_ranking_invalid_inputs(kwargs, match):
    args = {"q_g_dist": np.ones((2, 4)), "q_q_dist": np.ones((2, 2)), "g_g_dist": np.ones((4, 4))}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        re_ranking(**args)


def test_valid_queries_are_those_evaluate_scores():
    """From the identities alone: a query counts when the gallery holds its identity from another camera
    (identity -1 junk on both sides), as evaluate's skipped queries (NaN AP) say on random splits."""
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        q, g = int(rng.integers(1, 30)), int(rng.integers(1, 60))
        qp, qc = rng.integers(-1, 6, q), rng.integers(0, 3, q)
        gp, gc = rng.integers(-1, 6, g), rng.integers(0, 3, g)
        got = valid_queries(qp, qc, gp, gc)
        try:
            want = ~np.isnan(evaluate(rng.random((q, g)), qp, gp, qc, gc)["ap_per_query"])
        except ValueError:  # no valid query at all
            want = np.zeros(q, dtype=bool)
        assert np.array_equal(got, want)
        seen.add((bool(want.any()), bool(want.all())))
    assert seen == {(False, False), (True, False), (True, True)}  # none, some and every query valid
    assert not valid_queries([3], [0], [], []).any() and not valid_queries([3], [0], [3, 3], [0, 0]).any()
    assert valid_queries([3, -1], [0, 0], [3, -1], [1, 1]).tolist() == [True, False]
