"""Benchmark: DBC label update and PUL k-means against the public codes' procedures.

    python benchmarks/clustering_dbc_pul.py            # the tables of the report (N = 5,000 and 12,936, DBC 77,616)
    python benchmarks/clustering_dbc_pul.py --quick    # small sizes, a smoke run

Features are clustered random unit vectors (d = 2048, about 17 samples per identity like Market-1501, gaussian
noise around each identity's centre, L2-normalised). Every measurement runs in a fresh ``spawn`` subprocess;
peak memory is the growth of ``ru_maxrss`` after the features are built, so it counts what the algorithm
allocates, not the input. Both sides of a comparison run with the same thread limit (torch, faiss, BLAS and
OpenMP via threadpoolctl), 1 by default: on a shared machine spinning OpenMP workers made run times swing
by 10x or more between identical runs, single-threaded runs were reproducible.

DBC reference: the public code's stage (``Bottom_up.get_new_train_data_v2``): dense N x N float32 distance
matrix, a Python double loop over cluster pairs averaging its blocks (``linkage_calculation``), the whole
C x C matrix argsorted (stable here, so ties go to the smaller index pair), then the merge loop that skips
absorbed clusters. When the double loop would exceed ``loop_budget_s`` it is timed on its first rows and
extrapolated (marked ``extrapolated``); the rest of the matrix is then filled by the equivalent vectorised block
mean so the labels can still be compared. For ``update="merge"`` the reference is SciPy's average linkage on
squared distances (what the paper's per-merge update reduces to with intra_weight = 0).

k-means reference: scikit-learn ``KMeans(n_clusters=k, n_init=...)`` (greedy k-means++, Lloyd).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def clustered_unit_features(n: int, d: int = 2048, seed: int = 0, per_identity: int = 17,
                            noise: float = 0.8) -> np.ndarray:
    """(n, d) float32 unit vectors around n // per_identity random unit centres; |noise vector| ~ ``noise``.

    Built in row chunks in place so that building them does not raise the peak RSS above the array itself.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // per_identity), d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ident = rng.integers(0, centres.shape[0], n)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 4096):
        e = min(n, s + 4096)
        x[s:e] = centres[ident[s:e]] + (noise / math.sqrt(d)) * rng.standard_normal((e - s, d), dtype=np.float32)
        x[s:e] /= np.linalg.norm(x[s:e], axis=1, keepdims=True)
    return x


# --------------------------------------------------------------------------------------- references


def reference_dbc_stage(x: np.ndarray, labels: np.ndarray, num_merges: int, loop_budget_s: float = math.inf):
    """The public DBC stage (intra_weight = 0, which is what its merge uses). Returns labels and timing info."""
    import torch

    t0 = time.perf_counter()
    order = np.argsort(labels, kind="stable")  # sort_image_by_label
    lab_sorted = labels[order]
    feats = torch.from_numpy(x[order])
    m = feats.shape[0]
    dists = feats.pow(2).sum(dim=1, keepdim=True).expand(m, m) + feats.pow(2).sum(dim=1, keepdim=True).expand(m, m).t()
    dists.addmm_(feats, feats.t(), beta=1, alpha=-2)  # calculate_distance
    dist = dists.numpy()
    c = int(labels.max()) + 1
    counts = np.bincount(lab_sorted, minlength=c)
    end = np.cumsum(counts)
    start = end - counts
    t_dist = time.perf_counter() - t0

    t1 = time.perf_counter()
    linkages = np.zeros([c, c])
    rows_done, iters_done = 0, 0
    for i in range(c):  # linkage_calculation's double loop
        for j in range(i, c):
            linkages[i, j] = np.average(dist[start[i]:end[i], start[j]:end[j]])
        rows_done, iters_done = i + 1, iters_done + (c - i)
        if time.perf_counter() - t1 > loop_budget_s:
            break
    t_loop = time.perf_counter() - t1
    total_iters = c * (c + 1) // 2
    extrapolated = rows_done < c
    if extrapolated:
        t_loop *= total_iters / iters_done
        # remaining rows: the same block means (upper triangle only, as the loop), vectorised in row chunks
        for i0 in range(rows_done, c, 256):
            i1 = min(c, i0 + 256)
            sums = np.add.reduceat(np.add.reduceat(dist[start[i0]:end[i1 - 1]], start, axis=1),
                                   start[i0:i1] - start[i0], axis=0)
            means = sums / (counts[i0:i1, None] * counts[None, :])
            linkages[i0:i1] = np.where(np.arange(c)[None, :] >= np.arange(i0, i1)[:, None], means, 0.0)
    del dists, dist

    t2 = time.perf_counter()
    linkages = linkages.T + linkages - linkages * np.eye(c)
    intra = linkages.diagonal()
    penalized = linkages + 0.0 * (intra + intra.T)  # computed (unused) by the public code
    del penalized
    linkages += np.tril(100000 * np.ones_like(linkages))  # select_merge_data_v2
    flat = np.argsort(linkages, axis=None, kind="stable")
    idx1, idx2 = np.unravel_index(flat, linkages.shape)
    del flat
    clusters = {k: list(np.flatnonzero(labels == k)) for k in range(c)}  # generate_new_train_data_v2
    before = len(clusters)
    for a, b in zip(idx1, idx2):
        a, b = int(a), int(b)
        if a not in clusters or b not in clusters:
            continue
        if a < b:
            clusters[a] += clusters.pop(b)
        else:
            clusters[b] += clusters.pop(a)
        if before - len(clusters) == num_merges:
            break
    out = np.empty(len(labels), dtype=np.int64)
    for k, members in clusters.items():
        out[members] = k
    t_rest = time.perf_counter() - t2
    return out, dict(ref_time_s=t_dist + t_loop + t_rest, ref_loop_s=t_loop, extrapolated=extrapolated,
                     ref_loop_rows_run=rows_done)


def reference_average_linkage(x: np.ndarray, num_merges: int) -> np.ndarray:
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    tree = linkage(pdist(x.astype(np.float64), "sqeuclidean"), method="average")
    return fcluster(tree, t=len(x) - num_merges, criterion="maxclust")


# ----------------------------------------------------------------------------------- measurement


def _canonical(labels) -> np.ndarray:
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse]


def _worker(task: str, n: int, d: int, seed: int, threads: int, kwargs: dict) -> dict:
    from threadpoolctl import threadpool_limits

    if task != "kmeans_ref":  # the scikit-learn process loads neither torch nor faiss
        import torch

        from ureid.clustering._common import import_faiss

        faiss = import_faiss()
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    x = clustered_unit_features(n, d, seed)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info: dict = {}
    with threadpool_limits(threads):
        t0 = time.perf_counter()
        if task == "dbc":
            from ureid.clustering.dbc import dispersion_merge

            result = dispersion_merge(x, np.arange(n), kwargs["num_merges"], 0.0, update=kwargs["update"])
        elif task == "dbc_ref_stage":
            result, info = reference_dbc_stage(x, np.arange(n), kwargs["num_merges"], kwargs["loop_budget_s"])
        elif task == "dbc_ref_merge":
            result = reference_average_linkage(x, kwargs["num_merges"])
        elif task == "kmeans":
            from ureid.clustering.pul import kmeans

            result = kmeans(x, kwargs["k"], seed=seed, n_init=kwargs["n_init"])
        elif task == "kmeans_ref":
            from sklearn.cluster import KMeans

            result = KMeans(n_clusters=kwargs["k"], n_init=kwargs["n_init"], random_state=seed).fit(x).labels_
        else:
            raise ValueError(f"unknown task {task!r}")
        elapsed = time.perf_counter() - t0
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # Linux: KiB
    out = dict(time_s=info.pop("ref_time_s", elapsed), peak_mb=peak_mb, labels=_canonical(result), **info)
    if task.startswith("kmeans"):
        from ureid.clustering.pul import inertia

        out["inertia"] = inertia(x, result)
    return out


