"""Segmentation losses in plain torch.

:class:`DiceCELoss` is MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True, batch=True)`` written out, so that a
trial never imports MONAI (about 8 s per fresh worker process). The tests compare value and gradients with MONAI.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5):
    """Soft Dice over all classes (pooled over the batch) plus cross-entropy, both means.

    Args:
        logits: ``(B, C, *spatial)`` raw scores.
        target: ``(B, 1, *spatial)`` or ``(B, *spatial)`` integer class indices.
        smooth_nr, smooth_dr: MONAI's smoothing constants of the Dice numerator and denominator.
    """
    if target.ndim == logits.ndim:
        target = target[:, 0]
    target = target.long()
    num_classes = logits.shape[1]
    prob = torch.softmax(logits, dim=1)
    # (B, *spatial, C) → (B, C, *spatial) one-hot in the logits' dtype.
    onehot = F.one_hot(target, num_classes).movedim(-1, 1).to(prob.dtype)
    # batch=True: sum over the batch as well, so slices without foreground do not give 0/0 terms.
    axes = [0, *range(2, logits.ndim)]
    intersection = (prob * onehot).sum(dim=axes)
    denominator = prob.sum(dim=axes) + onehot.sum(dim=axes)
    dice = 1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)
    return dice.mean() + F.cross_entropy(logits, target)


class DiceCELoss(nn.Module):
    """Module form of :func:`dice_ce_loss` (``loss_fn(logits, target)``)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_ce_loss(logits, target)
