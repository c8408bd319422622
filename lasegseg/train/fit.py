"""Training steps: the learning-rate schedule, the optimizer, the compiled forward, and one epoch over the rows.

Pure compute: no ray, no mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from lasegseg.config import Config
from lasegseg.models.segmenter import param_groups
from lasegseg.train.augment import augment_batch
from lasegseg.train.features import FeatureCache
from lasegseg.train.inference import autocast_context, to_device


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at the last step."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def compiled_forward(cfg: Config, model, features: FeatureCache | None) -> Callable | None:
    """``torch.compile`` of what the training step calls (the decoder on cached features, else the whole model).

    The module itself stays uncompiled, so checkpoints keep their parameter names. The batch dimension of every
    tensor argument is marked dynamic before each call, so an epoch's last, smaller batch runs the graph compiled for
    the full ones instead of compiling another (a batch of one still gets its own: dynamic sizes start at 2).
    """
    if not cfg.train.compile:
        return None
    compiled = torch.compile(model.decode if features is not None else model)

    def forward(*args):
        for arg in args:
            for tensor in arg if isinstance(arg, (list, tuple)) else (arg,):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return compiled(*args)

    return forward


def build_optimizer(cfg: Config, model, steps_per_epoch: int):
    """AdamW over the segmenter's parameter groups and its per-step schedule: linear warmup, then cosine decay."""
    groups = param_groups(model, cfg.optim.lr, cfg.model.backbone_lr_mult, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    total = steps_per_epoch * cfg.train.epochs
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    o = cfg.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, o.min_lr_ratio))
    return optimizer, scheduler


def train_one_epoch(
    model, optimizer, loss_fn, images: np.ndarray, labels: np.ndarray, order: np.ndarray, *, batch_size: int,
    device: torch.device, amp: str, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    features: FeatureCache | None = None, forward: Callable | None = None, augment: str = "none",
    generator: torch.Generator | None = None, before_step: Callable[[], None] | None = None,
) -> tuple[float, float]:  # fmt: skip
    """One pass over ``order`` (row indices of the cache); returns the mean loss and the last step's learning rate.

    Rows of a batch are read sorted (sequential pages of the memory map); fp16/uint8 cross to the device (pinned,
    non-blocking on CUDA) and are widened there; the loss is accumulated on the device so no step waits for the GPU.

    Args:
        scheduler: stepped after every optimizer step (the learning-rate schedule is per step).
        features: train the decoder on these cached backbone features (frozen mode, no augmentation), read through
            their :meth:`~lasegseg.train.features.FeatureCache.batches` (held or prefetched; see
            :func:`~lasegseg.train.feature_residency.for_training`).
        forward: the callable that maps the batch to logits (e.g. a compiled model or decoder); default ``model``,
            or ``model.decode`` with ``features``.
        augment: ``train.augment`` applied to each batch (never with ``features``).
        generator: seeds the augmentation.
        before_step: called right before every optimizer step (timings).
    """
    if features is not None and augment != "none":
        raise ValueError("cached features cannot be augmented")
    if forward is None:
        forward = model.decode if features is not None else model
    total = torch.zeros((), device=device)
    steps, lr = 0, optimizer.param_groups[-1]["lr"]
    batches = [np.sort(order[start : start + batch_size]) for start in range(0, len(order), batch_size)]
    feature_batches = features.batches(batches, device) if features is not None else [None] * len(batches)
    for idx, feats in zip(batches, feature_batches, strict=True):
        x = to_device(torch.from_numpy(np.asarray(images[idx]))[:, None], device).float()
        y = to_device(torch.from_numpy(np.asarray(labels[idx]))[:, None], device).long()
        if augment != "none":
            x, y = augment_batch(x, y, augment, generator)
        with autocast_context(device, amp):
            logits = forward(feats, x) if features is not None else forward(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        lr = optimizer.param_groups[-1]["lr"]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach()
        steps += 1
    return float(total) / max(1, steps), lr
