"""Market-1501-sized evaluation: vectorised ``ureid.evaluation.evaluate`` vs the per-query reference.

    .venv/bin/python benchmarks/evaluation.py               # 3,368 queries x 19,732 gallery
    .venv/bin/python benchmarks/evaluation.py --queries 500 # quicker
    .venv/bin/python benchmarks/evaluation.py --search      # `ureid search`'s ranking instead (below)
    .venv/bin/python benchmarks/evaluation.py --rerank      # re-ranking from features vs from three matrices

Identities mimic Market-1501: ~750 ids over 6 cameras, some gallery images with id 0 (distractors)
and -1 (junk). Distances are random with matches pulled closer by a per-query amount, so mAP and rank-1 are
non-trivial (not a trained model: only the timing and the agreement matter).
Peak memory is measured with ``tracemalloc`` (numpy registers its buffers with it) around the
evaluation call only, so the input distance matrix is not counted; times include tracemalloc's
(small) overhead, identically for both implementations.

``--search``: what ``ureid search`` does with a large gallery, ``ureid.evaluation.nearest`` (queries in
chunks, each row's top k by a partition) against what it did before 7 December 2026 (the whole query x
gallery matrix from ``pairwise_distance``, then a stable argsort of every row): random unit features,
``--search-queries`` x ``--search-gallery`` (d = ``--dim``), top ``--top``; same indices required.

``--rerank``: k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3) as ``ureid evaluate --rerank`` runs it,
``re_ranking_features`` (rows of the distance matrix computed from the features when needed), against
``re_ranking`` of the three Euclidean matrices (Q x G, Q x Q, G x G, their building counted): clustered unit
features of ``--queries`` x ``--gallery`` (Market-1501's sizes by default, d = ``--dim``).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from ureid.evaluation import evaluate, nearest, pairwise_distance, re_ranking, re_ranking_features
from ureid.evaluation.reference import reference_evaluate


def market_like(num_query: int, num_gallery: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, 751, num_query)
    g_pids = rng.integers(1, 751, num_gallery)
    g_pids[rng.random(num_gallery) < 0.15] = 0  # distractors
    g_pids[rng.random(num_gallery) < 0.13] = -1  # junk detections
    q_cams, g_cams = rng.integers(1, 7, num_query), rng.integers(1, 7, num_gallery)
    dist = rng.random((num_query, num_gallery), dtype=np.float32)
    # Matches are pulled closer by a random amount scaled by a per-query "ease", so some queries are
    # easy and some hard, as with a real model.
    qi = np.nonzero(q_pids[:, None] == g_pids[None, :])[0]
    ease = rng.random(num_query)
    dist[q_pids[:, None] == g_pids[None, :]] -= (ease[qi] * rng.random(qi.size)).astype(np.float32)
    return dist, q_pids, g_pids, q_cams, g_cams


def measure(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, seconds, peak


def full_sort_search(q, g, k):
    """The search before ``nearest``: the whole distance matrix, a stable argsort of each row."""
    d = pairwise_distance(q, g)
    return np.stack([np.argsort(row, kind="stable")[:k] for row in d])


def search_table(num_query: int, num_gallery: int, dim: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((num_gallery, dim), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = g[rng.choice(num_gallery, num_query, replace=False)] + 0.1 * rng.standard_normal((num_query, dim),
                                                                                         dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    print(f"search: {num_query} queries x {num_gallery:,} gallery, d = {dim}, top {k} (features "
          f"{g.nbytes / 2**20:.0f} MB, not counted)\n")
    (ours, _), t_ours, m_ours = measure(lambda: nearest(q, g, k))
    ref, t_ref, m_ref = measure(lambda: full_sort_search(q, g, k))
    print("| implementation | time (s) | peak memory (MB) |")
    print("|---|---:|---:|")
    print(f"| `nearest` (chunks, partition) | {t_ours:.2f} | {m_ours:.0f} |")
    print(f"| full matrix + stable argsort per row | {t_ref:.2f} | {m_ref:.0f} |")
    print(f"\nsame indices: {'yes' if np.array_equal(ours, ref) else 'NO'}; speed-up x{t_ref / t_ours:.1f}, "
          f"memory x{m_ref / max(m_ours, 1e-9):.1f}")


def rerank_table(num_query: int, num_gallery: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = num_query + num_gallery
    centres = rng.standard_normal((max(1, n // 16), dim), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.04 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q, g = x[:num_query], x[num_query:]
    print(f"re-ranking: {num_query:,} queries x {num_gallery:,} gallery, d = {dim} (features "
          f"{x.nbytes / 2**20:.0f} MB, not counted)\n")
    ours, t_ours, m_ours = measure(lambda: re_ranking_features(q, g))

    def matrices():
        return re_ranking(pairwise_distance(q, g, "euclidean"), pairwise_distance(q, q, "euclidean"),
                          pairwise_distance(g, g, "euclidean"))

    ref, t_ref, m_ref = measure(matrices)
    print("| implementation | time (s) | peak memory (MB) |")
    print("|---|---:|---:|")
    print(f"| `re_ranking_features` (rows from the features) | {t_ours:.1f} | {m_ours:.0f} |")
    print(f"| `re_ranking` of the three distance matrices (built) | {t_ref:.1f} | {m_ref:.0f} |")
    print(f"\nmax |difference| {np.abs(ours - ref).max():.1e}; memory x{m_ref / max(m_ours, 1e-9):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=3368, help="number of queries (Market-1501: 3,368)")
    parser.add_argument("--gallery", type=int, default=19732, help="gallery size (Market-1501: 19,732)")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search", action="store_true", help="ureid search's ranking instead (see above)")
    parser.add_argument("--search-queries", type=int, default=2000)
    parser.add_argument("--search-gallery", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1280, help="feature size (the CPU presets' MobileNetV2: 1280)")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--rerank", action="store_true", help="re-ranking from features vs from matrices (above)")
    args = parser.parse_args()
    if args.rerank:
        rerank_table(args.queries, args.gallery, args.dim, args.seed)
        return
    if args.search:
        search_table(args.search_queries, args.search_gallery, args.dim, args.top, args.seed)
        return

    data = market_like(args.queries, args.gallery, args.seed)
    print(f"distmat {args.queries} x {args.gallery} float32 ({data[0].nbytes / 2**20:.0f} MB, not counted)\n")
    ours, t_ours, m_ours = measure(lambda: evaluate(*data, chunk_size=args.chunk_size))
    (ref_map, ref_cmc, ref_valid), t_ref, m_ref = measure(lambda: reference_evaluate(*data))

    print("| implementation | time (s) | peak memory (MB) | mAP | rank-1 |")
    print("|---|---:|---:|---:|---:|")
    rows = [
        (f"ureid `evaluate` (chunk {args.chunk_size})", t_ours, m_ours, ours["mAP"], ours["rank1"]),
        ("per-query reference", t_ref, m_ref, ref_map, ref_cmc[0]),
    ]
    for name, t, m, map_, r1 in rows:
        print(f"| {name} | {t:.2f} | {m:.1f} | {map_:.6f} | {r1:.6f} |")
    agree = (
        abs(ours["mAP"] - ref_map) < 1e-6
        and np.allclose(ours["cmc"], ref_cmc, atol=1e-12)
        and ours["num_valid_queries"] == ref_valid
    )
    print(
        f"\nresults agree: {'yes' if agree else 'NO'} (|mAP diff| = {abs(ours['mAP'] - ref_map):.2e}, "
        f"max |CMC diff| over 20 ranks = {np.abs(ours['cmc'] - ref_cmc).max():.2e}, "
        f"valid queries {ours['num_valid_queries']} vs {ref_valid}); speed-up x{t_ref / t_ours:.1f}"
    )


if __name__ == "__main__":
    main()
