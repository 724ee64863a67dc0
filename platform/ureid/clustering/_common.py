"""Shared input checks, union-find and relabelling for the label-update algorithms."""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

# The AVX-512 subset OpenBLAS's SkylakeX kernels use.
_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


# The first AMD family that faiss-cpu 1.15.1's OpenBLAS 0.3.15 does not know (Zen 5, 0x1A): on an EPYC of that
# family it fell back to its Barcelona (K10, SSE3) kernels. Families 0x17 and 0x19 (Zen 1-4) it runs as "Zen".
_AMD_FIRST_UNKNOWN_FAMILY = 26


def openblas_core_for_cpu(cpuinfo: str | None = None) -> str | None:
    """The OpenBLAS kernel family for this CPU's vector unit, where faiss's OpenBLAS would not find one:
    ``"SkylakeX"`` for an Intel CPU with AVX-512 or an AMD one of family 26 (Zen 5) or later with AVX-512,
    ``"Haswell"`` for such a CPU with AVX2 and FMA, None otherwise (older AMD families, which OpenBLAS 0.3.15
    detects itself, another vendor or architecture, or no ``/proc/cpuinfo``: left to OpenBLAS's own
    detection). ``cpuinfo``: the text of ``/proc/cpuinfo``."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read(1 << 16)  # the first processor's lines are enough
        except OSError:
            return None
    fields = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the end of the first processor
            continue
        fields.setdefault(key.strip(), value.strip())
    vendor = fields.get("vendor_id")
    if vendor == "AuthenticAMD":
        family = fields.get("cpu family", "")
        if not family.isdigit() or int(family) < _AMD_FIRST_UNKNOWN_FAMILY:
            return None
    elif vendor != "GenuineIntel":
        return None
    flags = set(fields.get("flags", "").split())
    if _AVX512 <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def import_faiss():
    """``import faiss``, with its OpenBLAS on this CPU's vector kernels.

    faiss-cpu 1.15.1 bundles OpenBLAS 0.3.15 (2021), whose CPU table predates Sapphire and Emerald Rapids and
    AMD's Zen 5: on those Xeons it falls back to its generic Prescott (SSE3) kernels, and ``faiss.knn`` of
    4,096 x 12,936 queries (d = 2048) took 7.0 s on one thread instead of 1.5 s (measured here on an Emerald
    Rapids Xeon, model 207; NumPy's newer OpenBLAS detects it as SkylakeX); on a Zen 5 EPYC (family 26) it
    runs Barcelona's (AMD K10). OpenBLAS picks its kernels once, when the library loads, from
    ``OPENBLAS_CORETYPE`` or its table. So when the variable is unset and :func:`openblas_core_for_cpu` names a
    family (an Intel CPU, or an AMD one of family 26 on, with AVX-512 or AVX2 + FMA), it is set to that family
    (SkylakeX or Haswell) for faiss's load only and removed again: NumPy's OpenBLAS (loaded before), SciPy's
    and child processes keep their own detection. That is the family OpenBLAS assigns those CPUs on the models
    it knows (Cooperlake, its choice for some AVX-512 Xeons, uses SkylakeX's single-precision kernels; NumPy's
    OpenBLAS 0.3.31 runs the Zen 5 EPYC as SkylakeX), so where faiss detected the CPU its results are
    unchanged. A process that imported faiss before this keeps the faiss it loaded; ``OPENBLAS_CORETYPE`` set
    by the user wins.
    """
    loaded = "faiss" in sys.modules  # then its OpenBLAS has chosen already
    core = None if loaded or "OPENBLAS_CORETYPE" in os.environ else openblas_core_for_cpu()
    if core is not None:
        os.environ["OPENBLAS_CORETYPE"] = core
    try:
        import faiss
    finally:
        if core is not None:
            os.environ.pop("OPENBLAS_CORETYPE", None)
    return faiss


def faiss_blas_core() -> str | None:
    """The kernel family faiss's OpenBLAS runs on in this process (threadpoolctl's ``architecture``), e.g.
    ``"SkylakeX"``; None when faiss is not loaded or links another BLAS."""
    if "faiss" not in sys.modules:
        return None
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib.get("internal_api") == "openblas" and "faiss" in os.path.basename(os.path.dirname(lib["filepath"])):
            return lib.get("architecture")
    return None


def as_numpy_features(features, name: str = "features") -> np.ndarray:
    """Return a float32 C-contiguous 2-D numpy copy-or-view; reject NaN/inf and bad shapes."""
    torch = sys.modules.get("torch")  # a tensor exists only where torch is loaded: importing it to check cost 1.5 s
    if torch is not None and isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, d); got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    bad = nonfinite_rows(arr)
    if bad:
        raise ValueError(f"{name} contains NaN or infinite values in {bad} row(s)")
    return np.ascontiguousarray(arr, dtype=np.float32)


# Bytes of one row chunk of the whole-matrix checks and row norms below: a full-size temporary (an (N, d)
# boolean or float array) would be up to another feature matrix (606 MB at N = 77,616, d = 2048).
_ROW_CHUNK_BYTES = 32 << 20


def _row_step(x) -> int:
    """Rows of ``x`` (numpy or torch) in one chunk of ``_ROW_CHUNK_BYTES``."""
    itemsize = x.element_size() if hasattr(x, "element_size") else x.itemsize
    return max(1, _ROW_CHUNK_BYTES // max(1, int(np.prod(x.shape[1:])) * itemsize))


def nonfinite_rows(x) -> int:
    """How many rows (first axis) of ``x`` (numpy or torch) hold a NaN or an infinity, a chunk of rows at a
    time: no (N, d) boolean array. A row holding one sums to NaN or an infinity, so only the rows whose sum is
    not finite (those, and finite rows whose sum overflows) are looked at element by element: one summing
    pass instead of a boolean array and its reduction (0.13 s against 0.01 s at N = 12,936, d = 2048)."""
    torch = sys.modules.get("torch")  # as in as_numpy_features: not imported for numpy input

    step, bad = _row_step(x), 0
    for s in range(0, x.shape[0], step):
        chunk = x[s:s + step].reshape(min(step, x.shape[0] - s), -1)
        if torch is not None and isinstance(chunk, torch.Tensor):
            if chunk.is_floating_point():  # only rows whose sum is not finite can hold a NaN or an infinity
                chunk = chunk[~torch.isfinite(chunk.sum(1))]
            bad += int((~torch.isfinite(chunk)).any(dim=1).sum()) if chunk.numel() else 0
        else:
            if np.issubdtype(chunk.dtype, np.floating):
                with np.errstate(over="ignore", invalid="ignore"):
                    chunk = chunk[~np.isfinite(np.add.reduce(chunk, axis=1))]
            bad += int((~np.isfinite(chunk)).any(axis=1).sum()) if chunk.size else 0
    return bad


def row_sq(x):
    """``(x * x).sum(-1)`` of a torch tensor, a chunk of rows (first axis) at a time: no temporary of x's size.
    Each row is reduced on its own, so the values are bitwise the whole expression's (tested)."""
    import torch

    step = _row_step(x)
    if step >= x.shape[0]:
        return (x * x).sum(-1)
    return torch.cat([(x[s:s + step] * x[s:s + step]).sum(-1) for s in range(0, x.shape[0], step)])


