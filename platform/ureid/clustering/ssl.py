"""SSL label update: each image's reliable neighbours for the softened labels.

Lin, Xie, Wu, Yan, Tian, "Unsupervised Person Re-identification via Softened Similarity Learning", CVPR 2020.
Every image is its own class; its soft target puts ``1 - lambda`` on the classes of its k most reliable
neighbours, found with the paper's combined distance:

    D(a, b) = (1 - part_weight) * ||g_a - g_b||
              + part_weight * mean_p ||f^p_a - f^p_b||
              + camera_penalty * [cam_a == cam_b]

(plain, not squared, Euclidean distances; ``camera_penalty`` is the cross-camera encouragement lambda_c that
makes same-camera pairs look farther apart).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ._common import as_torch_features, matmul_t, resolve_device, row_sq, shared_tensor

# Bytes of the per-block distance tensors held at once.
_BLOCK_BYTES = 256 * 2**20


def reliable_neighbors(global_features, part_features, cameras, num_neighbors, part_weight, camera_penalty,
                       device=None, map_blocks=None, stats=None) -> np.ndarray:
    """The ``num_neighbors`` samples with the smallest D (module docstring) for every sample.

    Args:
        global_features: (N, d) global features.
        part_features: (N, P, d_p) stripe features, or None (then ``part_weight`` must be 0).
        cameras: (N,) integer camera ids.
        num_neighbors: k, 1 <= k <= N-1 (the paper uses 4).
        part_weight: lambda_p in [0, 1] (0.5 in the paper).
        camera_penalty: lambda_c >= 0 (0.02 in the paper).
        device: torch device; default: the device of a tensor input, else CPU.
        map_blocks: optional executor ``map_blocks(fn, shared, items)`` (as for :func:`bottom_up_merge`): on
            CPU the row blocks (the same blocks, so the same arithmetic) run through it
            (:func:`neighbor_block`), e.g. as parallel Ray tasks.
        stats: optional dict, filled with ``mapped_blocks`` (blocks sent through ``map_blocks``).

    Returns:
        (N, k) int64 indices (numpy), each row ascending in D, ties by the smaller index; the sample itself is
        never its own neighbour. D is formed one block of rows at a time (block x N), never N x N; it is
        computed in float64 when any feature input is float64, else float32.
    """
    dev = resolve_device(global_features, device)
    g = as_torch_features(global_features, dev, "global_features")
    n = g.shape[0]
    if not (isinstance(part_weight, numbers.Real) and 0 <= part_weight <= 1):
        raise ValueError(f"part_weight must be in [0, 1], got {part_weight!r}")
    if not (isinstance(camera_penalty, numbers.Real) and math.isfinite(camera_penalty) and camera_penalty >= 0):
        raise ValueError(f"camera_penalty must be a finite number >= 0, got {camera_penalty!r}")
    if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, numbers.Integral) \
            or not 1 <= num_neighbors <= n - 1:
        raise ValueError(f"num_neighbors must be an integer in [1, N-1] = [1, {n - 1}], got {num_neighbors!r}")
    parts = None
    if part_features is None:
        if part_weight != 0:
            raise ValueError(f"part_features is None, so part_weight must be 0, got {part_weight!r}")
    else:
        parts = as_torch_features(part_features, dev, "part_features", ndim=3)
        if parts.shape[0] != n:
            raise ValueError(f"part_features has {parts.shape[0]} rows, global_features has {n}")
        if part_weight == 0:
            parts = None  # contributes nothing; skip the P extra products
    cam = cameras.detach() if isinstance(cameras, torch.Tensor) else shared_tensor(cameras)
    if cam.shape != (n,) or cam.dtype.is_floating_point or cam.dtype == torch.bool:
        raise ValueError(f"cameras must be an integer array of shape ({n},), got {cam.dtype} {tuple(cam.shape)}")
    cam = cam.to(dev)

    dtype = torch.float64 if g.dtype == torch.float64 or (parts is not None and parts.dtype == torch.float64) \
        else torch.float32
    g = g.to(dtype)
    g_sq = row_sq(g)
    if parts is not None:
        # kept (N, P, d_p): the batched product reads each stripe as a strided view (P, N, d_p), bitwise
        # what a transposed copy gives, without that copy (P times the global features: 8 x 2048 a row in
        # the paper's config)
        parts = parts.to(dtype)
        p_sq = torch.stack([row_sq(parts[:, i]) for i in range(parts.shape[1])])  # (P, N)
    layers = 3 * (1 + (0 if parts is None else parts.shape[1]))  # block x N tensors alive at once, temporaries included
    step = max(1, _BLOCK_BYTES // (layers * n * g.element_size()))
    spans = [(s, min(n, s + step)) for s in range(0, n, step)]
    penalty = None  # camera_penalty where the cameras match, else 0: one row per camera, gathered per block row
    if camera_penalty != 0:
        cams, cam = torch.unique(cam, return_inverse=True)  # cam: each sample's row of the table
        penalty = camera_penalty * (torch.arange(cams.numel(), device=dev)[:, None] == cam[None, :]).to(dtype)
    state = (g, g_sq, parts, p_sq if parts is not None else None, cam, penalty, part_weight)
    if map_blocks is not None and dev.type == "cpu" and len(spans) > 1:
        shared = tuple(t.numpy() if isinstance(t, torch.Tensor) else t for t in state)
        out = map_blocks(neighbor_block, shared, [(s, e, num_neighbors) for s, e in spans])
        if stats is not None:
            stats["mapped_blocks"] = stats.get("mapped_blocks", 0) + len(spans)
        return np.concatenate(out)
    return np.concatenate([_block(state, s, e, num_neighbors) for s, e in spans])


def _block(state, start: int, stop: int, k: int) -> np.ndarray:
    """The k reliable neighbours of rows start..stop-1 (one block x N slice of D).

    D is formed with the arithmetic of the module docstring term by term (``|a|^2 + |b|^2 - 2 a.b`` rounded
    once, as ``a_sq + b_sq - 2 * dot`` is, since 2 * dot is exact). Without stripes the block takes
    :func:`_global_block`, which forms D only at a few candidates per row and gives the same neighbours.
    """
    g, g_sq, parts, p_sq, cam, penalty, part_weight = state
    if parts is None and _candidates(k) < g.shape[0] - 1:
        return _global_block(state, start, stop, k)
    rows = torch.arange(start, stop, device=g.device)
    dist = _euclid_(g_sq[start:stop, None] + g_sq[None, :], matmul_t(g[start:stop], g))
    if part_weight != 0:
        dist.mul_(1 - part_weight)
    if parts is not None:
        stripes = parts.transpose(0, 1)  # (P, N, d_p), a view
        prod = torch.bmm(stripes[:, rows], stripes.transpose(1, 2))  # (P, block, N)
        dist += part_weight * _euclid(p_sq[:, rows, None], p_sq[:, None, :], prod).mean(0)
    return _full_rows(dist, rows, cam, penalty, k).cpu().numpy().astype(np.int64)


def _full_rows(dist: torch.Tensor, rows: torch.Tensor, cam, penalty, k: int) -> torch.Tensor:
    """The k neighbours of ``rows`` from their whole (len(rows), N) block of D before the camera term:
    the penalty added, each row's own column set to inf (never its own neighbour), in place."""
    if penalty is not None:
        dist += penalty[cam[rows]]
    dist[torch.arange(rows.numel(), device=dist.device), rows] = torch.inf
    return _smallest_by_value_then_index(dist, k)


