"""Memory-table losses (BUC/DBC/camstyle repelled loss, SSL softened loss) and PUL's classifier head.

Every loss is an ``nn.Module`` called as ``loss_fn(outputs, targets, indices) -> scalar``: ``outputs`` is the
:class:`~ureid.models.backbone.ReidNet` output dict, ``targets`` the pseudo labels, ``indices`` the dataset
indices of the batch. Memories are buffers, so ``state_dict()`` checkpoints them; loading resizes them.

DDP: each replica holds its own copy of the memory. The update is applied to the all-gathered batch (rank
order) on every replica, so the copies stay bit-identical; the gradient stays local and DDP averages the
parameter gradients as usual.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .invariance import SampleDropout


def gather_batch(x: torch.Tensor, y: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather ``(x, y)`` across ranks in rank order; identity when not distributed.

    Batches may differ in size across ranks (e.g. an uneven last batch), so sizes are exchanged first and
    the tensors padded to the largest one.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x, y
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    m = max(sizes)
    xp = x.new_zeros((m, *x.shape[1:]))
    xp[: x.shape[0]] = x
    yp = y.new_zeros((m,))
    yp[: y.shape[0]] = y
    xs = [torch.empty_like(xp) for _ in range(world)]
    ys = [torch.empty_like(yp) for _ in range(world)]
    dist.all_gather(xs, xp.contiguous(), group=group)
    dist.all_gather(ys, yp.contiguous(), group=group)
    return torch.cat([t[:s] for t, s in zip(xs, sizes)]), torch.cat([t[:s] for t, s in zip(ys, sizes)])


@torch.no_grad()
def memory_update_(memory: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """BUC's memory update, one sample at a time in batch order: ``V[y] <- normalise((V[y] + x) / 2)``.

    The sequential loop is deliberate: when a label repeats in a batch, the second sample must see the row
    already moved by the first (as BUC's ``Exclusive.backward`` does); batches are small (16 per rank).
    """
    x = x.to(memory.dtype)
    for xi, yi in zip(x, y.tolist()):
        memory[yi] = F.normalize((memory[yi] + xi) / 2, dim=0)


@torch.no_grad()
def momentum_update_(memory: torch.Tensor, x: torch.Tensor, y: torch.Tensor, momentum: float) -> None:
    """Cluster Contrast's memory update (Dai et al. 2021, eq. 3), in batch order:
    ``V[y] <- normalise(m V[y] + (1 - m) x)`` for every sample, as its ``CM.backward`` loop does.

    Samples of different clusters never touch the same row, so the loop runs over the position of a
    sample among its cluster's samples (at most ``num_instances`` steps for a clusters x instances batch),
    each step updating every cluster at once; a cluster's samples are still applied in batch order.
    """
    x = x.to(memory.dtype)
    y = y.to(torch.long)
    if y.numel() == 0:
        return
    order = torch.argsort(y, stable=True)           # samples grouped by cluster, batch order kept
    ys = y[order]
    start = torch.ones_like(ys, dtype=torch.bool)
    start[1:] = ys[1:] != ys[:-1]
    group_start = torch.cummax(torch.where(start, torch.arange(ys.numel(), device=ys.device), 0), 0).values
    position = torch.arange(ys.numel(), device=ys.device) - group_start
    for t in range(int(position.max()) + 1):
        at = order[position == t]                   # the t-th sample of every cluster that has one
        rows = y[at]
        moved = momentum * memory[rows] + (1.0 - momentum) * x[at]
        memory[rows] = moved / moved.norm(dim=1, keepdim=True)


@torch.no_grad()
def hard_momentum_update_(memory: torch.Tensor, x: torch.Tensor, y: torch.Tensor, momentum: float) -> None:
    """The ``--use-hard`` variant of Cluster Contrast's update: each cluster in the batch moves once, towards
    its *hardest* sample (the least similar to the cluster's row before the update; the first such sample
    on ties): ``V[y] <- normalise(m V[y] + (1 - m) x_hard)``. The public ``CM_Hard.backward`` means this
    (it picks ``argmin`` of the similarities) but cannot run as written (it names undefined variables)."""
    x = x.to(memory.dtype)
    y = y.to(torch.long)
    if y.numel() == 0:
        return
    sims = (x * memory[y]).sum(1)
    rows = torch.unique(y)
    hard = torch.empty_like(rows)
    for k, row in enumerate(rows.tolist()):  # at most (batch / num_instances) clusters
        members = torch.nonzero(y == row).flatten()
        hard[k] = members[torch.argmin(sims[members])]
    moved = momentum * memory[rows] + (1.0 - momentum) * x[hard]
    memory[rows] = moved / moved.norm(dim=1, keepdim=True)


class _MemoryLogits(torch.autograd.Function):
    """``x . V^T`` whose backward returns ``grad . V`` and then updates ``V`` with the (gathered) batch.

    Modern form of BUC's ``Exclusive`` function. ``V`` is saved for backward so that autograd's version
    counter raises if anything modified the table between forward and backward (the gradient must use the
    same ``V`` the logits did).
    """

    @staticmethod
    def forward(x, memory, upd_x, upd_y, update_fn):
        return x.mm(memory.t())

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, memory, upd_x, upd_y, update_fn = inputs
        ctx.save_for_backward(memory)
        ctx.upd = (upd_x, upd_y, update_fn)

    @staticmethod
    def backward(ctx, grad_output):
        (memory,) = ctx.saved_tensors
        grad_x = grad_output.mm(memory.to(grad_output.dtype)) if ctx.needs_input_grad[0] else None
        upd_x, upd_y, update_fn = ctx.upd
        if upd_x is not None:
            update_fn(memory, upd_x, upd_y)  # after the gradient, as in BUC and Cluster Contrast
        return grad_x, None, None, None, None


def memory_logits(x: torch.Tensor, memory: torch.Tensor, labels: torch.Tensor, temperature: float,
                  update: bool = True, group=None, update_fn=memory_update_) -> torch.Tensor:
    """Logits ``x . V^T / temperature`` (the non-parametric softmax of BUC's repelled loss)
    with the memory updated in backward by ``update_fn(memory, x, labels)`` (BUC's by default)."""
    x = x.to(memory.dtype)
    upd_x = upd_y = None
    if update and torch.is_grad_enabled() and x.requires_grad:
        # Gathered in forward (not backward): all ranks reach forward in lock-step, before any of DDP's
        # gradient all-reduces, so collective order can never interleave differently across ranks.
        upd_x, upd_y = gather_batch(x.detach(), labels.detach(), group)
    return _MemoryLogits.apply(x, memory, upd_x, upd_y, update_fn) / temperature


class _ResizableMemory(nn.Module):
    """Buffers whose size follows the checkpoint on ``load_state_dict`` (the class count changes per stage)."""

    _resizable: tuple[str, ...] = ()
    _optional: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in self._resizable:
            key = prefix + name
            cur = self._buffers.get(name)
            if key in state_dict:
                src = state_dict[key]
                if cur is None or cur.shape != src.shape or cur.dtype != src.dtype:
                    device = cur.device if cur is not None else self.memory.device
                    self._buffers[name] = torch.empty(src.shape, dtype=src.dtype, device=device)
            elif name in self._optional:
                self._buffers[name] = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _embedding(outputs) -> torch.Tensor:
    emb = outputs["embedding"] if isinstance(outputs, dict) else outputs
    if emb is None:
        raise ValueError("the model has no embedding head (embedding_dim=0); memory losses need one")
    return emb


class MemoryTable(_ResizableMemory):
    """Repelled loss of BUC (Lin et al., AAAI 2019, Sec. 3), also used by DBC and camstyle-BUC.

    ``p(c | x) = exp(V_c . x / tau) / sum_j exp(V_j . x / tau)``, loss ``-log p(y | x)`` with the pseudo label
    ``y``; the table ``V`` (C x d) is zeroed by :meth:`reset` at every stage and, after the gradient, each
    sample updates its row in batch order: ``V[y] <- normalise((V[y] + x) / 2)``.
    """

    _resizable = ("memory",)

    def __init__(self, num_features: int, num_classes: int = 0, temperature: float = 0.1, process_group=None):
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be > 0, got {num_features}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_features, self.temperature, self.process_group = num_features, temperature, process_group
        self.register_buffer("memory", torch.zeros(num_classes, num_features))

    @property
    def num_classes(self) -> int:
        return self.memory.shape[0]

    def reset(self, num_classes: int) -> None:
        """Zero the table for a new stage with ``num_classes`` pseudo classes."""
        if num_classes <= 0:
            raise ValueError(f"num_classes must be > 0, got {num_classes}")
        self.memory = torch.zeros(num_classes, self.num_features, device=self.memory.device,
                                  dtype=self.memory.dtype)

    def forward(self, outputs, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes == 0:
            raise ValueError("MemoryTable has 0 classes: call reset(num_classes) before training")
        logits = memory_logits(_embedding(outputs), self.memory, targets, self.temperature,
                               group=self.process_group)
        return F.cross_entropy(logits, targets)


RepelledLoss = MemoryTable


class ClusterMemory(_ResizableMemory):
    """Cluster Contrast's ClusterNCE over a cluster-level memory (Dai et al. 2021, eqs. 2-3).

    The memory holds one L2-normalised row per cluster, initialised by :meth:`reset` from the cluster
    centroids of the stage's features; the loss is ``-log softmax(q . V^T / tau)[y]`` with ``q`` the
    L2-normalised ``pooled`` feature, and after the gradient every sample of the (all-gathered) batch moves
    its cluster's row with momentum ``m`` (:func:`momentum_update_`; ``use_hard``: each cluster's hardest
    sample only, :func:`hard_momentum_update_`). Every DDP replica applies the same gathered batch, so the
    replicas' memories stay identical.
    """

    _resizable = ("memory",)

    def __init__(self, num_features: int, temperature: float = 0.05, momentum: float = 0.2,
                 use_hard: bool = False, process_group=None):
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be > 0, got {num_features}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_features, self.temperature, self.momentum = num_features, temperature, momentum
        self.use_hard, self.process_group = use_hard, process_group
        self.register_buffer("memory", torch.zeros(0, num_features))

    @property
    def num_classes(self) -> int:
        return self.memory.shape[0]

    def reset(self, centroids) -> None:
        """A new stage's memory: the L2-normalised ``centroids`` (C, d), one row per cluster."""
        if isinstance(centroids, torch.Tensor):  # NumPy 2 deprecates torch's __array__ (no copy keyword)
            c = centroids.detach().to("cpu", torch.float32)  # no copy needed: F.normalize below makes the memory
        else:
            c = torch.tensor(np.array(centroids, dtype=np.float32))  # a copy: store results are read-only
        if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] != self.num_features:
            raise ValueError(f"centroids must be (C >= 1, {self.num_features}), got {tuple(c.shape)}")
        self.memory = F.normalize(c, dim=1).to(self.memory.device)

    def _update(self, memory, x, y) -> None:
        (hard_momentum_update_ if self.use_hard else momentum_update_)(memory, x, y, self.momentum)

    def forward(self, outputs, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes == 0:
            raise ValueError("ClusterMemory is empty: call reset(centroids) before training")
        q = F.normalize(outputs["pooled"] if isinstance(outputs, dict) else outputs, dim=1)
        logits = memory_logits(q, self.memory, targets, self.temperature, group=self.process_group,
                               update_fn=self._update)
        return F.cross_entropy(logits, targets)


class SoftenedMemoryLoss(_ResizableMemory):
    """Softened similarity loss of SSL (Lin et al., CVPR 2020, eq. 4) over an N-row instance memory.

    Every image ``i`` is its own class (the dataset index). Target: ``soft_weight`` (lambda = 0.6) on class
    ``i`` and ``(1 - lambda) / k`` on each of its ``k`` reliable neighbours (set by :meth:`set_neighbors`);
    loss ``-sum_c t_c log p(c | x)`` with ``p`` the memory softmax at ``temperature``. With no neighbours
    (stage 0) the target is one-hot, i.e. plain instance cross-entropy. The memory update is BUC's.
    """

    _resizable = ("memory", "neighbors")
    _optional = ("neighbors",)

    def __init__(self, num_features: int, num_samples: int, temperature: float = 0.1, soft_weight: float = 0.6,
                 process_group=None):
        super().__init__()
        if num_features <= 0 or num_samples <= 0:
            raise ValueError(f"num_features and num_samples must be > 0, got {num_features}, {num_samples}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 < soft_weight <= 1.0:
            raise ValueError(f"soft_weight (lambda) must be in (0, 1], got {soft_weight}")
        self.num_features, self.temperature, self.soft_weight = num_features, temperature, soft_weight
        self.process_group = process_group
        self.register_buffer("memory", torch.zeros(num_samples, num_features))
        self.register_buffer("neighbors", None)

    @property
    def num_samples(self) -> int:
        return self.memory.shape[0]

    def reset(self, num_samples: int | None = None) -> None:
        """Zero the memory (optionally resized) and drop the neighbours."""
        n = self.num_samples if num_samples is None else num_samples
        self.memory = torch.zeros(n, self.num_features, device=self.memory.device, dtype=self.memory.dtype)
        self.neighbors = None

    def set_neighbors(self, neighbors) -> None:
        """Set the (N, k) reliable-neighbour indices of every image; ``None`` returns to hard labels."""
        if neighbors is None:
            self.neighbors = None
            return
        if not isinstance(neighbors, torch.Tensor):  # a copy: a read-only array (the store's, through Ray's
            neighbors = np.array(neighbors, dtype=np.int64)  # object store) made torch warn on every worker
        nb = torch.as_tensor(neighbors, dtype=torch.long, device=self.memory.device)
        n = self.num_samples
        if nb.ndim != 2 or nb.shape[0] != n or nb.shape[1] == 0:
            raise ValueError(f"neighbors must have shape (num_samples={n}, k>=1), got {tuple(nb.shape)}")
        if nb.min() < 0 or nb.max() >= n:
            raise ValueError(f"neighbors must be indices in [0, {n}), got range [{int(nb.min())}, {int(nb.max())}]")
        if (nb == torch.arange(n, device=nb.device)[:, None]).any():
            raise ValueError("neighbors must not contain the image itself (its own class already gets lambda)")
        self.neighbors = nb

    def soft_targets(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, N) target distribution of eq. 4; every row sums to 1."""
        t = torch.zeros(indices.shape[0], self.num_samples, device=self.memory.device, dtype=self.memory.dtype)
        if self.neighbors is None:
            return t.scatter_(1, indices[:, None], 1.0)
        nb = self.neighbors[indices]
        t.scatter_(1, indices[:, None], self.soft_weight)
        # scatter_add so that a repeated neighbour index still keeps the row summing to 1.
        return t.scatter_add_(1, nb, torch.full(nb.shape, (1 - self.soft_weight) / nb.shape[1],
                                                device=t.device, dtype=t.dtype))

    def forward(self, outputs, targets: torch.Tensor | None, indices: torch.Tensor) -> torch.Tensor:
        # The class of an image is its dataset index; ``targets`` is ignored.
        logits = memory_logits(_embedding(outputs), self.memory, indices, self.temperature,
                               group=self.process_group)
        if self.neighbors is None:
            return F.cross_entropy(logits, indices)
        return -(self.soft_targets(indices) * F.log_softmax(logits, dim=1)).sum(1).mean()


class ClassifierHead(nn.Module):
    """PUL's fine-tuning classifier (Fan et al., TOMM 2018): Dropout -> Linear(in_dim, K) + cross-entropy.

    Applied to ``outputs[feature]`` (the pooled trunk feature by default, as PUL's Keras code). A fresh head
    is built for every PUL iteration since the clusters change. Its parameters live outside the model:
    give them to the optimizer (``build_optimizer(..., extra_params=head)``); under DDP
    :func:`ureid.engine.train.train_epoch` averages their gradients across ranks.
    """

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.5, feature: str = "pooled"):
        super().__init__()
        if in_dim <= 0 or num_classes <= 0:
            raise ValueError(f"in_dim and num_classes must be > 0, got {in_dim}, {num_classes}")
        if feature not in ("pooled", "embedding"):
            raise ValueError(f"feature must be 'pooled' or 'embedding', got {feature!r}")
        self.feature = feature
        self.drop = SampleDropout(dropout)
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.001)
        nn.init.zeros_(self.fc.bias)

    def logits(self, outputs) -> torch.Tensor:
        x = outputs[self.feature] if isinstance(outputs, dict) else outputs
        return self.fc(self.drop(x))

    def forward(self, outputs, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(self.logits(outputs), targets)
