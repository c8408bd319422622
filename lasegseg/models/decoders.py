"""Decoder registry: each decoder turns backbone feature maps (and the image) into full-resolution logits.

Every decoder has the signature ``forward(feats, image) -> logits``: ``feats`` is the list of ``(B, C, h, w)``
maps of the backbone levels the decoder reads (its registry entry's ``levels``, resolved by :func:`decoder_levels`;
shallow to deep) on a grid of ``h × w`` patches that covers the image padded right/bottom to a multiple of the patch
size, ``image`` the ``(B, 1, H, W)`` input, and the logits are ``(B, num_classes, H, W)``. Decoders work on the padded
canvas ``(h·p, w·p)`` and crop to ``H × W`` at the end, so padding never shifts them.

The names, and whether each decoder reads a backbone, are declared in
:data:`lasegseg.config_checks.DECODER_NEEDS_BACKBONE` as well, so that the config checks ``model.decoder`` and its
backbone without importing torch; registering a decoder that disagrees with it, or declaring one that is never
registered, fails when this module is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lasegseg.config_checks import DECODER_NEEDS_BACKBONE
from lasegseg.errors import ModelError
from lasegseg.registry import Registry


@dataclass(frozen=True)
class DecoderSpec:
    """A registry entry.

    Args:
        name: the ``model.decoder`` value.
        builder: ``builder(*, embed_dim, num_levels, patch_size, width, num_classes) -> nn.Module``.
        needs_backbone: False for decoders that read only the image (the no-backbone baselines).
        levels: which of the backbone's tapped levels the decoder reads: ``all`` of them, or only the ``last``
            (deepest); see :func:`decoder_levels`. Frozen backbones compute, and feature caches store, only these.
    """

    name: str
    builder: Callable[..., nn.Module]
    needs_backbone: bool = True
    levels: Literal["all", "last"] = "all"


LEVEL_CHOICES = ("all", "last")
DECODERS: Registry[DecoderSpec] = Registry(
    "decoder", "decoders", ModelError, declared=DECODER_NEEDS_BACKBONE,
    declared_in="lasegseg.config_checks.DECODER_NEEDS_BACKBONE",
)  # fmt: skip


def register_decoder(
    name: str, *, needs_backbone: bool = True, levels: Literal["all", "last"] = "all"
) -> Callable[[Callable[..., nn.Module]], Callable]:
    """Register a decoder builder under ``name``.

    Args:
        name: the ``model.decoder`` value, declared in :data:`lasegseg.config_checks.DECODER_NEEDS_BACKBONE`;
            registering a name twice is an error.
        needs_backbone: whether the decoder reads backbone features, as declared there.
        levels: the backbone levels its ``forward`` reads: ``all`` or only the ``last``.
    """
    if levels not in LEVEL_CHOICES:
        raise ValueError(f"decoder '{name}': levels must be one of {', '.join(LEVEL_CHOICES)}, got '{levels}'")
    if DECODER_NEEDS_BACKBONE.get(name, needs_backbone) != needs_backbone:
        raise ValueError(
            f"decoder '{name}': needs_backbone={needs_backbone} disagrees with "
            f"lasegseg.config_checks.DECODER_NEEDS_BACKBONE, which the config checks without torch"
        )

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        DECODERS.add(name, DecoderSpec(name, builder, needs_backbone, levels))
        return builder

    return wrap


def list_decoders() -> list[str]:
    """Registered decoder names, sorted."""
    return DECODERS.names()


def decoder_spec(name: str) -> DecoderSpec:
    """The registry entry of ``name``.

    Args:
        name: a registered decoder name; anything else raises ModelError listing the valid names.
    """
    return DECODERS.get(name)


def decoder_levels(name: str, num_levels: int) -> tuple[int, ...]:
    """The levels decoder ``name`` reads, as indices into a backbone's ``num_levels`` tapped levels (shallow to deep).

    The one place that turns a registry entry's ``levels`` into indices: the segmenter feeds the decoder these maps
    in this order, and a frozen backbone's feature cache stores them.

    Args:
        name: a registered decoder name.
        num_levels: the backbone's ``num_features_levels``.
    """
    spec = decoder_spec(name)
    if not spec.needs_backbone:
        return ()
    if num_levels < 1:
        raise ModelError(f"decoder '{name}' reads backbone levels, but num_levels is {num_levels}")
    return (num_levels - 1,) if spec.levels == "last" else tuple(range(num_levels))


def create_decoder(
    name: str, *, embed_dim: int, num_levels: int, patch_size: int, width: int = 64, num_classes: int = 2
) -> nn.Module:
    """Build a registered decoder.

    Args:
        name: registered decoder name.
        embed_dim: channels of each backbone feature map (ignored by decoders that need no backbone).
        num_levels: number of levels the backbone taps (a decoder reading ``all`` gets one map per level).
        patch_size: pixels per patch, i.e. the stride of the feature grid.
        width: base channel width (``model.decoder_width``).
        num_classes: output channels.
    """
    return decoder_spec(name).builder(
        embed_dim=embed_dim, num_levels=num_levels, patch_size=patch_size, width=width, num_classes=num_classes
    )


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv (no bias: the BatchNorm shift replaces it) → BatchNorm → ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def deconv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """×2 transposed conv → BatchNorm → ReLU (UNETR's upsampling step)."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# Initial foreground probability of every pixel (RetinaNet's prior init). The LA covers ~1 % of a slice: from a zero
# bias (p = 0.5 everywhere) a model spends its first epochs only learning to say "background", and with AdamW at
# the usual learning rates the logits grow so slowly that 40 epochs end with hedged probabilities. On the 12-case
# phantom (tiny backbone, multiscale, finetune, 112 px) best validation Dice went from 0.84 to 0.93 with it.
FOREGROUND_PRIOR = 0.01