def _candidates(k: int) -> int:
    """Candidates per row in :func:`_global_block`: the k neighbours, a tie at the cut and some slack for
    same-camera images that the penalty pushes back."""
    return 2 * k + 16


def _global_block(state, start: int, stop: int, k: int) -> np.ndarray:
    """:func:`_block` without stripes: the same D at a few candidates per row, the neighbours it gives.

    Past the product every pass over a block x N tensor costs a few percent of it, and the full D takes six
    (|a|^2 + |b|^2, - 2 a.b, clamp, sqrt, the camera table's rows, + penalty). Here a top-k of the products
    picks the m = :func:`_candidates` largest per row, and D is formed exactly as in :func:`_block` (the same
    rounded operations on the same products) at those m only. Exactness: with u the unit roundoff and delta
    the m-th largest product, every column left out has ``s = fl(fl(|a|^2 + |b|^2) - 2 a.b) >= |a|^2 +
    min|b|^2 - 2 delta - eps`` (two roundings, at most 3 u (|a|^2 + max|b|^2); eps is four times that, a
    margin that also covers the float64 arithmetic of the bound), and, as the rounded sqrt and the penalty
    (>= 0) never go below it, ``D >= sqrt(that) (1 - 4 u)`` = L. A row whose k-th D is below L has its k
    neighbours, ties included, among the candidates; the others (many equal or near-equal distances, or rows
    far from unit length, where ranking by a.b alone is loose) take the full row from the same products.
    """
    g, g_sq, _, _, cam, penalty, _ = state
    n, m, dev = g.shape[0], _candidates(k), g.device
    rows = torch.arange(start, stop, device=dev)
    here = torch.arange(rows.numel(), device=dev)
    dot = matmul_t(g[start:stop], g)
    # never its own neighbour (finite elsewhere: finite features); a row redone in full gets D = inf there
    dot[here, rows] = -torch.inf
    delta, cols = torch.topk(dot, m, dim=1, largest=True, sorted=True)
    cols = cols.sort(dim=1).values  # candidate order = column order, so ties go to the smaller index
    dist = _euclid_(g_sq[start:stop, None] + g_sq[cols], dot.gather(1, cols))
    if penalty is not None:
        dist += penalty[cam[start:stop, None], cols]
    pick = _smallest_by_value_then_index(dist, k)
    out = cols.gather(1, pick)
    u = 2.0 ** -53 if g.dtype == torch.float64 else 2.0 ** -24
    a_sq = g_sq[start:stop].double()
    eps = 12 * u * (a_sq + g_sq.max().double())
    bound = (a_sq + g_sq.min().double() - 2 * delta[:, m - 1].double() - eps).clamp_min(0).sqrt() * (1 - 4 * u)
    redo = (dist.gather(1, pick[:, k - 1:]).squeeze(1).double() >= bound).nonzero().reshape(-1)
    if redo.numel():
        out[redo] = _full_rows(_euclid_(g_sq[start + redo, None] + g_sq[None, :], dot[redo]), start + redo, cam,
                               penalty, k)
    return out.cpu().numpy().astype(np.int64)


