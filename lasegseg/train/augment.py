"""Augmentation registry: random transforms of an image/label batch in torch, chosen by ``train.augment``.

Every augmentation has the signature ``augmentation(x, y, generator) -> (x, y)``: ``x`` the ``(B, 1, H, W)`` float
images, ``y`` the ``(B, 1, H, W)`` integer labels, both on any device, and ``generator`` a CPU generator seeded from
the trial seed and epoch, so the draw is the same on any device. Images and labels move together; labels stay
integer class indices.

The registered names are declared in :data:`lasegseg.config_checks.AUGMENT_CHOICES` as well, so that the config checks
``train.augment`` without importing torch; registering an undeclared name, or declaring one that is never
registered, fails when this module is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lasegseg.config_checks import AUGMENT_CHOICES
from lasegseg.errors import ConfigError
from lasegseg.registry import Registry

Augmentation = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]

# Spatial augmentation: rotations up to ±10°, isotropic scales in [0.9, 1.1].
MAX_ROTATION = math.radians(10.0)
MAX_SCALE_STEP = 0.1

AUGMENTATIONS: Registry[Augmentation] = Registry(
    "augmentation", "augmentations", ConfigError, declared=AUGMENT_CHOICES,
    declared_in="lasegseg.config_checks.AUGMENT_CHOICES",
)  # fmt: skip


def register_augmentation(name: str) -> Callable[[Augmentation], Augmentation]:
    """Register an augmentation under ``name`` (the ``train.augment`` value; declared in
    ``lasegseg.config_checks.AUGMENT_CHOICES`` and registered once)."""
    return AUGMENTATIONS.register(name)


def list_augmentations() -> list[str]:
    """Registered augmentation names, sorted."""
    return AUGMENTATIONS.names()


def build_augmentation(name: str) -> Augmentation:
    """The registered augmentation ``name`` (anything else raises ConfigError listing the valid names)."""
    return AUGMENTATIONS.get(name)


def augment_batch(x: torch.Tensor, y: torch.Tensor, kind: str, generator: torch.Generator):
    """Apply the registered augmentation ``kind`` to an image/label batch.

    Args:
        x: ``(B, 1, H, W)`` float images.
        y: ``(B, 1, H, W)`` integer labels.
        kind: a registered name (``none``, ``flip`` or ``spatial``).
        generator: a CPU generator seeded from the trial seed and epoch (the draw is the same on any device).
    """
    return build_augmentation(kind)(x, y, generator)


def _draw_flips(batch: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, 2)`` bools: flip horizontally (column 0) / vertically (column 1)."""
    return torch.rand(batch, 2, generator=generator) < 0.5


@register_augmentation("none")
def no_augmentation(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
    """The batch itself (draws nothing)."""
    return x, y


@register_augmentation("flip")
def random_flips(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
    """Each slice flipped horizontally and vertically with probability 1/2 each (exact: no resampling)."""
    flips = _draw_flips(x.shape[0], generator)
    for axis, dim in ((0, -1), (1, -2)):
        sel = flips[:, axis].to(x.device)
        if bool(flips[:, axis].any()):
            x = torch.where(sel[:, None, None, None], x.flip(dim), x)
            y = torch.where(sel[:, None, None, None], y.flip(dim), y)
    return x, y


@register_augmentation("spatial")
def random_flips_rotations_scales(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
    """Random flips as ``flip``, then a rotation of up to ±10° and an isotropic scale in [0.9, 1.1] per slice, in
    one resampling: bilinear for the images, nearest for the labels, zeros outside."""
    b = x.shape[0]
    # Same flip draw as ``flip`` first, so a seed gives the same flips under both.
    sign = 1.0 - 2.0 * _draw_flips(b, generator).float()  # -1 flips the axis
    angle = (torch.rand(b, generator=generator) * 2 - 1) * MAX_ROTATION
    scale = 1.0 + (torch.rand(b, generator=generator) * 2 - 1) * MAX_SCALE_STEP
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # Sampling grid = rotation / scale applied after the flips: [R / s] @ diag(sign_x, sign_y).
    theta = torch.stack(
        [
            torch.stack([cos * sign[:, 0], -sin * sign[:, 1], torch.zeros(b)], 1),
            torch.stack([sin * sign[:, 0], cos * sign[:, 1], torch.zeros(b)], 1),
        ],
        dim=1,
    ).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x, y.long()


AUGMENTATIONS.check_complete()
