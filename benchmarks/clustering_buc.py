"""Benchmark: exact blockwise BUC merge (`ureid.clustering.bottom_up_merge`) vs the public code's procedure.

The reference follows ``Bottom_up.select_merge_data`` / ``generate_new_train_data`` of the public BUC
code: a dense N x N float32 squared-distance matrix (torch ``addmm``), +100000 on the lower triangle
and on same-cluster pairs, the size penalty added to every entry, ``np.argsort`` of all N^2 entries,
``np.unravel_index``, then one pass that relabels the absorbed cluster (``label[label == b] = a``)
per merge. (The public code marks same-cluster pairs in a Python double loop, which alone takes
minutes at N = 12,936; we vectorise that step, which only makes the reference faster.)

Each measurement runs in a fresh ``spawn`` process; peak memory is that process's peak RSS during the
first stage minus its RSS after the features were generated and the libraries imported, so faiss /
torch / BLAS allocations count. We read the peak from ``/proc/self/status`` (VmHWM) after resetting
it with ``/proc/self/clear_refs`` rather than ``ru_maxrss``: a spawned child's ``ru_maxrss`` starts at
its parent's high-water mark (fork + exec keeps it) and cannot be reset after the feature generation's
temporaries (``ru_maxrss`` is the fallback where /proc is missing).

Features are re-ID-like: unit vectors scattered around N/10 random identity centres (same-identity
cosine ~0.7), fakes scattered around their real source image (cosine ~0.85). ``python benchmarks/clustering_buc.py`` prints the markdown table.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import sys
import time

import numpy as np

THREADS = 2


def make_features(n, d=2048, fake_ratio=0.0, seed=0, chunk=4096):
    """Clustered unit features (float32, generated chunkwise so the baseline RSS is just the array)."""
    rng = np.random.default_rng(seed)
    n_real = n - int(round(n * fake_ratio))
    is_fake = np.zeros(n, dtype=bool)
    is_fake[rng.permutation(n)[:n - n_real]] = True
    real_ids = np.flatnonzero(~is_fake)
    centres = rng.standard_normal((max(1, n // 10), d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    identity = rng.integers(0, len(centres), n_real)
    x = np.empty((n, d), dtype=np.float32)
    sigma_real, sigma_fake = np.sqrt(0.43 / d), np.sqrt(0.18 / d)  # cos ~0.7 / ~0.85, see docstring
    for s in range(0, n_real, chunk):
        rows = real_ids[s:s + chunk]
        v = centres[identity[s:s + chunk]] + sigma_real * rng.standard_normal((rows.size, d), dtype=np.float32)
        x[rows] = v / np.linalg.norm(v, axis=1, keepdims=True)
    fake_ids = np.flatnonzero(is_fake)
    source = real_ids[rng.integers(0, n_real, fake_ids.size)] if fake_ids.size else fake_ids
    for s in range(0, fake_ids.size, chunk):
        v = x[source[s:s + chunk]] + sigma_fake * rng.standard_normal((len(source[s:s + chunk]), d),
                                                                       dtype=np.float32)
        x[fake_ids[s:s + chunk]] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return x, is_fake


def reference_merge(features, labels, num_merges, size_penalty):
    """The public BUC code's label update (dense N x N, full argsort), vectorised where it loops."""
    import torch

    n = len(features)
    x = torch.from_numpy(features)
    sq = (x * x).sum(1, keepdim=True)
    dists = sq.expand(n, n) + sq.expand(n, n).t()
    dists.addmm_(x, x.t(), beta=1, alpha=-2)
    dists.add_(torch.tril(100000 * torch.ones(n, n)))
    lab = torch.from_numpy(labels)
    cnt = torch.bincount(lab)[lab].float()
    dists += size_penalty * (cnt.view(1, n) + cnt.view(n, 1))
    dists[lab.view(n, 1) == lab.view(1, n)] = 100000
    dists = dists.numpy()
    idx1, idx2 = np.unravel_index(np.argsort(dists, axis=None), dists.shape)
    label = labels.copy()
    merged = 0
    for a_i, b_i in zip(idx1, idx2):
        a, b = label[a_i], label[b_i]
        if a == b:
            continue
        label[label == max(a, b)] = min(a, b)
        merged += 1
        if merged == num_merges:
            break
    _, inverse = np.unique(label, return_inverse=True)  # sorted labels = first-index order (min absorbs)
    return inverse.astype(np.int64)