def check_labels(labels, n: int, name: str = "labels") -> np.ndarray:
    """Labels must be integers 0..C-1 with every value used, one per sample."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(f"{name} has length {lab.shape[0] if lab.ndim else 0}, features have {n} rows")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    if lab.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {lab.min()}")
    c = int(lab.max()) + 1
    used = np.bincount(lab, minlength=c)
    if (used == 0).any():
        missing = np.flatnonzero(used == 0)[:5].tolist()
        raise ValueError(f"{name} are not contiguous 0..{c - 1}: missing {missing}")
    return lab


def unit_rows(x, overwrite: bool = False, block_bytes: int = 32 << 20) -> np.ndarray:
    """``x`` (float32) scaled to unit length along its last axis, in row blocks: the values of
    ``x / max(norm(x), 1e-12)`` without the norm's temporary of squares beside the result. In ``x`` itself
    when ``overwrite`` and ``x`` is a writable C-contiguous float32 array; otherwise in a C-contiguous copy
    (a dtype conversion is that copy)."""
    given = x
    x = np.asarray(x, dtype=np.float32)
    if x is given and not (overwrite and x.flags.c_contiguous and x.flags.writeable):
        x = x.copy(order="C")
    elif not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    rows = x.reshape(-1, x.shape[-1]) if x.ndim else x
    step = max(1, block_bytes // (4 * max(x.shape[-1], 1)))
    for s in range(0, len(rows), step):
        block = rows[s:s + step]
        np.divide(block, np.maximum(np.linalg.norm(block, axis=-1, keepdims=True), 1e-12), out=block)
    return x


def relabel_by_first_index(roots: np.ndarray) -> np.ndarray:
    """Map arbitrary cluster ids to 0..C-1 in ascending order of each cluster's smallest sample index."""
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse].astype(np.int64)


