"""PUL label update: k-means on raw features, then reliable-sample selection.

Fan, Zheng, Yan, Yang, "Unsupervised Person Re-identification: Clustering and Fine-tuning", TOMM 2018.
Each iteration clusters the pooled features of the current model into K groups (K close to the identity
count), and keeps only the samples close to a cluster centre for fine-tuning.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np
import torch

from ._common import (GROUP_SUMS_CHUNK_BYTES, as_torch_features, check_labels, map_threads, relabel_by_first_index,
                      resolve_device, resolve_threads, row_sq, shared_tensor, thread_pool)

MATCH_MODES = ("any", "own")

# Restarts a fanned-out task runs together: their products share one GEMM (one restart's 80 columns ran at
# half the speed of 800), and 10 restarts still make two tasks, one per node of a two-node cluster.
RESTARTS_PER_TASK = 5
# Bytes of one block of distances held at once.
_BLOCK_BYTES = 256 * 2**20
# Bytes of one block of Lloyd's assignment products (rows x every restart's centres), one block per thread at
# a time: its argmin, bounds and BLAS buffers take about as much again, and at N = 77,616 a 256 MB block (every
# row at once) peaked 600 MB above the matrix; 10,000 rows x 800 centres is still one efficient product.
_ASSIGN_BYTES = 32 * 2**20
# Row blocks of a Lloyd pass, at least (see _row_blocks). Many small blocks keep both threads busy to the end
# of a pass when one of them is held up: in the feature store (a Ray actor, whose own threads wake now and
# then) Lloyd took 2.2-2.3 s at N = 12,936, d = 2048 on two threads with 4 blocks, 2.0-2.1 with 16.
_MIN_ROW_BLOCKS = 16
# Bytes of one row chunk of the float64 passes over the samples (each makes a few temporaries of its size).
_CHUNK_BYTES = 32 * 2**20
# Bytes of the one float64 buffer of _row_sq64's chunks. A fresh 32 MB chunk per step (astype) cost fresh pages
# whenever malloc mapped it anew: the squared lengths of N = 12,936, d = 2048 took 0.03 s in a quiet process but
# 0.06-0.28 s inside PUL's update (two calls), against 0.011 s through one 4 MB buffer, bit for bit the same.
_ROW_SQ_CHUNK_BYTES = 4 * 2**20
# Bytes of one float64 row chunk of the centre sums, added to every run's sums while it stays in cache: the
# chunk of _common.group_sums.
_SUM_CHUNK_BYTES = GROUP_SUMS_CHUNK_BYTES


def kmeans(features, num_clusters, seed=0, n_init=10, max_iter=300, device=None, map_blocks=None,
           stats=None) -> np.ndarray:
    """k-means of the raw (unnormalised) features into ``num_clusters`` groups; int64 labels (numpy).

    scikit-learn's algorithm and protocol (greedy k-means++ seeding, Lloyd iterations until the assignment
    stops changing, the lowest inertia of ``n_init`` restarts wins) on faster machinery:

    * seeding: greedy k-means++ (Arthur & Vassilvitskii 2007; 2 + ln K candidates per step, as scikit-learn)
      in float32, all restarts advancing together so that each of the K steps reads the samples once for
      all of them, in fixed column blocks spread over the caller's threads, each block's thin product on one
      thread (one MKL call on two threads only added synchronisation, 15x slower on a busy 2-core machine):
      the same seeds on any thread count. scikit-learn spends most of its time here, upcasting every
      distance block to float64. (Seeding on a 256-d random projection was cheaper still but left the final
      inertia ~0.8% worse at N = 12,936, d = 2048, K = 750.)
    * Lloyd: on CPU every restart's iterations advance together, one wide product for all of them per row
      block, with labels decided by exact distances and rows whose label cannot change left out
      (:func:`_lloyd_lockstep`), the first pass taken from the seeding's own distances wherever they decide
      it (:func:`_first_pass`; in-process only, a fanned-out task computes it); a torch implementation when
      ``device`` is given or the features are a CUDA tensor (empty clusters are re-seeded with the samples
      farthest from their centres in both).

    Deterministic for a given ``seed``. Labels are numbered in order of each cluster's first sample; there are
    ``num_clusters`` of them unless a centre ends up with no sample (then fewer, still contiguous).

    ``map_blocks``: optional executor ``map_blocks(fn, shared, items)`` (as for :func:`bottom_up_merge`): on the
    CPU path the restarts' Lloyd runs (independent once seeded) go through it in groups of up to
    ``RESTARTS_PER_TASK`` (a group shares its products, see :func:`_lloyd_lockstep`), with the features shared
    once. A restart's labels do not depend on which restarts share its products and its score not on which
    are scored with it, so the same restart wins (lowest inertia, the first on a tie) and the labels are the
    in-process ones. ``stats``: optional dict, filled with ``mapped_blocks``.
    """
    dev = resolve_device(features, device)
    use_torch = device is not None or (isinstance(features, torch.Tensor) and features.is_cuda)
    x = as_torch_features(features, dev).float()  # k-means in float32 (distances decided exactly, see Lloyd)
    n = x.shape[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, numbers.Integral) \
            or not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be an integer in [1, N] = [1, {n}], got {num_clusters!r}")
    for name, value in (("n_init", n_init), ("max_iter", max_iter)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    threads = resolve_threads()
    fanned_out = map_blocks is not None and n_init > RESTARTS_PER_TASK
    first = [] if not (use_torch or fanned_out) else None  # Lloyd in this process: its first pass from the seeding
    with _one_cpu_thread(x.device):
        seeds = _kmeanspp(x, int(num_clusters), int(n_init), gen, threads, first=first)
    if use_torch:
        runs = [(labels, inertia(x, labels)) for labels in
                (_lloyd_torch(x, x[seeds[r]], int(max_iter)) for r in range(n_init))]
        return relabel_by_first_index(_lowest_inertia(runs))
    if fanned_out:
        groups = [(seeds[g:g + RESTARTS_PER_TASK].cpu().numpy(), int(max_iter))
                  for g in range(0, n_init, RESTARTS_PER_TASK)]
        results = map_blocks(lloyd_restarts, x.cpu().numpy(), groups)
        if len(results) != len(groups):
            raise RuntimeError(f"map_blocks returned {len(results)} results for {len(groups)} groups of restarts")
        runs = [run for group in results for run in group]
        if stats is not None:
            stats["mapped_blocks"] = stats.get("mapped_blocks", 0) + len(groups)
    else:
        xn, seeds = x.cpu().numpy(), seeds.cpu().numpy()
        runs = _lloyd_runs(xn, seeds, int(max_iter), first=_first_pass(xn, seeds, *first))
    return relabel_by_first_index(_lowest_inertia(runs))


def _lowest_inertia(runs) -> np.ndarray:
    """The labels of the restart with the lowest inertia; in restart order, so the first of equal ones wins."""
    best, best_inertia = None, math.inf
    for labels, value in runs:
        if value < best_inertia:
            best, best_inertia = labels, value
    return best


def lloyd_restarts(features: np.ndarray, job) -> list[tuple[np.ndarray, float]]:
    """A group of k-means restarts on the CPU path: ``job = ((R, K) seed indices, max_iter)`` -> (labels,
    inertia) of each. The unit of work a ``map_blocks`` executor runs (in another process or on another node)."""
    seeds, max_iter = job
    x = np.asarray(features, dtype=np.float32)
    return _lloyd_runs(x, np.asarray(seeds), int(max_iter))


def inertia(features, labels) -> float:
    """Sum of squared Euclidean distances of the samples to the mean of their cluster (float64)."""
    x = features.detach() if isinstance(features, torch.Tensor) else shared_tensor(features)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    lab = np.asarray(labels)
    if x.ndim != 2 or lab.shape != (x.shape[0],):
        raise ValueError(f"features must be (N, d) and labels (N,); got {tuple(x.shape)} and {lab.shape}")
    _, lab = np.unique(lab, return_inverse=True)
    idx = torch.from_numpy(lab.reshape(-1)).to(x.device)
    c = int(lab.max()) + 1
    sums = torch.zeros(c, x.shape[1], dtype=torch.float64, device=x.device)
    step = max(1, _CHUNK_BYTES // (8 * x.shape[1]))
    for s in range(0, x.shape[0], step):
        sums.index_add_(0, idx[s:s + step], x[s:s + step].double())
    means = sums / torch.bincount(idx, minlength=c).double()[:, None]
    total = 0.0
    for s in range(0, x.shape[0], step):
        total += float(((x[s:s + step].double() - means[idx[s:s + step]]) ** 2).sum())
    return total


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """One torch and one BLAS thread per call while k-means++ seeding runs its column blocks on the caller's
    threads (see ``_kmeanspp``), then restore."""
    if device.type != "cpu":
        yield
        return
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(old)


# Samples per column block of k-means++ seeding on CPU, at most: the block count is rounded up to a multiple
# of 4 so that the blocks split evenly over 1, 2 or 4 threads (7 blocks on 2 threads kept one thread on 4 of
# them), and blocks this small let a thread that is held up hand its share to the other within each of the K
# steps (in the feature store, a Ray actor: 2.0-2.3 s at N = 12,936, d = 2048 on two threads with blocks of
# 2,048, 1.75-1.78 with 1,024; the same outside it). The blocks depend on N alone, so every value is the same
# whatever the thread count.
_SEED_COLUMNS = 1024


def _seed_blocks(n: int) -> list[slice]:
    count = -(-n // _SEED_COLUMNS)
    if count > 1:
        count = -(-count // 4) * 4
    width = -(-n // count)
    return [slice(s, min(s + width, n)) for s in range(0, n, width)]


def _kmeanspp(x: torch.Tensor, k: int, restarts: int, gen: torch.Generator, threads: int = 1,
              first: list | None = None) -> torch.Tensor:
    """(restarts, k) indices of greedy k-means++ seeds: each step draws 2 + ln k candidates with probability
    proportional to the squared distance to the nearest seed so far and keeps the one that lowers the
    potential most. The restarts advance together, so each step reads the samples once for all of them.

    On CPU the samples are cut into fixed column blocks (``_SEED_COLUMNS``), each block's (candidates x d) @
    (d x block) product and distances computed on one thread and the blocks spread over ``threads`` (the steps
    are thin products that one MKL call on two threads ran slower than on one), the potentials summed block by
    block in block order: the same operations in the same order whatever ``threads`` is, so the same seeds.

    ``first``: a list (CPU only), extended with three (restarts, N) arrays: each sample's nearest seed (its
    position in the restart's seeds, the first on a tie), and the computed squared distances to it and to the
    nearest other seed. Every seed was a candidate whose distances to every sample were computed, so this is
    Lloyd's first pass without its product (see :func:`_first_pass`)."""
    n = x.shape[0]
    sq = row_sq(x)
    cpu = x.device.type == "cpu"
    cols = _seed_blocks(n) if cpu else [slice(0, n)]
    xn = x.numpy() if cpu else None
    trials = 2 + int(math.log(k))
    rows = torch.arange(restarts, device=x.device)
    seeds = torch.empty(restarts, k, dtype=torch.long, device=x.device)
    seeds[:, 0] = torch.randint(n, (restarts,), generator=gen, device=x.device)

    def distances(idx: torch.Tensor):
        """A function of block b: the (len(idx), block) squared distances |p|^2 + |x|^2 - 2 p.x in float32 of
        the samples idx to the block's (x @ (-2 p) is exactly -2 (x @ p)); the points gathered once."""
        points, psq = x[idx] * -2, sq[idx, None]
        pn = points.numpy() if cpu else None

        def to_block(b: int) -> torch.Tensor:
            # a transposed view: as fast as a (d, block) copy, and no copy. On CPU NumPy's OpenBLAS: torch's
            # MKL ran these thin products at 77 GFLOP/s on one thread against OpenBLAS's 98 (AMD EPYC)
            dist = torch.from_numpy(pn @ xn[cols[b]].T) if cpu else points @ x[cols[b]].T
            dist += psq + sq[None, cols[b]]
            return dist.clamp_min_(0)
        return to_block

    with thread_pool(min(threads, len(cols))) as pool:
        # the distance of every sample to its nearest seed so far, per block: (restarts, block) each
        closest = map_threads(distances(seeds[:, 0]), range(len(cols)), threads, pool)
        track = first is not None and cpu
        if track:  # per block: the nearest seed's position and the second smallest distance
            nearest = [torch.zeros(part.shape, dtype=torch.long) for part in closest]
            second = [torch.full(part.shape, math.inf) for part in closest]
        for c in range(1, k):
            cdf = torch.cumsum(torch.cat(closest, 1).double(), 1)
            r = torch.rand(restarts, trials, generator=gen, device=x.device, dtype=torch.float64) * cdf[:, -1:]
            cand = torch.searchsorted(cdf, r).clamp_max_(n - 1)  # (restarts, trials)
            to_block = distances(cand.reshape(-1))

            def block(b: int):
                raw = to_block(b).reshape(restarts, trials, -1)
                if not track:
                    torch.minimum(raw, closest[b][:, None, :], out=raw)
                    return raw, raw, raw.sum(2, dtype=torch.float64)
                dist = torch.minimum(raw, closest[b][:, None, :])  # the candidates' raw distances kept
                return raw, dist, dist.sum(2, dtype=torch.float64)

            parts = map_threads(block, range(len(cols)), threads, pool)
            potential = parts[0][2]
            for _, _, part in parts[1:]:
                potential = potential + part
            best = torch.argmin(potential, dim=1)
            seeds[:, c] = cand[rows, best]
            if track:
                for b, (raw, _, _) in enumerate(parts):
                    new = raw[rows, best]
                    nearer = new < closest[b]  # strictly: a tie stays with the earlier seed, as argmin
                    second[b] = torch.where(nearer, closest[b], torch.minimum(second[b], new))
                    nearest[b][nearer] = c
            closest = [dist[rows, best] for _, dist, _ in parts]
    if track:
        first.extend(torch.cat(part, 1).numpy() for part in (nearest, closest, second))
    return seeds