def _status_mb(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024.0


def _memory_baseline_mb():
    """Reset the peak-RSS mark to the current RSS and return it (MB)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_mb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _peak_mb():
    try:
        return _status_mb("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(which, n, d, fake_ratio, seed, stages, queue):
    try:
        import torch

        from ureid.clustering._common import import_faiss

        faiss = import_faiss()
        torch.set_num_threads(THREADS)
        faiss.omp_set_num_threads(THREADS)
        from ureid.clustering.buc import bottom_up_merge

        x, is_fake = make_features(n, d, fake_ratio, seed)
        num_merges, size_penalty = int(0.05 * n), 0.005
        base = _memory_baseline_mb()
        labels, times, all_labels, peaks = np.arange(n, dtype=np.int64), [], [], []
        for _ in range(stages):
            t0 = time.perf_counter()
            if which == "ours":
                labels = bottom_up_merge(x, labels, num_merges, size_penalty,
                                         is_fake=is_fake if is_fake.any() else None)
            else:
                labels = reference_merge(x, labels, num_merges, size_penalty)
            times.append(time.perf_counter() - t0)
            peaks.append(_peak_mb() - base)
            all_labels.append(labels)
        queue.put({"times": times, "peak_mb": peaks[0], "labels": all_labels})
    except BaseException as exc:  # report instead of hanging the parent
        queue.put({"error": repr(exc)})


def _measure(which, n, d, fake_ratio, seed, stages):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(which, n, d, fake_ratio, seed, stages, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if "error" in out:
        raise RuntimeError(f"{which} failed: {out['error']}")
    return out


def bench_buc(n, d=2048, fake_ratio=0.0, run_reference=True, seed=0, stages=1) -> dict:
    """Time and peak memory of one BUC stage from singletons (``stages=2`` adds a second stage).

    Returns ``n, ours_time_s, ours_peak_mb, ref_time_s, ref_peak_mb, same_labels`` (first stage;
    ``same_labels`` compares every stage run), plus ``*_stage2_time_s`` when ``stages=2``.
    The reference cannot handle fakes and is skipped when ``fake_ratio > 0``.
    """
    ours = _measure("ours", n, d, fake_ratio, seed, stages)
    res = {"n": n, "ours_time_s": ours["times"][0], "ours_peak_mb": ours["peak_mb"],
           "ref_time_s": None, "ref_peak_mb": None, "same_labels": None}
    if stages > 1:
        res["ours_stage2_time_s"] = ours["times"][1]
    if run_reference and fake_ratio == 0:
        ref = _measure("ref", n, d, fake_ratio, seed, stages)
        res.update(ref_time_s=ref["times"][0], ref_peak_mb=ref["peak_mb"],
                   same_labels=all(np.array_equal(a, b) for a, b in zip(ours["labels"], ref["labels"])))
        if stages > 1:
            res["ref_stage2_time_s"] = ref["times"][1]
    return res


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(quick: bool = False) -> None:
    rows = [bench_buc(5000, stages=2)]
    if not quick:
        rows += [bench_buc(12936, stages=2), bench_buc(77616, fake_ratio=5 / 6, run_reference=False)]
    print(f"d=2048, num_merges=int(0.05 N), size_penalty=0.005, {THREADS} threads; stage 1 from singletons"
          " (stage 2 continues from its labels)\n")
    print("| N | fake | ours s (stage 1 / 2) | ours peak MB | public-code s (stage 1 / 2) | public-code peak MB"
          " | speed-up (x) | memory ratio (x) | same labels |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r, fake in zip(rows, ("0", "0", "5/6")):
        ref_t = r["ref_time_s"]
        print(f"| {r['n']:,} | {fake} | {r['ours_time_s']:.1f} / {_fmt(r.get('ours_stage2_time_s'), '.1f')}"
              f" | {r['ours_peak_mb']:.0f} | {_fmt(ref_t, '.1f')} / {_fmt(r.get('ref_stage2_time_s'), '.1f')}"
              f" | {_fmt(r['ref_peak_mb'], '.0f')}"
              f" | {_fmt(ref_t and ref_t / r['ours_time_s'], '.1f')}"
              f" | {_fmt(r['ref_peak_mb'] and r['ref_peak_mb'] / max(r['ours_peak_mb'], 1.0), '.1f')}"
              f" | {r['same_labels'] if r['same_labels'] is not None else '-'} |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))
    main(quick="--quick" in sys.argv)