def segmentation_head(in_channels: int, num_classes: int, prior: float = FOREGROUND_PRIOR) -> nn.Conv2d:
    """1×1 conv to the class logits, its bias set so that every pixel starts as background with probability
    ``1 - prior`` (class 0 is background).

    Args:
        in_channels: input channels.
        num_classes: output channels.
        prior: initial probability of the foreground classes together.
    """
    head = nn.Conv2d(in_channels, num_classes, 1)
    init_prior_bias(head, prior)
    return head


def init_prior_bias(conv: nn.Module, prior: float = FOREGROUND_PRIOR) -> None:
    """Set the bias of a logit-producing conv to the background/foreground prior (see :func:`segmentation_head`).

    Args:
        conv: a conv with one output channel per class.
        prior: initial probability of the foreground classes together.
    """
    num_fg = conv.bias.numel() - 1
    with torch.no_grad():
        conv.bias.zero_()
        conv.bias[1:] = math.log(prior / num_fg) - math.log(1 - prior)


def _canvas(feats: list[torch.Tensor], patch_size: int) -> tuple[int, int]:
    """The padded image size the feature grid covers."""
    h, w = feats[-1].shape[-2:]
    return h * patch_size, w * patch_size


def _pad_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad right/bottom to ``size``, as the backbone does."""
    pad_h, pad_w = size[0] - image.shape[-2], size[1] - image.shape[-1]
    return F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear")


def _image_at(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The image averaged down to ``size`` (area keeps thin structures as partial intensity)."""
    return image if tuple(image.shape[-2:]) == tuple(size) else F.interpolate(image, size=size, mode="area")


def _channels(width: int, k: int) -> int:
    """Channels at the k-th ×2 stage: halve after the first, never below 8."""
    return max(8, width >> max(k - 1, 0))


