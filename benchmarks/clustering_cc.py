"""Benchmark: Cluster Contrast's label update, sparse (`ureid.clustering`) vs the public code's dense procedure.

One label update as Cluster Contrast runs it: k-reciprocal Jaccard distance (k1 = 30, k2 = 6), then
DBSCAN (eps = 0.6, min_samples = 4, precomputed). Ours: ``kreciprocal_jaccard(x, 30, 6,
max_distance=0.6)`` and ``dbscan``. The reference follows ``compute_jaccard_distance`` of the public
code (``clustercontrast/utils/faiss_rerank.py``, CPU search option) step by step: one faiss
``IndexFlatL2`` search, Python loops over samples for the k-reciprocal sets and their expansion, a
dense N x N float32 ``V`` filled row by row (torch ``mm`` + ``softmax``), the dense query-expansion
means, an inverted index from ``np.where`` on V's columns, the per-row ``temp_min`` loop into a dense
N x N float32 Jaccard matrix, then ``sklearn.cluster.DBSCAN(metric="precomputed", n_jobs=-1)`` on it.
At N = 77,616 the reference is not run: it would hold two N x N float32 matrices at once (V and
V_qe during query expansion, V and the Jaccard matrix in the last loop), at least 8 N^2 bytes,
which the table prints instead (a lower bound: the measured peak at N = 12,936 is about 1.45 times
8 N^2, with faiss' copy of the features and DBSCAN's temporaries on top).

Features, processes and memory as in ``benchmarks/clustering_buc.py`` (its ``make_features``:
clustered unit vectors, d = 2048, N/10 identities; each measurement in a fresh ``spawn`` process;
peak RSS growth over the RSS after the features were made).

    python benchmarks/clustering_cc.py            # N = 5,000, 12,936 (both) and 77,616 (ours only)
    python benchmarks/clustering_cc.py --quick    # N = 5,000 only
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "platform")]

from clustering_buc import _memory_baseline_mb, _peak_mb, make_features  # noqa: E402

THREADS = 2
K1, K2, EPS, MIN_SAMPLES = 30, 6, 0.6, 4


def reference_jaccard(features, k1=K1, k2=K2):
    """The public code's ``compute_jaccard_distance`` (CPU search), its dense matrices and loops kept."""
    import torch
    import torch.nn.functional as F

    from ureid.clustering._common import import_faiss

    faiss = import_faiss()

    feats = torch.from_numpy(features)
    n = feats.size(0)
    index = faiss.IndexFlatL2(feats.size(-1))
    index.add(features)
    _, initial_rank = index.search(features, k1)

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
        dist = 2 - 2 * torch.mm(feats[i].unsqueeze(0).contiguous(), feats[expansion].t())
        V[i, expansion] = F.softmax(-dist, dim=1).view(-1).numpy()
    del nn_k1, nn_half
    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(n):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    inv_index = [np.where(V[:, c] != 0)[0] for c in range(n)]
    jaccard = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        temp_min = np.zeros((1, n), dtype=np.float32)
        nonzero = np.where(V[i, :] != 0)[0]
        for c in nonzero:
            rows = inv_index[c]
            temp_min[0, rows] = temp_min[0, rows] + np.minimum(V[i, c], V[rows, c])
        jaccard[i] = 1 - temp_min / (2 - temp_min)
    del inv_index, V
    jaccard[jaccard < 0] = 0.0
    return jaccard


def dense_bytes(n: int) -> int:
    """Peak of the reference's N x N float32 matrices: two alive at once (V + V_qe, V + Jaccard)."""
    return 2 * 4 * n * n


def _child(which, n, queue):
    try:
        import torch

        from ureid.clustering._common import import_faiss

        faiss = import_faiss()
        torch.set_num_threads(THREADS)
        faiss.omp_set_num_threads(THREADS)
        from sklearn.cluster import DBSCAN

        from ureid.clustering import dbscan, kreciprocal_jaccard

        x, _ = make_features(n)
        base = _memory_baseline_mb()
        t0 = time.perf_counter()
        stats = {}
        if which == "ours":
            dist = kreciprocal_jaccard(x, K1, K2, max_distance=EPS, stats=stats)
            t1 = time.perf_counter()
            labels = dbscan(dist, EPS, MIN_SAMPLES)
        else:
            dist = reference_jaccard(x)
            t1 = time.perf_counter()
            labels = DBSCAN(eps=EPS, min_samples=MIN_SAMPLES, metric="precomputed", n_jobs=-1).fit_predict(dist)
        t2 = time.perf_counter()
        queue.put({"time_s": t2 - t0, "jaccard_s": t1 - t0, "dbscan_s": t2 - t1, "peak_mb": _peak_mb() - base,
                   "labels": np.asarray(labels, dtype=np.int64), "stored": stats.get("stored_pairs")})
    except BaseException as exc:  # report instead of hanging the parent
        queue.put({"error": repr(exc)})


def _measure(which, n):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(which, n, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if "error" in out:
        raise RuntimeError(f"{which} failed at N = {n}: {out['error']}")
    return out


def _counts(labels):
    return int(labels.max()) + 1, int((labels == -1).sum())


def bench_cc(n: int, run_reference: bool = True) -> dict:
    """Time, peak memory and labels of one label update, ours and (optionally) the public code's."""
    ours = _measure("ours", n)
    res = {"n": n, "ours": ours, "ref": None, "same_labels": None}
    if run_reference:
        res["ref"] = ref = _measure("ref", n)
        res["same_labels"] = bool(np.array_equal(ours["labels"], ref["labels"]))
    return res


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(quick: bool = False) -> None:
    rows = [bench_cc(5000)]
    if not quick:
        rows += [bench_cc(12936), bench_cc(77616, run_reference=False)]
    print(f"d=2048, k1={K1}, k2={K2}, DBSCAN eps={EPS}, min_samples={MIN_SAMPLES}, {THREADS} threads;"
          " ours: kreciprocal_jaccard(max_distance=eps) + dbscan\n")
    print("| N | ours s (Jaccard + DBSCAN) | ours peak MB | stored pairs | public-code s (Jaccard + DBSCAN)"
          " | public-code peak MB | speed-up (x) | memory ratio (x) | clusters / outliers (ours)"
          " | clusters / outliers (public) | same labels |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, p = r["ours"], r["ref"]
        oc = "%d / %d" % _counts(o["labels"])
        if p is None:
            ref_t, ref_mem = "not run", f"needs >= {dense_bytes(r['n']) / 1e9:.1f} GB (8 N^2 bytes, computed)"
            speed = ratio = pc = same = "-"
        else:
            ref_t = f"{p['time_s']:.1f} ({p['jaccard_s']:.1f} + {p['dbscan_s']:.1f})"
            ref_mem, pc = f"{p['peak_mb']:.0f}", "%d / %d" % _counts(p["labels"])
            speed = f"{p['time_s'] / o['time_s']:.1f}"
            ratio = f"{p['peak_mb'] / max(o['peak_mb'], 1.0):.1f}"
            same = "yes" if r["same_labels"] else "no"
        print(f"| {r['n']:,} | {o['time_s']:.1f} ({o['jaccard_s']:.1f} + {o['dbscan_s']:.2f}) | {o['peak_mb']:.0f}"
              f" | {_fmt(o['stored'], ',')} | {ref_t} | {ref_mem} | {speed} | {ratio} | {oc} | {pc} | {same} |",
              flush=True)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
