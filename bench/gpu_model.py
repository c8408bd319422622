"""The measured model: a lasegseg segmenter over a randomly initialised DINOv2 of a benchmarked shape, its training
step, and its FLOPs counted by ``torch.utils.flop_counter`` (the analytic count is in bench/gpu_shapes.py)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import Dinov2Config, Dinov2Model

from bench.gpu_shapes import PATCH, VitShape
from lasegseg.models.backbones import Backbone
from lasegseg.models.decoders import create_decoder
from lasegseg.models.families import even_indices
from lasegseg.models.segmenter import NUM_CLASSES, Segmenter, param_groups
from lasegseg.train.inference import autocast_context


def build_segmenter(shape: VitShape, *, mode: str, decoder: str, image_size: int, device):
    """A lasegseg Segmenter over a random DINOv2 of ``shape``, set up as ``build_segmenter`` sets up a trial."""
    config = Dinov2Config(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads, mlp_ratio=4,
        use_swiglu_ffn=shape.swiglu, patch_size=PATCH, image_size=image_size, attn_implementation="sdpa",
    )  # fmt: skip
    with torch.device(device):  # initialise on the device: a giant on the CPU first would take minutes
        model = Dinov2Model(config)
    backbone = Backbone(model, even_indices(shape.layers), source=f"random {shape.name}")
    head = create_decoder(
        decoder, embed_dim=shape.hidden, num_levels=backbone.num_features_levels, patch_size=PATCH,
        num_classes=NUM_CLASSES,
    ).to(device=device, memory_format=torch.channels_last)  # fmt: skip
    if mode == "frozen":
        backbone.requires_grad_(False)
    elif shape.checkpointing:
        backbone.set_gradient_checkpointing(True)
    return Segmenter(backbone, head, mode="frozen" if mode == "frozen" else "finetune").to(device).train()


def make_step(seg, forward, batch: int, image_size: int, device):
    """One training step (bf16 autocast on CUDA, cross-entropy, AdamW) on a fixed random batch; returns ``step()``."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(batch, 1, image_size, image_size, generator=generator).to(device)
    y = (torch.rand(batch, image_size, image_size, generator=generator) > 0.9).long().to(device)
    optimizer = torch.optim.AdamW(param_groups(seg, 1e-4, 1.0, 1e-4), lr=1e-4)

    def step() -> None:
        with autocast_context(device, "auto"):
            loss = F.cross_entropy(forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def count_flops(seg, device, image_size: int, *, checkpointing: bool) -> tuple[float, float]:
    """FlopCounterMode on one image: (backbone FLOPs, whole training step FLOPs), recompute not included.

    The backbone is counted alone (forward, plus backward unless frozen) to check the analytic ViT formula; the
    step minus the backbone gives the decoder's share. Checkpointing is off while counting so that the count is
    model FLOPs, the numerator of MFU.
    """

    def attention():
        # The CPU's fused attention kernel has no FLOP formula; the math backend is counted (as bmm).
        return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()

    if checkpointing:
        seg.backbone.set_gradient_checkpointing(False)
    try:
        x = torch.rand(1, 1, image_size, image_size, device=device)
        with attention(), FlopCounterMode(display=False) as backbone_counter:
            with autocast_context(device, "auto"):
                feats = seg.features(x)
            if not seg.frozen:
                sum(f.float().sum() for f in feats).backward()
        seg.zero_grad(set_to_none=True)
        with attention(), FlopCounterMode(display=False) as step_counter:
            make_step(seg, seg, 1, image_size, device)()
        seg.zero_grad(set_to_none=True)
    finally:
        if checkpointing:
            seg.backbone.set_gradient_checkpointing(True)
    return float(backbone_counter.get_total_flops()), float(step_counter.get_total_flops())
