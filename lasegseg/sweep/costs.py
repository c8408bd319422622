"""What one image costs a model on paper: FLOPs and parameters of the backbones and decoders, without torch.

The study's plan (:mod:`lasegseg.sweep.estimate`) needs them while ``--dry-run`` must stay light, so the shapes are
declared here as data: :data:`VIT_SHAPES` (each named backbone of :mod:`lasegseg.models.families`, from the official
configs) and :data:`DECODER_LEVELS` (which backbone levels each decoder of :mod:`lasegseg.models.decoders` reads). The
tests check both against the registries, the FLOPs against ``torch.utils.flop_counter`` and the parameters against
the built models, so a shape changed there fails here.

Counting: a matmul or convolution costs 2 FLOPs per multiply-add; norms, activations, softmax, resizing and residual
adds are left out, as ``FlopCounterMode`` and ``bench/gpu.py`` leave them out. A ViT block costs
``2·n·(4·d² + m·d·f) + 4·n²·d`` for ``n`` tokens of width ``d`` and an MLP of ``m`` matrices of width ``f``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lasegseg.config_checks import BACKBONE_FAMILIES

NUM_CLASSES = 2
TAPS = 4  # every family's layer table taps four blocks (lasegseg.models.families)


@dataclass(frozen=True)
class VitShape:
    """A backbone's architecture, as far as its cost goes.

    Args:
        width: hidden size ``d``.
        depth: transformer blocks.
        ffn: MLP hidden width ``f`` (for a gated MLP, the width of each of its three matrices).
        gated: SwiGLU / gated MLP (three matrices) instead of two.
        patch: pixels per patch.
        registers: register tokens always present (DINOv3's 4); DINOv2's with-registers variant adds 4 more.
        positions: learned position embeddings (DINOv2: 37² + 1 of its 518-px pre-training); 0 for RoPE (DINOv3).
    """

    width: int
    depth: int
    ffn: int
    gated: bool
    patch: int
    registers: int = 0
    positions: int = 0


_V2, _V3 = BACKBONE_FAMILIES["dinov2"].patch_size, BACKBONE_FAMILIES["dinov3"].patch_size
# facebook/dinov2-* and facebook/dinov3-vit*16-pretrain-lvd1689m config.json; the tiny models of families.py.
VIT_SHAPES: dict[str, VitShape] = {
    "tiny": VitShape(128, 4, 512, False, _V2, 0, 65),
    "dinov2-small": VitShape(384, 12, 1536, False, _V2, 0, 1370),
    "dinov2-base": VitShape(768, 12, 3072, False, _V2, 0, 1370),
    "dinov2-large": VitShape(1024, 24, 4096, False, _V2, 0, 1370),
    "dinov2-giant": VitShape(1536, 40, 4096, True, _V2, 0, 1370),
    "tiny-dinov3": VitShape(128, 4, 512, False, _V3, 4),
    "dinov3-small": VitShape(384, 12, 1536, False, _V3, 4),
    "dinov3-small-plus": VitShape(384, 12, 1536, True, _V3, 4),
    "dinov3-base": VitShape(768, 12, 3072, False, _V3, 4),
    "dinov3-large": VitShape(1024, 24, 4096, False, _V3, 4),
    "dinov3-huge-plus": VitShape(1280, 32, 5120, True, _V3, 4),
    "dinov3-7b": VitShape(4096, 40, 8192, True, _V3, 4),
}
REGISTERS_VARIANT = 4  # tokens the with-registers DINOv2 models add

# The backbone levels each decoder reads: "all" its taps or only the "last"; None for a decoder without a backbone.
DECODER_LEVELS: dict[str, str | None] = {"linear": "last", "conv": "last", "multiscale": "all", "unetr": "all",
                                         "unet": None}  # fmt: skip


def vit_shape(backbone: str) -> VitShape | None:
    """The shape of a named backbone; None for ``none``, a hub id or a local folder (no cost on paper)."""
    return VIT_SHAPES.get(backbone)


def grid(shape: VitShape, image_size: int) -> int:
    """Patches per side: the image padded up to a multiple of the patch, as the backbone pads it."""
    return math.ceil(image_size / shape.patch)


def tokens(shape: VitShape, image_size: int, registers: bool = False) -> int:
    """Tokens through every block: the patches, the class token and the register tokens."""
    return grid(shape, image_size) ** 2 + 1 + shape.registers + (REGISTERS_VARIANT if registers else 0)


def vit_block_flops(shape: VitShape, image_size: int, registers: bool = False) -> float:
    """Forward FLOPs of the transformer blocks for one image (the patch embedding aside)."""
    n, d = tokens(shape, image_size, registers), shape.width
    mats = 3 if shape.gated else 2
    return shape.depth * (2 * n * (4 * d * d + mats * d * shape.ffn) + 4 * n * n * d)


def vit_embed_flops(shape: VitShape, image_size: int) -> float:
    """Forward FLOPs of the patch embedding (a 3-channel conv with the patch as kernel and stride)."""
    return 2 * grid(shape, image_size) ** 2 * 3 * shape.patch**2 * shape.width


def vit_params(shape: VitShape, registers: bool = False) -> int:
    """Parameters of the backbone (weights, biases, norms, layer scales, tokens, position embeddings)."""
    d, f = shape.width, shape.ffn
    mlp = (3 * d * f + 2 * f + d) if shape.gated else (2 * d * f + f + d)
    block = 4 * (d * d + d) + mlp + 6 * d  # attention, MLP, two norms and two layer scales
    tokens_ = 2 + shape.registers + (REGISTERS_VARIANT if registers else 0) + shape.positions  # class, mask token
    return shape.depth * block + 3 * shape.patch**2 * d + d + tokens_ * d + 2 * d


def lora_params(shape: VitShape, rank: int) -> int:
    """LoRA adapters on the query and value projections of every block (A: r×d, B: d×r each)."""
    return shape.depth * 2 * 2 * rank * shape.width


@dataclass(frozen=True)
class Conv:
    """One convolution: ``cin → cout`` with ``k`` kernel taps (k×k), applied at ``positions`` input places (output
    places for a plain conv, input places for a transposed one, as the FLOP counter counts them)."""

    cin: int
    cout: int
    k: int
    positions: int
    bias: bool = False
    norm: bool = True

    @property
    def flops(self) -> float:
        return 2.0 * self.cin * self.cout * self.k * self.positions

    @property
    def params(self) -> int:
        return self.cin * self.cout * self.k + self.cout * (int(self.bias) + 2 * int(self.norm))


def _ch(width: int, k: int) -> int:
    """Channels at the k-th ×2 stage of a decoder: halved after the first, never below 8 (decoders._channels)."""
    return max(8, width >> max(k - 1, 0))


def _head(cin: int, positions: int) -> Conv:
    return Conv(cin, NUM_CLASSES, 1, positions, bias=True, norm=False)


def _norm(channels: int) -> Conv:
    """A BatchNorm on its own: no FLOPs counted, a scale and a shift per channel."""
    return Conv(0, channels, 0, 0)


def _linear(d: int, levels: int, g: int, p: int, w: int) -> list[Conv]:
    return [_norm(d), _head(d, g * g)]


def _conv(d: int, levels: int, g: int, p: int, w: int) -> list[Conv]:
    out = [Conv(d, w, 9, g * g)]
    out += [Conv(_ch(w, k), _ch(w, k + 1), 9, (g * 2 ** (k + 1)) ** 2) for k in range(3)]
    return out + [_head(_ch(w, 3), (g * 8) ** 2)]


def _multiscale(d: int, levels: int, g: int, p: int, w: int, stages: int = 4) -> list[Conv]:
    canvas = g * p
    out = [Conv(d, w, 1, g * g, bias=True, norm=False) for _ in range(levels)] + [_norm(w)]
    channels = [w] + [_ch(w, k) for k in range(stages)]
    for k in range(stages):
        side = math.ceil(canvas / 2 ** (stages - 1 - k))
        out += [Conv(channels[k] + 1, channels[k + 1], 9, side * side), Conv(channels[k + 1], channels[k + 1], 9,
                                                                                side * side)]  # fmt: skip
    return out + [_head(channels[-1], canvas * canvas)]


def _unetr(d: int, levels: int, g: int, p: int, w: int) -> list[Conv]:
    depth, canvas = levels - 1, g * p
    out = [Conv(d, _ch(w, 0), 1, g * g)]
    for i in range(depth):  # skip of level i: depth - i ×2 deconvs (2×2 taps, counted at their input places)
        out += [Conv(d if j == 0 else _ch(w, j), _ch(w, j + 1), 4, (g * 2**j) ** 2) for j in range(depth - i)]
    for k in range(depth):
        side = g * 2 ** (k + 1)
        out += [Conv(_ch(w, k), _ch(w, k + 1), 4, (g * 2**k) ** 2)]
        out += [Conv(2 * _ch(w, k + 1), _ch(w, k + 1), 9, side * side), Conv(_ch(w, k + 1), _ch(w, k + 1), 9,
                                                                               side * side)]  # fmt: skip
    last = _ch(w, depth)
    positions = canvas * canvas
    return out + [Conv(1, last, 9, positions), Conv(2 * last, last, 9, positions), _head(last, positions)]


def _unet(image_size: int, w: int) -> list[Conv]:
    """MONAI's 2D UNet as lasegseg builds it: channels (16, 32, 64, 128)·w/64, strides 2, two residual units."""
    c1, c2, c3, c4 = (max(1, c * w // 64) for c in (16, 32, 64, 128))
    side = math.ceil(image_size / 8) * 8
    s2, s4, s8 = (side // 2) ** 2, (side // 4) ** 2, (side // 8) ** 2

    def down(cin: int, cout: int, at: int, kres: int = 9) -> list[Conv]:
        return [Conv(cin, cout, 9, at, bias=True, norm=False), Conv(cout, cout, 9, at, bias=True, norm=False),
                Conv(cin, cout, kres, at, bias=True, norm=False)]  # fmt: skip

    def up(cin: int, cout: int, at_in: int) -> list[Conv]:
        return [Conv(cin, cout, 9, at_in, bias=True, norm=False), Conv(cout, cout, 9, 4 * at_in, bias=True,
                                                                        norm=False)]  # fmt: skip

    out = down(1, c1, s2) + down(c1, c2, s4) + down(c2, c3, s8) + down(c3, c4, s8, kres=1)
    return out + up(c3 + c4, c2, s8) + up(2 * c2, c1, s4) + up(2 * c1, NUM_CLASSES, s2)


_DECODERS = {"linear": _linear, "conv": _conv, "multiscale": _multiscale, "unetr": _unetr}


def decoder_convs(decoder: str, shape: VitShape | None, image_size: int, width: int) -> list[Conv]:
    """The convolutions of ``decoder`` on ``image_size`` slices (``shape``: the backbone it reads, None for the UNet
    baseline); an empty list for a decoder this module does not know."""
    if decoder == "unet":
        return _unet(image_size, width)
    if shape is None or decoder not in _DECODERS:
        return []
    levels = TAPS if DECODER_LEVELS[decoder] == "all" else 1
    return _DECODERS[decoder](shape.width, levels, grid(shape, image_size), shape.patch, width)


def decoder_flops(decoder: str, shape: VitShape | None, image_size: int, width: int) -> float:
    """Forward FLOPs of the decoder for one image."""
    return sum(c.flops for c in decoder_convs(decoder, shape, image_size, width))


def decoder_params(decoder: str, shape: VitShape | None, image_size: int, width: int) -> int:
    """Trainable parameters of the decoder (convolutions, biases, BatchNorm scales and shifts)."""
    return sum(c.params for c in decoder_convs(decoder, shape, image_size, width))


def known(backbone: str, decoder: str) -> bool:
    """Whether this module prices the pair: a named backbone (or ``none`` with the UNet) and a known decoder."""
    if backbone == "none":
        return decoder == "unet"
    return backbone in VIT_SHAPES and decoder in _DECODERS
