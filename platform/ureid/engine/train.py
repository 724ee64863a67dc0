"""One training epoch, the optimizer and the step learning-rate schedule (BUC's recipe, DDP-aware).

BUC: SGD with momentum 0.9, Nesterov, weight decay 5e-4; the pretrained backbone at 0.1x the learning rate
of the new layers; ``lr = base_lr * gamma ** (epoch // step_epoch)``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..models.invariance import sample_keys, set_sample_keys

log = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP / DataParallel wrappers."""
    return model.module if hasattr(model, "module") else model


def forward_batch(model: nn.Module, images: torch.Tensor) -> dict:
    """Run the model on an image batch (B, C, H, W) or a tracklet batch (B, T, C, H, W).

    Tracklets are flattened to B*T frames and every output averaged over T: BUC's video code averages
    the frame features/embeddings of a tracklet.
    """
    if images.dim() == 4:
        return model(images)
    if images.dim() != 5:
        raise ValueError(f"expected images of shape (B, C, H, W) or (B, T, C, H, W), got {tuple(images.shape)}")
    b, t = images.shape[:2]
    out = model(images.flatten(0, 1))
    return {k: (v.unflatten(0, (b, t)).mean(1) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def _allreduce_grads(module: nn.Module) -> None:
    """Average the gradients of a loss module's own parameters (e.g. PUL's classifier) across ranks.

    The model is wrapped in DDP, which averages its gradients; a loss module with parameters is not, so
    without this its replicas would diverge.
    """
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.requires_grad:
            if p.grad is None:  # every rank must join every all-reduce
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def train_epoch(model: nn.Module, loss_fn: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                device="cpu", epoch: int = 0, log_every: int = 50, progress: Callable[[dict], None] | None = None,
                max_batches: int | None = None, sample_seed: int | None = None) -> dict:
    """Train for one pass over ``loader`` (batches ``(images, targets, indices, camids)``).

    Each step: forward (:func:`forward_batch`), ``loss_fn(outputs, targets, indices)``, backward (which also
    updates memory tables), step. ``progress`` (if given) receives ``dict(epoch, batch, loss, mean_loss)``
    every ``log_every`` batches and after the last one. Returns ``dict(loss=mean loss, batches, samples,
    time_s)`` (``samples``: this process's images or tracklets trained on).
    ``sample_seed`` (not None): dropout masks drawn per sample from ``(sample_seed, epoch, step, index)``
    (``ureid.models.invariance.SampleDropout``), the same for any number of workers.
    """
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"max_batches must be > 0 or None, got {max_batches}")
    model.train()
    loss_fn.train()
    start = time.perf_counter()
    total, n, samples = 0.0, 0, 0
    info = None
    for batch in loader:
        if max_batches is not None and n >= max_batches:
            break
        images, targets, indices = batch[0], batch[1], batch[2]
        images = images.to(device, non_blocking=True)
        targets = torch.as_tensor(targets).to(device, non_blocking=True)
        indices = torch.as_tensor(indices).to(device, non_blocking=True)
        if sample_seed is not None:
            keys = sample_keys(sample_seed, epoch, n, indices)
            frame_keys = keys
            if images.dim() == 5:  # tracklets: forward_batch flattens B x T frames, each with its own mask
                t = images.shape[1]
                frame_keys = sample_keys(sample_seed, epoch, n, indices.cpu().numpy()[:, None] * t + np.arange(t))
            set_sample_keys((model,), frame_keys)
            set_sample_keys((loss_fn,), keys)
        outputs = forward_batch(model, images)
        loss = loss_fn(outputs, targets, indices)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, batch {n}: lower the learning rate?")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _allreduce_grads(loss_fn)
        optimizer.step()
        total += loss.item()
        n += 1
        samples += images.shape[0]
        info = {"epoch": epoch, "batch": n, "loss": loss.item(), "mean_loss": total / n}
        if log_every and n % log_every == 0:
            if progress is not None:
                progress(info)
            else:  # one report per step: the progress callback or the log, never both
                log.info("epoch %d batch %d loss %.4f (mean %.4f)", epoch, n, info["loss"], info["mean_loss"])
    if sample_seed is not None:
        set_sample_keys((model, loss_fn), None)
    if progress is not None and info is not None and not (log_every and n % log_every == 0):
        progress(info)
    return {"loss": total / max(n, 1), "batches": n, "samples": samples, "time_s": time.perf_counter() - start}


def build_optimizer(model: nn.Module, extra_params=None, lr: float = 0.1, backbone_lr_mult: float = 0.1,
                    momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = True) -> torch.optim.SGD:
    """SGD with the trunk (``model.base``) at ``lr * backbone_lr_mult`` and the heads plus ``extra_params``
    (an ``nn.Module`` or an iterable of parameters, e.g. PUL's classifier) at ``lr``. Frozen parameters are
    left out. Each group keeps its ``lr_mult`` for :func:`step_lr`."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if nesterov and momentum <= 0:
        raise ValueError(f"nesterov=True needs momentum > 0, got momentum={momentum}")
    groups = param_groups(model, extra_params, lr, backbone_lr_mult)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def param_groups(model: nn.Module, extra_params=None, lr: float = 0.1, backbone_lr_mult: float = 0.1) -> list[dict]:
    """Optimizer groups: the trunk (``model.base``) at ``lr * backbone_lr_mult``, the heads plus
    ``extra_params`` at ``lr``, each with its ``lr_mult`` for :func:`step_lr`; frozen parameters left out."""
    net = unwrap(model)
    base_ids = {id(p) for p in net.base.parameters()} if hasattr(net, "base") else set()
    backbone = [p for p in net.parameters() if p.requires_grad and id(p) in base_ids]
    heads = [p for p in net.parameters() if p.requires_grad and id(p) not in base_ids]
    if extra_params is not None:
        extra = extra_params.parameters() if isinstance(extra_params, nn.Module) else extra_params
        seen = {id(p) for p in backbone + heads}
        heads += [p for p in extra if p.requires_grad and id(p) not in seen]
    groups = [{"params": ps, "lr": lr * mult, "lr_mult": mult}
              for ps, mult in ((backbone, backbone_lr_mult), (heads, 1.0)) if ps]
    if not groups:
        raise ValueError("build_optimizer found no trainable parameters")
    return groups


def step_lr(optimizer: torch.optim.Optimizer, epoch: int, base_lr: float, step_epoch: int | None,
            gamma: float = 0.1) -> float:
    """Set ``lr = base_lr * gamma ** (epoch // step_epoch)`` (times each group's ``lr_mult``); returns lr.

    ``step_epoch`` None or 0 keeps ``base_lr`` (BUC's later stages run 2 epochs at a constant 0.01).
    """
    lr = base_lr * (gamma ** (epoch // step_epoch) if step_epoch else 1.0)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr
