"""FLOPs and parameters on paper: the shapes agree with the registries, and the counts with torch's FLOP counter, the
built modules and bench/gpu.py's analytic ViT count."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from bench.gpu_shapes import SHAPES, vit_flops
from lasegseg.models.decoders import create_decoder, decoder_spec, list_decoders
from lasegseg.models.families import FAMILIES, list_backbones
from lasegseg.sweep import costs


def test_every_named_backbone_has_a_shape_that_agrees_with_its_family():
    assert set(costs.VIT_SHAPES) == set(list_backbones())
    for family in FAMILIES.values():
        for size in (*family.sizes, "tiny"):
            name = family.tiny_name if size == "tiny" else f"{family.name}-{size}"
            shape = costs.VIT_SHAPES[name]
            assert shape.patch == family.patch_size and len(family.layer_indices[size]) == costs.TAPS
            assert max(family.layer_indices[size]) == shape.depth - 1
            if size == "tiny":
                assert (shape.width, shape.depth) == (family.tiny_config["hidden_size"],
                                                      family.tiny_config["num_hidden_layers"])  # fmt: skip
            else:
                assert family.arch_sizes[(shape.width, shape.depth)] in (size, "small")  # S and S+ share a table
            assert shape.registers == (family.tiny_num_registers if family.single_variant else 0)


def test_decoder_levels_agree_with_the_registry():
    assert set(costs.DECODER_LEVELS) == set(list_decoders())
    for name, levels in costs.DECODER_LEVELS.items():
        spec = decoder_spec(name)
        assert levels == (spec.levels if spec.needs_backbone else None)


@pytest.mark.parametrize("decoder", ["linear", "conv", "multiscale", "unetr", "unet"])
@pytest.mark.parametrize(("dim", "patch", "size", "width"), [(48, 14, 56, 16), (64, 16, 64, 32), (96, 14, 70, 64)])
def test_decoder_flops_and_params_match_the_built_module(decoder, dim, patch, size, width):
    shape = costs.VitShape(dim, 2, 4 * dim, False, patch)
    module = create_decoder(decoder, embed_dim=dim, num_levels=costs.TAPS, patch_size=patch, width=width).eval()
    g = costs.grid(shape, size)
    levels = costs.TAPS if costs.DECODER_LEVELS[decoder] == "all" else 1
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module([torch.randn(1, dim, g, g) for _ in range(levels)], torch.randn(1, 1, size, size))
    assert costs.decoder_flops(decoder, shape, size, width) == counter.get_total_flops()
    built = sum(p.numel() for p in module.parameters())
    # Left out: multiscale's 4 level weights, the UNet's 13 one-parameter PReLUs.
    assert built - costs.decoder_params(decoder, shape, size, width) in (0, 4, 13)


def _model(family: str, gated: bool, registers: bool):
    common = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, attn_implementation="eager")
    if family == "dinov3":
        return transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
            patch_size=16, intermediate_size=512, image_size=128, num_register_tokens=4, use_gated_mlp=gated, **common
        ))  # fmt: skip
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(
            patch_size=14, image_size=112, use_swiglu_ffn=gated, num_register_tokens=4, **common
        )
        return transformers.Dinov2WithRegistersModel(cfg)
    return transformers.Dinov2Model(transformers.Dinov2Config(patch_size=14, image_size=112, use_swiglu_ffn=gated,
                                                              **common))  # fmt: skip


@pytest.mark.parametrize(("family", "gated", "registers"), [("dinov2", False, False), ("dinov2", True, False),
                         ("dinov2", False, True), ("dinov3", False, False), ("dinov3", True, False)])  # fmt: skip
def test_vit_flops_and_params_match_transformers_models(family, gated, registers):
    torch.manual_seed(0)
    model = _model(family, gated, registers).eval()
    tiny = costs.VIT_SHAPES["tiny" if family == "dinov2" else "tiny-dinov3"]
    ffn = 344 if gated and family == "dinov2" else 512  # DINOv2's SwiGLU: 2/3 of 4·d, rounded up to a multiple of 8
    shape = costs.VitShape(tiny.width, tiny.depth, ffn, gated, tiny.patch, tiny.registers, tiny.positions)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=torch.randn(1, 3, 112, 112))
    assert costs.vit_embed_flops(shape, 112) + costs.vit_block_flops(shape, 112, registers) == counter.get_total_flops()
    built = sum(p.numel() for p in model.parameters())
    # DINOv3's key projection has no bias: one width per block fewer than counted.
    assert costs.vit_params(shape, registers) - built == (shape.depth * shape.width if family == "dinov3" else 0)


@pytest.mark.parametrize(("size", "name"), [("S", "dinov2-small"), ("B", "dinov2-base"), ("L", "dinov2-large"),
                                            ("g", "dinov2-giant")])  # fmt: skip
def test_vit_flops_are_bench_gpu_counts(size, name):
    shape = costs.VIT_SHAPES[name]
    embed, blocks = costs.vit_embed_flops(shape, 448), costs.vit_block_flops(shape, 448)
    assert embed + blocks == vit_flops(SHAPES[size], 448)
    assert 2 * embed + 3 * blocks == vit_flops(SHAPES[size], 448, backward=True)


def test_lora_adapts_query_and_value_of_every_block():
    shape = costs.VIT_SHAPES["dinov2-giant"]
    assert costs.lora_params(shape, 8) == 40 * 2 * (8 * 1536 + 1536 * 8)


def test_unknown_architectures_are_not_priced():
    assert costs.vit_shape("facebook/some-other-vit") is None and costs.vit_shape("none") is None
    assert not costs.known("/models/my-vit", "linear") and not costs.known("dinov2-small", "segformer")
    assert costs.known("none", "unet") and costs.known("dinov3-large", "unetr")
    assert costs.decoder_convs("linear", None, 448, 64) == []
