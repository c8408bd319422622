"""What bench/gpu.py measures, and its FLOPs on paper: the DINOv2 shapes and their batches, the cached-feature
feeds, the cards' dense bf16 peaks, and the analytic ViT FLOP count (no torch here, so the script's argument
checks answer at once)."""

from __future__ import annotations

import dataclasses
import math

PATCH = 14


@dataclasses.dataclass(frozen=True)
class VitShape:
    """A DINOv2 ViT/14 architecture and the batch sizes benchmarked at 448 px on an 80 GB card."""

    name: str
    hidden: int
    layers: int
    heads: int
    swiglu: bool
    batch_frozen: int
    batch_e2e: int

    @property
    def checkpointing(self) -> bool:
        """Gradient checkpointing in e2e mode, as lasegseg turns it on (24+ blocks: large, giant)."""
        return self.name in ("ViT-L/14", "ViT-g/14")

    @property
    def ffn_hidden(self) -> int:
        """MLP width: 4·D, or for SwiGLU two thirds of it rounded up to a multiple of 8 (giant: 4096)."""
        hidden = 4 * self.hidden
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.swiglu else hidden


# Official DINOv2 sizes (facebook/dinov2-{small,base,large,giant} config.json).
SHAPES = {
    "S": VitShape("ViT-S/14", 384, 12, 6, False, 64, 32),
    "B": VitShape("ViT-B/14", 768, 12, 12, False, 64, 32),
    "L": VitShape("ViT-L/14", 1024, 24, 16, False, 32, 32),
    "g": VitShape("ViT-g/14", 1536, 40, 24, True, 32, 16),
}
# --smoke: the same four code paths (SwiGLU and checkpointing included) at sizes a CPU runs in seconds.
SMOKE_SHAPES = {
    "S": VitShape("ViT-S/14", 48, 2, 6, False, 2, 2),
    "B": VitShape("ViT-B/14", 96, 2, 12, False, 2, 2),
    "L": VitShape("ViT-L/14", 64, 3, 16, False, 2, 2),
    "g": VitShape("ViT-g/14", 96, 3, 24, True, 2, 2),
}

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a case-insensitive substring of the device name; first
# match wins, so a variant comes before the plain name it contains: the PCIe H100 before the SXM one ("NVIDIA H100
# 80GB HBM3"), the H200 NVL (PCIe, lower clocks) before the SXM H200. GH200 matches H200: same peak as the SXM card.
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("H100 NVL", None),  # its clocks differ from both the PCIe and the SXM card: pass --peak-tflops
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("RTX 4090", 165.0),
)


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """The card's dense bf16 peak: ``--peak-tflops`` if given, else the table, else None (unknown)."""
    if override:
        return override
    for needle, value in PEAK_BF16_TFLOPS:
        if needle.lower() in device_name.lower():
            return value
    return None


def vit_flops(shape: VitShape, image_size: int, *, backward: bool = False) -> float:
    """FLOPs of one image through the ViT: patch embedding, QKV/output projections, MLP and attention.

    Every matmul costs 2·in·out per token forward and twice that backward (input and weight gradients), except the
    patch embedding, whose input (the image) needs no gradient. Norms, activations, softmax and residual adds are
    left out, as FlopCounterMode leaves them out.

    Args:
        shape: the architecture.
        image_size: square input side in pixels (padded up to a multiple of the patch size, as lasegseg does).
        backward: forward + backward instead of forward only.
    """
    patches = math.ceil(image_size / PATCH) ** 2
    n, d = patches + 1, shape.hidden
    ffn_mats = 3 if shape.swiglu else 2  # SwiGLU: gate, up, down; GELU MLP: fc1, fc2
    per_layer = 2 * n * (4 * d * d + ffn_mats * d * shape.ffn_hidden) + 4 * n * n * d
    embed = 2 * patches * 3 * PATCH * PATCH * d
    if backward:
        return 2 * embed + 3 * shape.layers * per_layer
    return embed + shape.layers * per_layer


def shapes_for(args) -> dict[str, VitShape]:
    """The full DINOv2 shapes, or their tiny stand-ins under --smoke."""
    return SMOKE_SHAPES if args.smoke else SHAPES


# How the cached-feature rows feed the decoder its batches (see bench/gpu_cached.py).
FEEDS = ("host", "resident", "prefetch")