class UnionFind:
    """Union-find over cluster ids where the smaller root absorbs the larger (the BUC convention)."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return int(root)

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if ra < rb:
            self.parent[rb] = ra
        else:
            self.parent[ra] = rb
        return True

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(self.parent.size)], dtype=np.int64)


def resolve_device(features, device=None):
    """Compute device: `device` if given, else a tensor's own device; numpy input computes on CPU."""
    import torch

    if device is not None:
        return torch.device(device)
    if isinstance(features, torch.Tensor):
        return features.device
    return torch.device("cpu")


def shared_tensor(array):
    """``torch.from_numpy`` of an array the caller may have made read-only (an object store's zero-copy
    array, ``np.load(mmap_mode="r")``, ``flags.writeable = False``) without torch's warning that writing
    to it is undefined: nothing in ``ureid.clustering`` writes to its input arrays (every in-place step
    works on arrays it made; a test runs each public function on read-only arrays and compares them)."""
    import warnings

    import torch

    array = np.asarray(array)
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(array)


def as_torch_features(features, device, name: str = "features", ndim: int = 2):
    """A finite floating tensor on `device` with `ndim` dims and at least one row.

    float64 input stays float64 (exact algorithms then compute in double); anything else becomes float32.
    A float32 (float64) CPU array is used in place, read-only arrays included (:func:`shared_tensor`).
    """
    import torch

    x = features.detach() if isinstance(features, torch.Tensor) else shared_tensor(features)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array; got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    x = x.to(device=device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    bad = nonfinite_rows(x)
    if bad:
        raise ValueError(f"{name} contains NaN or infinite values in {bad} row(s)")
    return x.contiguous()


# The most rows of x that ``group_sums`` adds per chunk by default (callers that budget its float64 partial
# sums use it); fewer where a chunk's float64 rows would pass GROUP_SUMS_CHUNK_BYTES: a chunk that stays in
# cache, allocated again from the heap, beats 8192 rows of 1024 columns (64 MB of fresh pages on every call):
# Cluster Contrast's centroids at N = 12,936, d = 2048, 2 threads: 0.04 s against 0.10-0.28 s.
GROUP_SUMS_CHUNK_ROWS = 8192
GROUP_SUMS_CHUNK_BYTES = 2 * 2**20  # PUL's centre sums use the same chunk


def group_sums(x: np.ndarray, groups: np.ndarray, num_groups: int, chunk_rows: int | None = None,
               threads: int | None = None) -> np.ndarray:
    """float64 sum of the rows of each group 0..num_groups-1 (a negative group is left out): (G, d).

    Each group's rows are added one after another in ascending row order, starting from 0.0: bitwise the
    sums of ``np.add.at(sums, groups, x)`` (which is an unbuffered Python-speed loop, 2 s at N = 12,936,
    d = 2048), here a stable sort by group and ``np.add.reduceat`` (a sequential reduction over rows, not
    pairwise) over chunks of at most ``chunk_rows`` sorted rows (None: ``GROUP_SUMS_CHUNK_ROWS``, fewer where
    a chunk of one thread's columns in float64 would pass ``GROUP_SUMS_CHUNK_BYTES``); a group that spans two
    chunks carries its running sum into the next chunk as its first row, so the order of additions never
    changes. The columns are summed in ``threads`` (see :func:`map_threads`) independent ranges, each exactly
    as the whole. Memory: one chunk's rows in float64 per thread beside the (G, d) result.
    """
    groups = np.asarray(groups)
    sums = np.zeros((num_groups, x.shape[1]), dtype=np.float64)
    order = np.flatnonzero(groups >= 0)
    order = order[np.argsort(groups[order], kind="stable")]
    g_sorted = groups[order]
    if not order.size:
        return sums
    bounds = np.linspace(0, x.shape[1], min(resolve_threads(threads), x.shape[1]) + 1).astype(int)
    if chunk_rows is None:  # the widest column range's float64 rows within GROUP_SUMS_CHUNK_BYTES
        width = max(1, int(np.diff(bounds).max(initial=0)))
        chunk_rows = min(GROUP_SUMS_CHUNK_ROWS, max(1, GROUP_SUMS_CHUNK_BYTES // (8 * width)))

    def columns(cols: slice) -> None:
        carry_group, carry = -1, None
        for s in range(0, order.size, chunk_rows):
            g = g_sorted[s:s + chunk_rows]
            rows = x[order[s:s + chunk_rows], cols].astype(np.float64)
            starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
            rows[starts] += 0.0  # 0.0 + x as np.add.at starts (turns a -0.0 into 0.0)
            if carry is not None and g[0] == carry_group:
                rows[0] += carry  # carry + x_first: the very next addition of the sequential sum
            part = np.add.reduceat(rows, starts, axis=0)
            sums[g[starts], cols] = part
            carry_group, carry = int(g[-1]), part[-1]

    map_threads(columns, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])], threads)
    return sums


def resolve_threads(threads: int | None = None) -> int:
    """``threads``, or torch's intra-op thread count when None: what the caller's process may use (the
    feature store sets it from ``ray.store_threads``; a Ray worker starts at 1, a plain process at its cores)."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return max(1, int(threads))


def map_threads(fn, items, threads: int | None = None, pool=None) -> list:
    """``[fn(item) for item in items]`` on up to ``threads`` threads (see :func:`resolve_threads`).

    For NumPy work that releases the GIL (gathers, einsum, reductions) writing disjoint parts of one output:
    every item is computed exactly as in the loop, so the results are bitwise the sequential ones. ``pool``:
    an executor from :func:`thread_pool` to reuse across many calls (a fresh one starts its threads on every
    call: 80 calls of k-means++ seeding).
    """
    items = list(items)
    count = min(resolve_threads(threads), len(items))
    if count <= 1:
        return [fn(item) for item in items]
    if pool is not None:
        return list(pool.map(fn, items))
    with thread_pool(count) as pool:
        return list(pool.map(fn, items))


@contextlib.contextmanager
def thread_pool(threads: int | None = None):
    """A thread pool of ``threads`` workers for :func:`map_threads` calls in a loop, or None for one thread."""
    count = resolve_threads(threads)
    if count <= 1:
        yield None
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(count) as pool:
        yield pool


def matmul_t(a, b):
    """``a @ b.T`` for 2-D torch tensors. On CPU through NumPy's BLAS (OpenBLAS in the NumPy wheel): at the
    row blocks the label updates use, torch's CPU matmul (MKL) took 1.4x as long here (5.2 s against 3.7 s
    for every product of N = 12,936, d = 2048 in blocks of 1,729 rows, 2 threads). On CUDA, torch's."""
    import torch

    if a.device.type != "cpu" or b.device.type != "cpu" or a.requires_grad or b.requires_grad:
        return a @ b.T
    return torch.from_numpy(np.matmul(a.contiguous().numpy(), b.contiguous().numpy().T))
