"""Loss registry: segmentation losses in plain torch, chosen by ``train.loss``.

Every loss is a module with ``forward(logits, target) -> scalar``: ``logits`` are ``(B, C, *spatial)`` raw scores,
``target`` the ``(B, 1, *spatial)`` or ``(B, *spatial)`` integer class indices. Each is a MONAI loss written out
(``to_onehot_y=True, softmax=True, batch=True``), so that a trial never imports MONAI (about 8 s per fresh worker
process); the tests compare value and gradients with MONAI.

The registered names are declared in :data:`lasegseg.config_checks.LOSS_CHOICES` as well, so that the config checks
``train.loss`` without importing torch; registering an undeclared name, or declaring one that is never registered,
fails when this module is imported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lasegseg.config_checks import LOSS_CHOICES
from lasegseg.errors import ConfigError
from lasegseg.registry import Registry

LOSSES: Registry[Callable[[], nn.Module]] = Registry(
    "loss", "losses", ConfigError, declared=LOSS_CHOICES, declared_in="lasegseg.config_checks.LOSS_CHOICES"
)


def register_loss(name: str) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Register a loss builder (a module class or a function without arguments) under ``name`` (the ``train.loss``
    value; declared in ``lasegseg.config_checks.LOSS_CHOICES`` and registered once)."""
    return LOSSES.register(name)


def list_losses() -> list[str]:
    """Registered loss names, sorted."""
    return LOSSES.names()


def build_loss(name: str) -> nn.Module:
    """A fresh module of the registered loss ``name``.

    Args:
        name: a registered loss name; anything else raises ConfigError listing the valid names.
    """
    return LOSSES.get(name)()


def _class_indices(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B, *spatial)`` long class indices from a target with or without its channel axis."""
    return (target[:, 0] if target.ndim == logits.ndim else target).long()


def _onehot(target: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, *spatial)`` indices → ``(B, C, *spatial)`` one-hot (``F.one_hot`` puts the classes last)."""
    return F.one_hot(target, num_classes).movedim(-1, 1).to(dtype)


def _soft_dice(prob: torch.Tensor, onehot: torch.Tensor, smooth_nr: float, smooth_dr: float) -> torch.Tensor:
    """Mean over classes of ``1 - Dice``, each class pooled over the batch and space."""
    # batch=True: sum over the batch as well, so slices without foreground do not give 0/0 terms.
    axes = [0, *range(2, prob.ndim)]
    intersection = (prob * onehot).sum(dim=axes)
    denominator = prob.sum(dim=axes) + onehot.sum(dim=axes)
    return (1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)).mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5):
    """Soft Dice over all classes (pooled over the batch) plus cross-entropy, both means.

    Args:
        logits: ``(B, C, *spatial)`` raw scores.
        target: ``(B, 1, *spatial)`` or ``(B, *spatial)`` integer class indices.
        smooth_nr, smooth_dr: MONAI's smoothing constants of the Dice numerator and denominator.
    """
    target = _class_indices(logits, target)
    prob = torch.softmax(logits, dim=1)
    dice = _soft_dice(prob, _onehot(target, logits.shape[1], prob.dtype), smooth_nr, smooth_dr)
    return dice + F.cross_entropy(logits, target)


def dice_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """Soft Dice over all classes (pooled over the batch) plus focal loss, both means.

    The focal term is a sigmoid focal loss of each class channel against its one-hot target, as in MONAI's
    ``DiceFocalLoss(softmax=True)``: MONAI applies the softmax to its Dice term only.

    Args:
        logits: ``(B, C, *spatial)`` raw scores.
        target: ``(B, 1, *spatial)`` or ``(B, *spatial)`` integer class indices.
        gamma: focusing exponent; 0 gives plain binary cross-entropy.
        smooth_nr, smooth_dr: MONAI's smoothing constants of the Dice numerator and denominator.
    """
    prob = torch.softmax(logits, dim=1)
    onehot = _onehot(_class_indices(logits, target), logits.shape[1], prob.dtype)
    dice = _soft_dice(prob, onehot, smooth_nr, smooth_dr)
    x = logits.float()
    bce = x - x * onehot - F.logsigmoid(x)
    # (1 - p_t)^gamma as exp(gamma · log(1 - p_t)): logsigmoid never rounds a confident pixel's weight to log 0.
    weight = torch.exp(gamma * F.logsigmoid(-x * (2 * onehot - 1)))
    return dice + (weight * bce).mean()


@register_loss("dicece")
class DiceCELoss(nn.Module):
    """Module form of :func:`dice_ce_loss` (``loss_fn(logits, target)``): MONAI's
    ``DiceCELoss(to_onehot_y=True, softmax=True, batch=True)``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_ce_loss(logits, target)


@register_loss("dicefocal")
class DiceFocalLoss(nn.Module):
    """Module form of :func:`dice_focal_loss`: MONAI's ``DiceFocalLoss(to_onehot_y=True, softmax=True, batch=True)``.

    Args:
        gamma: focusing exponent of the focal term (MONAI's default 2.0).
    """

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_focal_loss(logits, target, gamma=self.gamma)


LOSSES.check_complete()