def _run(task: str, n: int, d: int, seed: int, threads: int, **kwargs) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_worker, (task, n, d, seed, threads, kwargs))


def bench_dbc(n, d=2048, update="stage", run_reference=True, seed=0, threads=1, loop_budget_s=300.0) -> dict:
    """One DBC stage from singletons with num_merges = int(0.05 N), ours vs the reference."""
    num_merges = int(0.05 * n)
    ours = _run("dbc", n, d, seed, threads, num_merges=num_merges, update=update)
    row = dict(n=n, update=update, num_merges=num_merges, ours_time_s=ours["time_s"], ours_peak_mb=ours["peak_mb"])
    if run_reference:
        task = "dbc_ref_stage" if update == "stage" else "dbc_ref_merge"
        ref = _run(task, n, d, seed, threads, num_merges=num_merges, loop_budget_s=loop_budget_s)
        row.update(ref_time_s=ref["time_s"], ref_peak_mb=ref["peak_mb"],
                   same_labels=bool(np.array_equal(ours["labels"], ref["labels"])),
                   extrapolated=ref.get("extrapolated", False))
    return row


def bench_kmeans(n, d=2048, k=750, run_reference=True, seed=0, threads=1, ours_n_init=10,
                 ref_n_init=10) -> dict:
    """Ours (default protocol: 10 restarts) vs scikit-learn KMeans(n_clusters=k, n_init=ref_n_init)."""
    ours = _run("kmeans", n, d, seed, threads, k=k, n_init=ours_n_init)
    row = dict(n=n, k=k, ours_n_init=ours_n_init, ours_time_s=ours["time_s"], ours_peak_mb=ours["peak_mb"],
               ours_inertia=ours["inertia"])
    if run_reference:
        ref = _run("kmeans_ref", n, d, seed, threads, k=k, n_init=ref_n_init)
        row.update(ref_n_init=ref_n_init, ref_time_s=ref["time_s"], ref_peak_mb=ref["peak_mb"],
                   ref_inertia=ref["inertia"], inertia_ratio=ours["inertia"] / ref["inertia"])
        if ref_n_init < 10:  # the restarts are independent: 10 of them take 10 / ref_n_init times as long
            row["ref_time_10_init_extrapolated_s"] = ref["time_s"] * 10 / ref_n_init
    return row


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="threads for both sides")
    parser.add_argument("--only", choices=["dbc", "kmeans"], default=None)
    parser.add_argument("--ref-n-init", type=int, default=None,
                        help="scikit-learn restarts; default 10 below N = 10,000 and 3 above, where 10 take over "
                             "6 minutes on 2 cores (the time of 10 is then extrapolated)")
    args = parser.parse_args(argv)
    sizes = [600, 1500] if args.quick else [5000, 12936]
    if args.only in (None, "dbc"):
        rows = [bench_dbc(n, threads=args.threads) for n in sizes]
        rows += [bench_dbc(n, update="merge", threads=args.threads) for n in sizes]
        rows.append(bench_dbc(3000 if args.quick else 77616, run_reference=False, threads=args.threads))
        print("\n### DBC, one stage from singletons, num_merges = int(0.05 N), intra_weight = 0\n")
        print(_table(rows), flush=True)
    if args.only in (None, "kmeans"):
        k = 50 if args.quick else 750
        rows = [bench_kmeans(n, k=k, threads=args.threads,
                             ref_n_init=args.ref_n_init or (10 if n < 10_000 else 3)) for n in sizes]
        print(f"\n### k-means, K = {k}, d = 2048 (ours: n_init = 10)\n")
        print(_table(rows), flush=True)


if __name__ == "__main__":
    main()