# float32's unit roundoff, for the bound on a computed distance's error (see _lloyd_lockstep).
_UNIT = 2.0 ** -24
# Above this share of samples moved, a restart's centre sums are summed afresh instead of patched.
_REBUILD_MOVED = 0.25
# Relative margin of the skip test (see _lloyd_lockstep) for the float64 rounding of the bounds themselves
# (a square root and up to max_iter additions, each off by a relative 2^-53): far above it, far below any gap
# that matters.
_BOUND_SLACK = 1e-9
# One restart's product (K columns) ran at about half the speed of ten restarts' side by side here, so the
# rows of a pass are computed for every restart at once unless that costs more than this many times the rows
# the restarts need one by one.
_SHARED_PRODUCT_GAIN = 2.0


def _lloyd_lockstep(x: np.ndarray, seeds: np.ndarray, max_iter: int) -> list[np.ndarray]:
    """Lloyd's iterations for every restart of ``seeds`` ((R, K) sample indices) together; int64 labels of each.

    Each iteration assigns every sample to its nearest centre (squared distance ``|c|^2 - 2 x.c``; ``|x|^2`` is
    the same for every centre) and moves each centre to the mean of its samples; a restart stops when no
    label changes (scikit-learn's strict convergence) or after ``max_iter`` moves.

    Exact: a computed distance (``|x|^2`` in float64 plus the float32 ``fl(fl(x.(-2c)) + fl(|c|^2))``) is within
    ``E = (2 gamma_d + 4u) |x| R + 4u R^2 + d 2^-52 |x|^2`` of the true one, R = max|c|: the product is off by
    at most ``gamma_d sum_i |x_i| |2 c_i| <= 2 gamma_d |x| |c|`` (Cauchy-Schwarz), ``gamma_d = d u / (1 - d u)``
    being the worst-case error of a d-term float32 dot product summed in any order, FMA or not (Higham,
    *Accuracy and Stability of Numerical Algorithms*, 3.1); rounding ``|c|^2`` to float32 adds ``u |c|^2`` and
    the float32 addition ``u (2 |x| |c| + |c|^2)`` (to first order; the 4u covers the rest), and the float64
    ``|x|^2`` and ``|c|^2`` the last term. (Until 2026-12 E was ``3 gamma_d (|x| + R)^2``, six times wider for
    unit rows: one row-restart pair in seven of a first pass was a near tie, against one in forty now.) Where the two
    smallest computed distances are more than ``2E`` apart, the smallest is the true nearest centre; other rows
    (ties included) are decided by float64 distances to the centres within ``2E`` of the smallest (products of
    float32 numbers are exact in float64). So the labels do not depend on the BLAS, its threads, or which
    restarts share a product (a restart alone in a fanned-out task gets the in-process labels), up to float64
    rounding.

    Fast: rows whose label cannot change are not recomputed (Hamerly, "Making k-means even faster", SDM 2010).
    Each sample keeps, per restart, an upper bound on its true Euclidean distance to its own centre and a lower
    bound on its distance to every other one, both from its last computed row widened by ``E``; when the
    centres move by ``delta_c``, the upper bound grows by its own centre's ``delta`` and the lower one shrinks
    by the largest (the triangle inequality). A row is recomputed only where upper >= lower: the skipped rows
    keep labels that the full computation would give, so the result is that of plain Lloyd. The rows due are
    computed for all restarts in one float32 product, their centres side by side, or restart by restart when
    that is cheaper (``_SHARED_PRODUCT_GAIN``).

    A restart's centre sums are float64, patched with the samples that moved, or summed afresh when more than
    a quarter moved: both depend on that restart's labels alone. An emptied cluster's centre moves to the
    sample farthest from its own centre (float64 distances; the lowest index on a tie), as scikit-learn
    relocates empty clusters.
    """
    return [labels for labels, _ in _lloyd_runs(x, seeds, max_iter)]