def neighbor_block(shared, job) -> np.ndarray:
    """One row block of :func:`reliable_neighbors`, ``shared`` its prepared arrays (numpy, read zero-copy),
    ``job = (start, stop, k)``: the unit of work a ``map_blocks`` executor runs."""
    state = tuple(shared_tensor(a) if isinstance(a, np.ndarray) else a for a in shared)
    return _block(state, *job)


def _euclid(a_sq: torch.Tensor, b_sq: torch.Tensor, dot: torch.Tensor) -> torch.Tensor:
    """||a - b|| from squared norms and the dot product (clamped: rounding can make the square negative)."""
    return (a_sq + b_sq - 2 * dot).clamp_min_(0).sqrt_()


def _euclid_(sq_sum: torch.Tensor, dot: torch.Tensor) -> torch.Tensor:
    """``_euclid`` in place in ``sq_sum`` (= a_sq + b_sq): the same rounding, two block x N passes fewer."""
    return sq_sum.add_(dot, alpha=-2).clamp_min_(0).sqrt_()


def _smallest_by_value_then_index(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k smallest entries per row, ordered by (value, index).

    ``topk`` breaks ties arbitrarily, so the k picked are re-sorted by (value, index); a row where the k-th
    value also occurs outside the pick (a tie straddling the cut) is redone with a stable full sort, which
    keeps the smallest indices among equal values.
    """
    if k < dist.shape[1]:
        # one more than needed: a tie straddles the cut exactly when the (k+1)-th smallest equals the k-th
        val, col = torch.topk(dist, k + 1, dim=1, largest=False, sorted=True)
        straddle = (val[:, k] == val[:, k - 1]).nonzero().reshape(-1)
        val, col = val[:, :k], col[:, :k]
    else:
        val, col = torch.topk(dist, k, dim=1, largest=False, sorted=False)
        straddle = torch.empty(0, dtype=torch.long)
    col, perm = col.sort(dim=1)
    val = val.gather(1, perm)
    val, perm = val.sort(dim=1, stable=True)
    col = col.gather(1, perm)
    if straddle.numel():
        col[straddle] = dist[straddle].sort(dim=1, stable=True).indices[:, :k]
    return col