class LinearDecoder(nn.Module):
    """DINOv2's linear head: BatchNorm + 1×1 conv on the last level's patch tokens, bilinear upsampling.

    Args:
        embed_dim: feature channels.
        patch_size: feature stride.
        num_classes: output channels.
    """

    def __init__(self, *, embed_dim: int, patch_size: int, num_classes: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.norm = nn.BatchNorm2d(embed_dim)
        self.head = segmentation_head(embed_dim, num_classes)

    def forward(self, feats: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        logits = _resize(self.head(self.norm(feats[-1])), _canvas(feats, self.patch_size))
        return logits[..., : image.shape[-2], : image.shape[-1]]


class ConvDecoder(nn.Module):
    """The reference study's convolutional decoder: conv3×3-BN-ReLU blocks with ×2 upsampling between them on the
    last level, a 1×1 head, then bilinear to the image size.

    Args:
        embed_dim: feature channels.
        patch_size: feature stride.
        width: channels of the first block (halved at each ×2 after the first, at least 8).
        num_classes: output channels.
        num_upsamples: ×2 stages before the final bilinear step (3: 8×8 grid → 64×64 → 112×112).
    """

    def __init__(self, *, embed_dim: int, patch_size: int, width: int, num_classes: int, num_upsamples: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.stem = conv_bn_relu(embed_dim, width)
        self.blocks = nn.ModuleList(
            conv_bn_relu(_channels(width, k), _channels(width, k + 1)) for k in range(num_upsamples)
        )
        self.head = segmentation_head(_channels(width, num_upsamples), num_classes)

    def forward(self, feats: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        x = self.stem(feats[-1])
        for block in self.blocks:
            x = block(F.interpolate(x, scale_factor=2.0, mode="bilinear"))
        logits = _resize(self.head(x), _canvas(feats, self.patch_size))
        return logits[..., : image.shape[-2], : image.shape[-1]]


class MultiscaleDecoder(nn.Module):
    """Learned softmax weights over all levels, then UNet-style stages that re-inject the image.

    Each level is projected by a 1×1 conv; the projections are summed with softmax weights (one learned logit per
    level, initially equal). Stages then work at 1/8, 1/4, 1/2 and 1 of the padded image size: each upsamples the
    previous stage, concatenates the image averaged to that scale, and applies two conv3×3-BN-ReLU. The last stage
    runs at full resolution, so boundaries come from the image itself rather than from the 14-px grid.

    Args:
        embed_dim: feature channels.
        num_levels: number of feature maps.
        patch_size: feature stride.
        width: channels of the fused features and of the first stage (halved at each later stage, at least 8).
        num_classes: output channels.
        num_stages: stages, the last at full resolution.
    """

    def __init__(
        self, *, embed_dim: int, num_levels: int, patch_size: int, width: int, num_classes: int, num_stages: int = 4
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_stages = num_stages
        self.level_weights = nn.Parameter(torch.zeros(num_levels))
        self.proj = nn.ModuleList(nn.Conv2d(embed_dim, width, 1) for _ in range(num_levels))
        self.fuse = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        channels = [width] + [_channels(width, k) for k in range(num_stages)]
        self.stages = nn.ModuleList(
            nn.Sequential(
                conv_bn_relu(channels[k] + 1, channels[k + 1]), conv_bn_relu(channels[k + 1], channels[k + 1])
            )
            for k in range(num_stages)
        )
        self.head = segmentation_head(channels[-1], num_classes)

    def forward(self, feats: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.level_weights, dim=0)
        x = self.fuse(sum(wt * proj(f) for wt, proj, f in zip(weights, self.proj, feats, strict=True)))
        canvas = _canvas(feats, self.patch_size)
        padded = _pad_to(image, canvas)
        for k, stage in enumerate(self.stages):
            scale = 2 ** (self.num_stages - 1 - k)
            size = (math.ceil(canvas[0] / scale), math.ceil(canvas[1] / scale))
            x = stage(torch.cat([_resize(x, size), _image_at(padded, size)], dim=1))
        return self.head(x)[..., : image.shape[-2], : image.shape[-1]]


class UnetrDecoder(nn.Module):
    """UNETR-style decoder: levels as skips at different scales, fused bottom-up.

    Level ``i`` of ``L`` (shallow to deep) is brought to ``2^(L-1-i)`` times the patch grid by ×2 transposed convs,
    so the deepest level is the bottleneck and the shallowest the finest skip. The decoder upsamples the bottleneck
    ×2 at a time, concatenating each skip and applying two conv3×3-BN-ReLU, then goes bilinearly to full resolution
    where it is fused with a conv of the image, as UNETR's input-resolution path.

    Args:
        embed_dim: feature channels.
        num_levels: number of feature maps.
        patch_size: feature stride.
        width: channels at the grid and ×2 scales (halved at each finer scale, at least 8).
        num_classes: output channels.
    """

    def __init__(self, *, embed_dim: int, num_levels: int, patch_size: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        depth = num_levels - 1
        self.bottleneck = conv_bn_relu(embed_dim, _channels(width, 0), kernel_size=1)
        # Skip of level i: depth - i deconvs, C → ch(1) → ch(2) … (the deepest level has none: it is the bottleneck).
        self.skips = nn.ModuleList(
            nn.Sequential(
                *(
                    deconv_bn_relu(embed_dim if j == 0 else _channels(width, j), _channels(width, j + 1))
                    for j in range(depth - i)
                )
            )
            for i in range(depth)
        )
        self.ups = nn.ModuleList(deconv_bn_relu(_channels(width, k), _channels(width, k + 1)) for k in range(depth))
        self.fuses = nn.ModuleList(
            nn.Sequential(
                conv_bn_relu(2 * _channels(width, k + 1), _channels(width, k + 1)),
                conv_bn_relu(_channels(width, k + 1), _channels(width, k + 1)),
            )
            for k in range(depth)
        )
        out = _channels(width, depth)
        self.image_stem = conv_bn_relu(1, out)
        self.full = conv_bn_relu(2 * out, out)
        self.head = segmentation_head(out, num_classes)

    def forward(self, feats: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        x = self.bottleneck(feats[-1])
        # Skip k (1 = one ×2 above the grid) comes from level depth - k.
        for k, (up, fuse) in enumerate(zip(self.ups, self.fuses, strict=True), start=1):
            skip = self.skips[len(feats) - 1 - k](feats[len(feats) - 1 - k])
            x = fuse(torch.cat([up(x), skip], dim=1))
        canvas = _canvas(feats, self.patch_size)
        x = self.full(torch.cat([_resize(x, canvas), self.image_stem(_pad_to(image, canvas))], dim=1))
        return self.head(x)[..., : image.shape[-2], : image.shape[-1]]


class UNetBaseline(nn.Module):
    """MONAI's 2D UNet on the image alone (no backbone): channels (16, 32, 64, 128) × width / 64.

    Args:
        width: 64 gives MONAI's usual (16, 32, 64, 128) channels.
        num_classes: output channels.
    """

    def __init__(self, *, width: int, num_classes: int) -> None:
        super().__init__()
        from monai.networks.nets import UNet  # deferred: heavy (monai, seconds; only this baseline needs it)

        strides = (2, 2, 2)
        self.multiple = math.prod(strides)
        self.net = UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=num_classes,
            channels=tuple(max(1, c * width // 64) for c in (16, 32, 64, 128)),
            strides=strides,
            num_res_units=2,
        )
        # Same starting prior as the other decoders, so the baseline is not handicapped by a p = 0.5 start.
        last = [m for m in self.net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1]
        init_prior_bias(last)

    def forward(self, feats: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        # Strided convs need sizes divisible by the total stride for the skips to line up.
        canvas = (math.ceil(height / self.multiple) * self.multiple, math.ceil(width / self.multiple) * self.multiple)
        return self.net(_pad_to(image, canvas))[..., :height, :width]


@register_decoder("linear", levels="last")
def linear(*, embed_dim: int, num_levels: int, patch_size: int, width: int, num_classes: int) -> nn.Module:
    """BatchNorm + 1×1 conv on the last level (DINOv2's linear segmentation head)."""
    return LinearDecoder(embed_dim=embed_dim, patch_size=patch_size, num_classes=num_classes)


@register_decoder("conv", levels="last")
def conv(*, embed_dim: int, num_levels: int, patch_size: int, width: int, num_classes: int) -> nn.Module:
    """The reference study's progressive-upsampling conv decoder on the last level."""
    return ConvDecoder(embed_dim=embed_dim, patch_size=patch_size, width=width, num_classes=num_classes)


@register_decoder("multiscale")
def multiscale(*, embed_dim: int, num_levels: int, patch_size: int, width: int, num_classes: int) -> nn.Module:
    """Softmax-weighted levels + UNet stages with the image re-injected (the main decoder)."""
    return MultiscaleDecoder(
        embed_dim=embed_dim, num_levels=num_levels, patch_size=patch_size, width=width, num_classes=num_classes
    )


@register_decoder("unetr")
def unetr(*, embed_dim: int, num_levels: int, patch_size: int, width: int, num_classes: int) -> nn.Module:
    """UNETR-style decoder with the levels as skips at 1×, 2×, 4×, 8× of the patch grid."""
    return UnetrDecoder(
        embed_dim=embed_dim, num_levels=num_levels, patch_size=patch_size, width=width, num_classes=num_classes
    )


@register_decoder("unet", needs_backbone=False)
def unet(*, embed_dim: int, num_levels: int, patch_size: int, width: int, num_classes: int) -> nn.Module:
    """MONAI UNet baseline on the image alone (``model.backbone=none``)."""
    return UNetBaseline(width=width, num_classes=num_classes)


DECODERS.check_complete()