def _lloyd_runs(x: np.ndarray, seeds: np.ndarray, max_iter: int, first: tuple | None = None
                ) -> list[tuple[np.ndarray, float]]:
    """:func:`_lloyd_lockstep`, each restart's labels with their inertia: ``sum_i |x_i|^2 - sum_c |S_c|^2 / n_c``
    in float64, S_c the restart's own centre sums. Those were patched with the samples that moved, or summed
    afresh, by rules that read nothing but the restart's labels, and its labels do not depend on which
    restarts share its products: so neither does its inertia, and the same restart wins in-process and
    fanned out. (Until 2026-12 the sums were formed again from the final labels: one more pass over the
    samples for every restart, 0.11-0.18 s at N = 12,936, d = 2048; only the choice of the restart rests on
    the value.) ``first``: the first pass's labels and bounds from :func:`_first_pass`; its undecided rows
    are computed, the others not."""
    threads = resolve_threads()
    with _one_cpu_thread(torch.device("cpu")), thread_pool(threads) as pool:
        return _lloyd_iterations(x, seeds, max_iter, threads, first, pool)


def _lloyd_iterations(x: np.ndarray, seeds: np.ndarray, max_iter: int, threads: int, first: tuple | None = None,
                      pool=None) -> list[tuple[np.ndarray, float]]:
    """:func:`_lloyd_runs`' iterations, each pass's row blocks on ``threads`` threads (of ``pool``)."""
    n, d = x.shape
    restarts, k = seeds.shape
    gamma = d * _UNIT / (1 - d * _UNIT)
    xsq = _row_sq64(x)
    centres = np.ascontiguousarray(x[seeds])  # (R, K, d) float32
    labels: list = [None] * restarts
    sums: list = [None] * restarts
    counts: list = [None] * restarts
    upper = np.full((restarts, n), np.inf)  # bounds on true Euclidean distances (nothing known yet)
    lower = np.zeros((restarts, n))
    if first is not None:
        start, upper[:], lower[:] = first
    active = list(range(restarts))
    for iteration in range(max_iter + 1):  # the first pass assigns the samples to the seeds
        if not active:
            break
        due = [np.flatnonzero(~(upper[r] * (1 + _BOUND_SLACK) < lower[r] * (1 - _BOUND_SLACK))) for r in active]
        fresh, still = [], []
        for r, (rows, arg, up, low) in zip(active, _due_rows(x, xsq, centres, active, due, gamma,
                                                                            threads, pool)):
            upper[r, rows], lower[r, rows] = up, low
            if iteration == 0:  # every row is due (no bounds yet), or those the seeding left undecided
                labels[r] = np.empty(n, dtype=np.int64) if first is None else start[r].copy()
                labels[r][rows] = arg
                fresh.append(r)
                still.append(r)
                continue
            old = labels[r]
            changed = arg != old[rows]
            moved = rows[changed]
            if moved.size == 0 and counts[r].all():
                continue  # converged: labels[r] are final
            new = old.copy()
            new[moved] = arg[changed]
            if moved.size > _REBUILD_MOVED * n:
                fresh.append(r)
            else:
                _patch_sums(sums[r], x, moved, old, -1)  # every removal before every addition, as before
                _patch_sums(sums[r], x, moved, new, 1)
                counts[r] += np.bincount(new[moved], minlength=k) - np.bincount(old[moved], minlength=k)
            labels[r] = new
            still.append(r)
        if fresh:
            for r, total in zip(fresh, _cluster_sums(x, [labels[r] for r in fresh], k, threads, pool)):
                sums[r], counts[r] = total, np.bincount(labels[r], minlength=k)
        for r in still:
            before = centres[r].copy()
            full = counts[r] > 0
            centres[r][full] = (sums[r][full] / torch.from_numpy(counts[r][full]).double()[:, None]).float().numpy()
            empty = np.flatnonzero(~full)
            if empty.size:
                far = np.argsort(-_row_sq64(x, centres[r], labels[r]), kind="stable")[:empty.size]
                centres[r][empty] = x[far]
            shift = np.sqrt(_row_sq64(centres[r] - before.astype(np.float64)))  # how far each centre moved
            upper[r] += shift[labels[r]]
            lower[r] -= shift.max()
        active = still
    total = float(xsq.sum())
    return [(labels[r], total - float(((sums[r] * sums[r]).sum(1) / torch.from_numpy(counts[r]).clamp_min(1).double()
                                         ).sum())) for r in range(restarts)]


