"""Exact blockwise k-nearest-neighbour search by squared Euclidean distance.

Two interchangeable backends return the same neighbour lists (up to the order of exactly tied
distances): ``"faiss"`` (``faiss.knn``, the brute-force search behind ``IndexFlatL2``, on the caller's
array; CPU, BLAS-blocked internally) and ``"torch"`` (one ``queries_block @ database.T`` matmul plus
``torch.topk`` per block of ``block_size`` queries, on CPU or CUDA). Memory is O(block_size * n_database + n_queries * k); no N x N matrix is built.

Distances are computed in float32 as ``|q|^2 + |x|^2 - 2 q.x``. :func:`sqdist_error_bound` gives a
rigorous bound on that rounding error, so callers that need *exact* answers can turn a returned
k-th distance into a safe lower bound on every distance that was not returned.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ._common import import_faiss

BACKENDS = ("faiss", "torch")


def sqdist_error_bound(dim: int, norm_a, norm_b, float64_matmul: bool = False):
    """Upper bound on |fl32(|a-b|^2) - |a-b|^2| for the norm-expansion formula.

    The classical dot-product bound |fl(a.b) - a.b| <= gamma_d |a||b| with gamma_d = d u / (1 - d u),
    u = 2^-24 (Higham, *Accuracy and Stability of Numerical Algorithms*, eq. 3.5), applied to the
    three terms |a|^2, |b|^2 and 2 a.b, gives gamma_{d+2} (|a| + |b|)^2. We double it for margin
    (blocked/split-K summation is no worse than the serial bound).
    """
    u = 2.0**-53 if float64_matmul else 2.0**-24
    g = (dim + 2) * u / (1.0 - (dim + 2) * u)
    return 2.0 * g * (np.asarray(norm_a, dtype=np.float64) + np.asarray(norm_b, dtype=np.float64)) ** 2


@contextlib.contextmanager
def faiss_threads(num_threads: int | None):
    """Temporarily cap faiss' OpenMP threads (None: leave faiss' default, i.e. OMP_NUM_THREADS)."""
    if num_threads is None:
        yield
        return
    faiss = import_faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(num_threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _torch_needs_float64(device) -> bool:
    """TF32 / reduced-precision float32 matmuls would void the error bound; use float64 instead."""
    import torch

    if torch.device(device).type != "cuda":
        return False
    return torch.get_float32_matmul_precision() != "highest" or bool(torch.backends.cuda.matmul.allow_tf32)


class ExactKnn:
    """Exact k-NN by squared L2 distance over a fixed database, searched one block of queries at a time.

    ``database``: (n, d) float32 numpy array (faiss) or numpy/torch array (torch; moved to ``device``).
    ``search(queries, k)`` returns ``(sqdist float32 (q, k), ids int64 (q, k))`` as numpy arrays,
    ascending by distance. ``k`` must be <= n.
    """

    def __init__(self, database, *, backend: str = "faiss", device=None, block_size: int = 4096,
                 num_threads: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.backend, self.block_size, self.num_threads = backend, int(block_size), num_threads
        self.n, self.dim = int(database.shape[0]), int(database.shape[1])
        if backend == "faiss":
            # searched in place with faiss.knn (IndexFlatL2's own search routine, knn_L2sqr, on the caller's
            # array): an IndexFlatL2 would hold a second copy of the database
            self.database = np.ascontiguousarray(np.asarray(database), dtype=np.float32)
            self.float64_matmul = False
        else:
            import torch

            db = torch.as_tensor(database)
            self.device = torch.device(device) if device is not None else db.device
            self.float64_matmul = _torch_needs_float64(self.device)
            dtype = torch.float64 if self.float64_matmul else torch.float32
            self.db = db.to(self.device, dtype)
            self.db_sqnorm = (self.db * self.db).sum(1)

    def search(self, queries, k: int):
        if not 1 <= k <= self.n:
            raise ValueError(f"k must be in 1..{self.n} (database size), got {k}")
        nq = int(queries.shape[0])
        dist = np.empty((nq, k), dtype=np.float32)
        ids = np.empty((nq, k), dtype=np.int64)
        if self.backend == "faiss":
            q = np.ascontiguousarray(np.asarray(queries), dtype=np.float32)
            faiss = import_faiss()
            with faiss_threads(self.num_threads):
                for s in range(0, nq, self.block_size):
                    dist[s:s + self.block_size], ids[s:s + self.block_size] = faiss.knn(
                        q[s:s + self.block_size], self.database, k)
            return dist, ids
        import torch

        q_all = torch.as_tensor(queries)
        with torch.no_grad():
            for s in range(0, nq, self.block_size):
                q = q_all[s:s + self.block_size].to(self.device, self.db.dtype)
                d = (q * q).sum(1, keepdim=True) + self.db_sqnorm[None, :] - 2.0 * (q @ self.db.T)
                d.clamp_(min=0.0)  # rounding can make |q-x|^2 slightly negative; faiss clamps too
                val, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
                dist[s:s + len(q)] = val.float().cpu().numpy()
                ids[s:s + len(q)] = idx.cpu().numpy()
        return dist, ids


def knn_search_block(database, job):
    """One block of an exact k-NN search over ``database``, ``job = (queries, k)``: the unit of work a
    ``map_blocks`` executor runs (in another process or on another node), as ``(sqdist, ids)``.

    A ``map_blocks(fn, shared, items)`` executor returns ``[fn(shared, item) for item in items]`` in the
    order of ``items``, however it schedules them (e.g. as parallel Ray tasks with ``shared`` put once).
    """
    queries, k = job
    return ExactKnn(database, backend="faiss", block_size=max(1, len(queries))).search(queries, k)
