"""Slow, literal reference implementations, kept only to check the fast ones (tests and benchmarks).

``reference_evaluate`` loops over queries exactly like the official Market-1501 evaluation
(``compute_AP`` of the Matlab code and its Python port in the BUC / Person_reID_baseline code);
``reference_re_ranking`` is a line-by-line port of Zhong et al.'s ``re_ranking.py`` (CVPR 2017) that
holds several dense ``N_all x N_all`` arrays. Do not use either on real data: they are O(Q) Python
loops and O(N_all^2) memory by design.
"""

from __future__ import annotations

import numpy as np


def reference_compute_ap(index, good_index, junk_index, ap: str = "trapezoid"):
    """Official ``compute_AP``: AP and 0/1 CMC vector of one query's ranked gallery ``index``."""
    index = index[np.isin(index, junk_index, invert=True)]  # junk leaves the list before ranking
    rows_good = np.flatnonzero(np.isin(index, good_index))
    ngood = len(good_index)
    cmc = np.zeros(len(index))
    cmc[rows_good[0] :] = 1
    result = 0.0
    for i in range(ngood):
        precision = (i + 1) * 1.0 / (rows_good[i] + 1)
        if ap == "trapezoid":
            old_precision = i * 1.0 / rows_good[i] if rows_good[i] != 0 else 1.0
            result = result + (1.0 / ngood) * (old_precision + precision) / 2
        else:  # torchreid's non-interpolated AP: mean precision at the hits
            result = result + precision / ngood
    return result, cmc


def reference_evaluate(distmat, query_pids, gallery_pids, query_cams, gallery_cams, max_rank=20, ap="trapezoid"):
    """Per-query loop over the Market-1501 protocol; returns ``(mAP, cmc[:max_rank], num_valid_queries)``."""
    distmat = np.asarray(distmat)
    gallery_pids, gallery_cams = np.asarray(gallery_pids), np.asarray(gallery_cams)
    aps, cmcs = [], []
    for i in range(distmat.shape[0]):
        index = np.argsort(distmat[i], kind="stable")
        query_index = np.flatnonzero(gallery_pids == query_pids[i])
        camera_index = np.flatnonzero(gallery_cams == query_cams[i])
        good_index = np.setdiff1d(query_index, camera_index)
        good_index = good_index[gallery_pids[good_index] != -1]  # a -1 query has no real match
        junk_index = np.union1d(np.flatnonzero(gallery_pids == -1), np.intersect1d(query_index, camera_index))
        if good_index.size == 0:
            continue
        a, c = reference_compute_ap(index, good_index, junk_index, ap)
        aps.append(a)
        c = np.concatenate([c, np.full(max(0, max_rank - len(c)), c[-1])])  # past the list: still found
        cmcs.append(c[:max_rank].copy())  # a view would keep the whole gallery-long row alive
    return float(np.mean(aps)), np.mean(cmcs, axis=0), len(aps)


def reference_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """Port of Zhong et al.'s ``re_ranking.py`` (k-reciprocal encoding), loops and dense arrays kept.

    Only change: ``kind="stable"`` in the argsort, so ties are ordered as in ``ureid.evaluation.re_ranking``.
    """
    original_dist = np.concatenate(
        [np.concatenate([q_q_dist, q_g_dist], axis=1), np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0
    )
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)

    query_num = q_g_dist.shape[0]
    all_num = original_dist.shape[0]
    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, : k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, : k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            half = int(np.around(k1 / 2.0)) + 1
            candidate_forward_k_neigh_index = initial_rank[candidate, :half]
            candidate_backward_k_neigh_index = initial_rank[candidate_forward_k_neigh_index, :half]
            fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2.0 / 3 * len(
                candidate_k_reciprocal_index
            ):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, candidate_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = 1.0 * weight / np.sum(weight)
    original_dist = original_dist[:query_num,]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    invIndex = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
                V[i, indNonZero[j]], V[indImages[j], indNonZero[j]]
            )
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:]