def _first_pass(x: np.ndarray, seeds: np.ndarray, nearest: np.ndarray, d1: np.ndarray, d2: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lloyd's first pass (every sample to its nearest seed) from k-means++ seeding's own distances
    (:func:`_kmeanspp`'s ``first``): (labels, upper, lower), three (restarts, N) arrays for
    :func:`_lloyd_iterations`, the bounds on true Euclidean distances as :func:`_nearest_exact` gives them.

    The seeding computed ``fl(fl(x.(-2s)) + fl(fl(|s|^2) + fl(|x|^2)))`` in float32 with both squared lengths
    float32 sums, so a distance is within ``E = (2 gamma_d + 4u) |x| R + (gamma_d + 4u) (|x|^2 + R^2)``
    (R = the largest seed's length; the product as in :func:`_lloyd_lockstep`, each squared length off by
    ``gamma_d`` times itself, three float32 roundings of sums below ``|x|^2 + 2|x|R + R^2``; clamping at 0
    only comes nearer). Where the second smallest distance is more than 2E above the smallest, the nearest
    seed is decided (labels, upper = sqrt(d1 + E), lower = sqrt(d2 - E)); the other rows (ties included)
    get (inf, 0) and Lloyd's first pass computes them. Saves that pass's product: 42 GFLOP of 330 at
    N = 12,936, d = 2048, K = 80 and 10 restarts."""
    d = x.shape[1]
    gamma = d * _UNIT / (1 - d * _UNIT)
    sq = _row_sq64(x)
    xsq, reach_sq = sq[None, :], sq[seeds].max(1)[:, None]  # (1, N), (restarts, 1)
    err = (2 * gamma + 4 * _UNIT) * np.sqrt(xsq * reach_sq) + (gamma + 4 * _UNIT + d * 2.0 ** -52) * (xsq + reach_sq)
    low, high = d1.astype(np.float64), d2.astype(np.float64)
    decided = high - low > 2 * err
    upper = np.where(decided, np.sqrt(low + err), np.inf)
    lower = np.where(decided, np.sqrt(np.maximum(high - err, 0)), 0.0)
    return np.asarray(nearest, dtype=np.int64), upper, lower


def _patch_sums(sums: torch.Tensor, x: np.ndarray, moved: np.ndarray, labels: np.ndarray, sign: int) -> None:
    """Add ``sign`` x the float64 rows ``moved`` of ``x`` to their clusters' ``sums`` (by ``labels``), a small
    chunk of rows at a time through one buffer (up to a quarter of the samples move: 318 MB of float64 rows
    at N = 77,616). index_add_ adds in index order, so the sums are bitwise those of one call over all the
    rows."""
    step = max(1, _SUM_CHUNK_BYTES // (8 * x.shape[1]))
    buffer = np.empty((min(step, moved.size), x.shape[1]))
    for s in range(0, moved.size, step):
        m = moved[s:s + step]
        rows = buffer[:m.size]
        np.copyto(rows, x[m])
        sums.index_add_(0, torch.from_numpy(labels[m]), torch.from_numpy(rows), alpha=sign)


def _due_rows(x, xsq, centres, active, due, gamma, threads=None, pool=None):
    """For each active restart, (rows, labels, upper, lower) of its due rows, by :func:`_nearest_exact`: one
    product over the union of the rows for all restarts (each gets every row of the union: a row computed
    without need gets its unchanged label and tighter bounds), or one per restart if that is cheaper."""
    n = x.shape[0]
    wanted = sum(rows.size for rows in due)
    if wanted == 0:
        return [(rows, rows, np.empty(0), np.empty(0)) for rows in due]
    mask = np.zeros(n, dtype=bool)
    for rows in due:
        mask[rows] = True
    union = None if mask.all() else np.flatnonzero(mask)
    size = n if union is None else union.size
    if size * len(active) <= _SHARED_PRODUCT_GAIN * wanted:
        arg, up, low = _nearest_exact(x, xsq, centres[active], gamma, union, threads, pool)
        rows = np.arange(n) if union is None else union
        return [(rows, arg[j], up[j], low[j]) for j in range(len(active))]
    out = []
    for r, rows in zip(active, due):
        arg, up, low = _nearest_exact(x, xsq, centres[r:r + 1], gamma, rows, threads, pool)
        out.append((rows, arg[0], up[0], low[0]))
    return out


def _row_blocks(count: int, max_rows: int, min_rows: int = 512) -> list[tuple[int, int]]:
    """Row spans of at most ``max_rows`` rows for the caller's threads, their count 1, 2 or a multiple of 4 (so
    that they split evenly over 1, 2 or 4 threads) and, where the rows allow, at least ``_MIN_ROW_BLOCKS`` of
    ``min_rows`` or more: a function of the counts alone, never of the thread count."""
    blocks = max(-(-count // max_rows), min(_MIN_ROW_BLOCKS, -(-count // min_rows)), 1)
    if blocks > 2:
        blocks = -(-blocks // 4) * 4
    width = max(1, -(-count // blocks))
    return [(s, min(s + width, count)) for s in range(0, count, width)]


def _nearest_exact(x: np.ndarray, xsq: np.ndarray, centres: np.ndarray, gamma: float,
                   rows: np.ndarray | None = None, threads: int | None = None, pool=None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the samples ``rows`` of ``x`` (all when None) and each centre set of ``centres`` (A, K, d): the
    nearest centre, decided exactly (see :func:`_lloyd_lockstep`), and bounds on the true Euclidean distances
    to it (upper) and to every other centre (lower); three (A, rows) arrays. A row decided in float64 among
    near ties gets the bounds (inf, 0): it is computed again next time. ``xsq``: the samples' float64
    squared lengths.

    The rows go in fixed blocks (:func:`_row_blocks`) over ``threads`` (:func:`map_threads`), each block's
    product and bookkeeping on one thread, as k-means++ seeding does: the product alone on two BLAS threads
    ran at 185 GFLOP/s against 222 for the GEMM floor here (AMD EPYC), and everything after it on one. Call
    it with NumPy's BLAS on one thread (:func:`_one_cpu_thread`)."""
    a, k, d = centres.shape
    csq64 = np.stack([_row_sq64(c) for c in centres])  # (A, K)
    csq = csq64.astype(np.float32).reshape(-1)
    reach = np.sqrt(csq64.max(1))  # (A,)
    flat_m2 = centres.reshape(-1, d) * np.float32(-2)  # x @ (-2 C)^T is exactly -2 (x @ C^T)
    centres64 = [None] * a  # float64 centres for the near ties, converted once per call when first needed
    count = x.shape[0] if rows is None else rows.size
    arg_out = np.empty((a, count), dtype=np.int64)
    up_out = np.empty((a, count))
    low_out = np.empty((a, count))
    step = max(1, _ASSIGN_BYTES // (4 * a * k))
    if rows is not None:  # gathered rows are a copy: a chunk of them at a time
        step = min(step, max(1, _CHUNK_BYTES // (4 * d)))

    def block(span: tuple[int, int]) -> None:
        s, e = span
        idx = slice(s, e) if rows is None else rows[s:e]
        xb = x[idx]
        dist = np.matmul(xb, flat_m2.T)
        dist += csq
        dist = dist.reshape(-1, a, k)
        arg = dist.argmin(2)  # (b, A)
        low = np.take_along_axis(dist, arg[..., None], 2)
        np.put_along_axis(dist, arg[..., None], np.inf, 2)
        second = dist.min(2)
        np.put_along_axis(dist, arg[..., None], low, 2)
        low = low[..., 0]
        sq = xsq[idx][:, None]
        # E per (row, centre set), see _lloyd_lockstep
        err = (2 * gamma + 4 * _UNIT) * np.sqrt(sq) * reach[None, :] + 4 * _UNIT * reach[None, :] ** 2 \
            + d * 2.0 ** -52 * sq
        up = np.sqrt(np.maximum(sq + low + err, 0))
        lo = np.sqrt(np.maximum(sq + second - err, 0))
        for j in range(a):
            near = np.flatnonzero(second[:, j] - low[:, j] <= 2 * err[:, j])
            if near.size:  # near ties: float64 distances to the centres in the band
                if centres64[j] is None:  # a race between two blocks only converts twice
                    centres64[j] = centres[j].astype(np.float64)
                exact = csq64[j] - 2 * (xb[near].astype(np.float64) @ centres64[j].T)
                exact[dist[near, j] > (low[near, j] + 2 * err[near, j])[:, None]] = np.inf
                arg[near, j] = exact.argmin(1)
                up[near, j], lo[near, j] = np.inf, 0.0
        arg_out[:, s:e] = arg.T
        up_out[:, s:e] = up.T
        low_out[:, s:e] = lo.T

    map_threads(block, _row_blocks(count, step), threads, pool)
    return arg_out, up_out, low_out


def _row_sq64(x: np.ndarray, centres: np.ndarray | None = None, labels: np.ndarray | None = None) -> np.ndarray:
    """Each row's squared length in float64, in row chunks; with ``centres`` and ``labels``, each row's squared
    distance to the centre of its cluster (``x[i] - centres[labels[i]]`` in float64)."""
    step = max(1, _ROW_SQ_CHUNK_BYTES // (8 * x.shape[1]))
    out = np.empty(x.shape[0])
    buf = np.empty((min(step, x.shape[0]), x.shape[1]))
    for s in range(0, x.shape[0], step):
        chunk = buf[:min(step, x.shape[0] - s)]
        np.copyto(chunk, x[s:s + step])  # float32 to float64: exact
        if centres is not None:
            chunk -= centres[labels[s:s + step]]
        out[s:s + step] = np.einsum("ij,ij->i", chunk, chunk)  # row by row: the same sums for any chunk
    return out


def _cluster_sums(x: np.ndarray, runs: list[np.ndarray], k: int, threads: int | None = None, pool=None
                  ) -> list[torch.Tensor]:
    """float64 (K, d) sums of the samples of each cluster, for each label array of ``runs``, each accumulated in
    sample order (so the same whatever else is summed, and on any thread count).

    The runs are dealt to up to ``threads`` threads (see :func:`resolve_threads`); each thread converts the
    samples to float64 a small chunk at a time into a buffer of its own and adds the chunk to each of its
    runs' sums while it is in cache. (One 32 MB chunk shared by all runs, read again from memory for every
    run, took 0.20 s at N = 12,936, d = 2048 and 10 runs on two threads.) The buffer is also a copy because
    the features may be a read-only view (the object store's), which torch warns about."""
    n, d = x.shape
    idx = [torch.from_numpy(np.asarray(labels, dtype=np.int64)) for labels in runs]
    sums = [torch.zeros(k, d, dtype=torch.float64) for _ in runs]
    step = max(1, _SUM_CHUNK_BYTES // (8 * d))
    count = max(1, min(resolve_threads(threads), len(runs)))

    def add(share: list[int]) -> None:
        buffer = np.empty((min(step, n), d))
        for s in range(0, n, step):
            chunk = buffer[:min(step, n - s)]
            np.copyto(chunk, x[s:s + step])
            rows = torch.from_numpy(chunk)
            for j in share:
                sums[j].index_add_(0, idx[j][s:s + step], rows)

    map_threads(add, [list(range(t, len(runs), count)) for t in range(count)], count, pool)
    return sums


def _assign(x: torch.Tensor, centres: torch.Tensor):
    """Nearest centre of each sample and the squared distance to it, in row blocks."""
    csq = (centres * centres).sum(1)
    step = max(1, _BLOCK_BYTES // (4 * centres.shape[0]))
    labels, dist = [], []
    for s in range(0, x.shape[0], step):
        xb = x[s:s + step]
        val, arg = torch.addmm(csq[None, :], xb, centres.T, alpha=-2).min(dim=1)
        labels.append(arg)
        dist.append((val + (xb * xb).sum(1)).clamp_min_(0))
    return torch.cat(labels), torch.cat(dist)


def _lloyd_torch(x: torch.Tensor, centres: torch.Tensor, max_iter: int) -> np.ndarray:
    k = centres.shape[0]
    centres = centres.clone()
    labels, dist = _assign(x, centres)
    for _ in range(max_iter):
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        centres = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = (counts == 0).nonzero().reshape(-1)
        if empty.numel():  # re-seed empty clusters with the samples worst served by their centre
            centres[empty] = x[torch.topk(dist, empty.numel()).indices]
        new_labels, dist = _assign(x, centres)
        if torch.equal(new_labels, labels) and not empty.numel():
            break
        labels = new_labels
    return labels.cpu().numpy().astype(np.int64)


def select_reliable(features, labels, threshold, match="any") -> np.ndarray:
    """PUL's reliable-sample selection; returns an (N,) bool mask.

    A cluster's centre is the member nearest (Euclidean, on the given features) to the mean of its members,
    ties to the smaller index. A sample is selected when its cosine similarity to a centre is strictly
    greater than ``threshold`` (the paper's lambda, 0.85): to any cluster's centre with ``match="any"`` (the
    public code) or to its own cluster's with ``match="own"`` (the paper). The public code takes the
    sample nearest to each k-means centroid among all samples; for a converged k-means partition that sample
    is a member. A zero feature has cosine 0 with everything. Computed on the features' device in row blocks.
    """
    dev = resolve_device(features)
    x = as_torch_features(features, dev)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    lab = check_labels(labels, x.shape[0])
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")
    if not (isinstance(threshold, numbers.Real) and -1 <= threshold <= 1):
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold!r}")
    n, d = x.shape
    c = int(lab.max()) + 1
    idx = torch.from_numpy(lab).to(dev)
    step = max(1, _CHUNK_BYTES // (8 * max(d, c)))
    # two float64 row buffers of one chunk, filled again for every chunk of the three passes: fresh ones per
    # chunk cost more in page faults than the arithmetic (0.81 s against 0.55 at N = 12,936, d = 2048)
    rows64 = torch.empty(min(step, n), d, dtype=torch.float64, device=dev)
    gathered = torch.empty_like(rows64)

    def chunks():
        for s in range(0, n, step):
            buf = rows64[:min(step, n - s)]
            buf.copy_(x[s:s + step])  # float32 to float64: exact, as .double()
            yield s, buf

    sums = torch.zeros(c, d, dtype=torch.float64, device=dev)
    for s, buf in chunks():
        sums.index_add_(0, idx[s:s + step], buf)
    means = sums / torch.bincount(idx, minlength=c).double()[:, None]
    to_mean = torch.empty(n, dtype=torch.float64, device=dev)
    for s, diff in chunks():  # (x - mean)^2 summed per row, in place (x * x is pow(x, 2) to the bit)
        diff -= torch.index_select(means, 0, idx[s:s + step], out=gathered[:len(diff)])
        diff *= diff
        torch.sum(diff, 1, out=to_mean[s:s + step])
    to_mean = to_mean.cpu().numpy()
    order = np.lexsort((np.arange(n), to_mean, lab))  # by cluster, then distance, then index
    first = np.ones(n, dtype=bool)
    first[1:] = lab[order[1:]] != lab[order[:-1]]
    centre_of = np.empty(c, dtype=np.int64)
    centre_of[lab[order[first]]] = order[first]

    def unit_(v: torch.Tensor) -> torch.Tensor:  # float64 rows scaled to unit length, in place
        return v.div_(v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny))

    centres = unit_(x[torch.from_numpy(centre_of).to(dev)].double())
    mask = []
    for s, xb in chunks():
        unit_(xb)
        if match == "own":
            sim = (xb * centres[idx[s:s + step]]).sum(1)
        else:
            sim = (xb @ centres.T).max(dim=1).values
        mask.append(sim > threshold)
    return torch.cat(mask).cpu().numpy()
