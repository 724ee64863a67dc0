"""Training that does not depend on the number of workers: BatchNorm over the global batch on any device,
and dropout masks drawn per sample.

With the global batch fixed (``epoch_order`` deals one seeded permutation over the ranks), DDP averaging the
ranks' half-batch gradients and the memory tables updated from the all-gathered batch, two things still
make N workers at ``batch_size`` B differ from one worker at N*B:

* **BatchNorm** normalises each worker's share of the batch. torch's ``SyncBatchNorm`` fixes that on GPUs
  only (it refuses CPU tensors); :class:`GlobalBatchNorm` does the same on any device, with plain
  ``all_reduce`` of the per-channel sums (gloo on CPU).
* **Dropout** draws from each rank's global generator, so the mask a sample gets depends on where it was
  processed. :class:`SampleDropout` draws it from a generator keyed by ``(stage seed, epoch, step, sample
  index)`` whenever the training loop hands it the batch's keys (:func:`set_sample_keys`).

Both are opt-in (``train.sync_batchnorm``, ``train.per_sample_dropout``): the all-reduces cost two
collectives per BatchNorm layer and step (MobileNetV2 has 52), and per-sample masks change the random
stream of the default presets.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GlobalBatchNormFn(torch.autograd.Function):
    """Batch normalisation with the statistics of the global batch (Ioffe & Szegedy 2015, Alg. 1, the mean
    and variance taken over every rank's samples).

    Backward: with ``xhat = (x - mu) / sigma`` and ``g = dL_r/dy`` each rank's local gradient,
    ``dx = w / sigma * (g - mean(g) - xhat * mean(g * xhat))`` with both means over the global batch (one
    all-reduce); DDP's averaging of the parameter gradients then gives the exact gradient of the mean loss,
    as in torch's SyncBatchNorm.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        dist.all_reduce(stats)
        c = x.shape[1]
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        shape = [1, c] + [1] * (x.dim() - 2)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.total, ctx.shape, ctx.dims = total, shape, dims
        y = xhat * weight.view(shape) + bias.view(shape) if weight is not None else xhat
        return y, mean.detach(), var.detach(), total.detach()

    @staticmethod
    def backward(ctx, grad_y, _gm, _gv, _gt):
        xhat, weight, invstd = ctx.saved_tensors
        shape, dims = ctx.shape, ctx.dims
        local_db = grad_y.sum(dims)
        local_dw = (grad_y * xhat).sum(dims)
        sums = torch.cat([local_db, local_dw])
        dist.all_reduce(sums)
        c = xhat.shape[1]
        mean_dy, mean_dy_xhat = sums[:c] / ctx.total, sums[c:] / ctx.total
        scale = invstd * (weight if weight is not None else 1.0)
        dx = scale.view(shape) * (grad_y - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape))
        # the parameters' gradients stay local: DDP averages them over the ranks
        return dx, (local_dw if weight is not None else None), (local_db if weight is not None else None), None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer (1d/2d/3d alike) whose training statistics are those of the global batch when a
    process group of more than one rank is initialised; otherwise exactly ``F.batch_norm``. Running
    statistics are updated with the global mean and the unbiased global variance, as torch's SyncBatchNorm."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world() == 1:
            return super().forward(x)
        y, mean, var, total = _GlobalBatchNormFn.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (total / (total - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y


def convert_batchnorm(module: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Every BatchNorm layer of ``module`` over the global batch: torch's SyncBatchNorm on CUDA, a
    :class:`GlobalBatchNorm` elsewhere (weights, buffers and train/eval mode carried over, so frozen layers
    kept in eval mode stay frozen)."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child, device))
    return module


_DROPOUT_KEY = 0x5D0F  # domain tag: keeps these streams apart from the augmentation and order seeds


class SampleDropout(nn.Dropout):
    """``nn.Dropout`` whose mask for each sample comes from a generator keyed by ``(seed, epoch, step,
    sample index)`` while :func:`set_sample_keys` has given it the batch's keys; the same sample at the same
    step gets the same mask on whichever rank it is processed. Without keys: plain ``nn.Dropout``."""

    keys: np.ndarray | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.keys is None:
            return super().forward(x)
        if len(self.keys) != x.shape[0]:
            raise ValueError(f"SampleDropout got {len(self.keys)} sample keys for a batch of {x.shape[0]}")
        shape = x.shape[1:]
        draws = []
        for key in self.keys:
            g = torch.Generator().manual_seed(int(key))
            draws.append(torch.rand(shape, generator=g))
        keep = (torch.stack(draws) >= self.p).to(device=x.device, dtype=x.dtype)
        return x * keep / (1.0 - self.p)


def sample_keys(seed: int, epoch: int, step: int, indices) -> np.ndarray:
    """One 63-bit key per sample of a batch, from ``(seed, epoch, step, index)``."""
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.uint64).ravel()
    base = np.random.SeedSequence([_DROPOUT_KEY, int(seed), int(epoch), int(step)]).generate_state(2, np.uint64)
    # splitmix64 finaliser of (base ^ index): independent streams per sample without a SeedSequence each
    with np.errstate(over="ignore"):
        z = (base[0] ^ (idx * np.uint64(0x9E3779B97F4A7C15))) + base[1]
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)


def set_sample_keys(modules, keys: np.ndarray | None) -> None:
    """Hand a batch's keys to every :class:`SampleDropout` in ``modules`` (None: back to plain dropout)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, SampleDropout):
                m.keys = keys
