"""The Backbone: feature maps per level, padding, layer tables, gradients, fingerprints and LoRA targets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lasegseg.errors import ModelError
from lasegseg.models import backbones
from lasegseg.models.backbones import build_backbone, fingerprint, lora_target_modules, weights_fingerprint
from lasegseg.models.families import backbone_family, list_backbone_families
from lasegseg.models.tiny import tiny_backbone_dir

DINOV2 = backbone_family("dinov2")
LAYER_INDICES = DINOV2.layer_indices
TINY_NAMES = [backbone_family(f).tiny_name for f in list_backbone_families()]
# Every (family, registers) pair a family builds: DINOv3 has one variant (always with registers) and refuses True.
FAMILY_VARIANTS = [
    (f, r) for f in list_backbone_families() for r in (False, True) if not (r and backbone_family(f).single_variant)
]


def test_tiny_layer_table_and_attributes() -> None:
    backbone = build_backbone("tiny")
    assert backbone.layer_indices == LAYER_INDICES["tiny"]
    assert backbone.num_features_levels == len(backbone.layer_indices) == 4
    assert backbone.embed_dim == DINOV2.tiny_config["hidden_size"]
    assert backbone.patch_size == 14
    assert backbone.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("registers", [False, True])
@pytest.mark.parametrize("size", [(112, 112), (100, 100), (98, 127)])
def test_forward_shapes(registers: bool, size: tuple[int, int]) -> None:
    backbone = build_backbone("tiny", registers=registers)
    torch.manual_seed(0)
    feats = backbone(torch.rand(2, 1, *size))
    grid = (math.ceil(size[0] / 14), math.ceil(size[1] / 14))
    assert len(feats) == backbone.num_features_levels
    for f in feats:
        assert f.shape == (2, backbone.embed_dim, *grid)
        assert torch.isfinite(f).all()


@pytest.mark.parametrize("registers", [False, True])
def test_last_level_is_the_final_layernormed_patch_tokens(registers: bool) -> None:
    backbone = build_backbone("tiny", registers=registers)
    torch.manual_seed(0)
    x = torch.rand(2, 1, 112, 112)
    with torch.no_grad():
        last = backbone(x)[-1]
        mean = torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(backbones.IMAGENET_STD).view(1, 3, 1, 1)
        tokens = backbone.model(pixel_values=(x.repeat(1, 3, 1, 1) - mean) / std).last_hidden_state
    patches = tokens[:, backbone.num_prefix_tokens :].reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(last, patches)


@pytest.mark.parametrize("registers", [False, True])
def test_asked_levels_are_the_same_maps_and_only_their_hidden_states_are_kept(registers: bool) -> None:
    backbone = build_backbone("tiny", registers=registers).eval()
    kept: list[list[bool]] = []
    backbone.model.register_forward_hook(lambda m, a, out: kept.append([h is not None for h in out.hidden_states]))
    torch.manual_seed(0)
    x = torch.rand(2, 1, 100, 112)
    with torch.no_grad():
        every = backbone(x)
        some = backbone(x, [3, 1])
    assert len(some) == 2 and torch.equal(some[0], every[3]) and torch.equal(some[1], every[1])
    # hidden_states[i + 1] is block i's output: the all-levels pass keeps all, the other one only blocks 1 and 3.
    taps = {backbone.layer_indices[i] + 1 for i in (1, 3)}
    assert kept == [[True] * 5, [i in taps for i in range(5)]]


@pytest.mark.parametrize("levels", [[4], [-1], [], [2, 2]])
def test_bad_levels_are_a_model_error(levels: list[int]) -> None:
    backbone = build_backbone("tiny")
    with pytest.raises(ModelError, match=r"levels .* must be distinct indices in 0\.\.3 \(it taps blocks"):
        backbone(torch.rand(1, 1, 28, 28), levels)


def test_padding_is_zero_at_right_and_bottom() -> None:
    backbone = build_backbone("tiny")
    torch.manual_seed(0)
    x = torch.rand(1, 1, 100, 103)
    with torch.no_grad():
        padded = backbone(F.pad(x, (0, 9, 0, 12)))
        auto = backbone(x)
    for a, b in zip(auto, padded, strict=True):
        torch.testing.assert_close(a, b)


def test_rejects_non_grayscale_input() -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        build_backbone("tiny")(torch.rand(1, 3, 112, 112))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 112, 112)
    grads = []
    for enabled in (False, True):
        backbone = build_backbone("tiny", gradient_checkpointing=enabled).train()
        sum(f.square().mean() for f in backbone(x)).backward()
        grads.append({n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_fingerprint_identifies_the_source_not_the_trained_weights() -> None:
    backbone = build_backbone("tiny")
    before = fingerprint(backbone)
    assert before == weights_fingerprint(backbone.model)
    with torch.no_grad():
        backbone.model.embeddings.patch_embeddings.projection.weight.view(-1)[0] += 1.0
    assert weights_fingerprint(backbone.model) != before
    assert fingerprint(backbone) == before


def test_registers_requested_on_a_folder_without_them() -> None:
    with pytest.raises(ModelError, match="without registers"):
        build_backbone(str(tiny_backbone_dir()), registers=True)


@pytest.mark.parametrize(("family", "registers"), FAMILY_VARIANTS)
def test_every_family_builds_its_tiny_model_and_runs_forward(family: str, registers: bool) -> None:
    fam = backbone_family(family)
    backbone = build_backbone(fam.tiny_name, registers=registers)
    assert backbone.family == family
    assert backbone.patch_size == fam.patch_size
    assert backbone.embed_dim == fam.tiny_config["hidden_size"]
    assert backbone.layer_indices == fam.layer_indices["tiny"]
    has_registers = registers or fam.single_variant
    assert backbone.num_prefix_tokens == 1 + (fam.tiny_num_registers if has_registers else 0)
    size = 3 * fam.patch_size + 5
    torch.manual_seed(0)
    feats = backbone(torch.rand(2, 1, size, size))
    assert len(feats) == backbone.num_features_levels
    for f in feats:
        assert f.shape == (2, backbone.embed_dim, 4, 4)
        assert torch.isfinite(f).all()


@pytest.mark.parametrize("family", list_backbone_families())
def test_every_family_has_lora_targets_in_its_tiny_model(family: str) -> None:
    backbone = build_backbone(backbone_family(family).tiny_name)
    targets = lora_target_modules(backbone)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in backbone.model.named_modules()}
    assert targets and set(targets) <= leaves


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_forward_shapes_for_every_level_set(name: str) -> None:
    backbone = build_backbone(name).eval()
    p = backbone.patch_size
    torch.manual_seed(0)
    # Non-square, and not a multiple of the patch: RoPE (DINOv3) and interpolated position embeddings (DINOv2) both
    # follow the grid of the padded input.
    x = torch.rand(2, 1, 3 * p + 1, 5 * p)
    with torch.no_grad():
        every = backbone(x)
        for levels in ([0], [3], [1, 2], [0, 3], [3, 2, 1, 0]):
            some = backbone(x, levels)
            assert [f.shape for f in some] == [(2, backbone.embed_dim, 4, 5)] * len(levels)
            assert all(torch.equal(f, every[i]) for f, i in zip(some, levels, strict=True))


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_keeps_only_the_hidden_states_it_is_asked_for(name: str) -> None:
    backbone = build_backbone(name).eval()
    kept: list[list[bool]] = []
    backbone.model.register_forward_hook(lambda m, a, out: kept.append([h is not None for h in out.hidden_states]))
    with torch.no_grad():
        backbone(torch.rand(1, 1, 64, 64), [2])
    assert kept == [[i == backbone.layer_indices[2] + 1 for i in range(5)]]


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_last_level_is_the_final_normed_patch_tokens(name: str) -> None:
    backbone = build_backbone(name).eval()
    torch.manual_seed(0)
    x = torch.rand(2, 1, 4 * backbone.patch_size, 3 * backbone.patch_size)
    with torch.no_grad():
        last = backbone(x)[-1]
        mean = torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(backbones.IMAGENET_STD).view(1, 3, 1, 1)
        tokens = backbone.model(pixel_values=(x.repeat(1, 3, 1, 1) - mean) / std).last_hidden_state
    patches = tokens[:, backbone.num_prefix_tokens :].reshape(2, 4, 3, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(last, patches)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_every_trainable_parameter_gets_a_gradient(name: str) -> None:
    backbone = build_backbone(name).train()
    torch.manual_seed(0)
    sum(f.square().mean() for f in backbone(torch.rand(2, 1, 64, 64))).backward()
    trainable = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert trainable and not missing, missing[:5]
    assert all(p.grad is None for p in backbone.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_lora_adapts_the_attention_projections_and_trains(name: str) -> None:
    from lasegseg.config import ModelConfig
    from lasegseg.models.segmenter import build_segmenter, param_groups

    torch.manual_seed(0)
    seg = build_segmenter(ModelConfig(backbone=name, decoder="multiscale", mode="lora", decoder_width=16))
    targets = set(lora_target_modules(seg.backbone))
    adapted = {n.split(".attention.")[1].split(".")[0] for n, p in seg.backbone.named_parameters() if p.requires_grad}
    assert adapted == targets and targets in ({"q_proj", "v_proj"}, {"query", "value"})
    lora_b = {n: p.clone() for n, p in seg.backbone.named_parameters() if "lora_B" in n}
    base = {k: v.clone() for k, v in seg.backbone.state_dict().items() if "lora_" not in k}
    optimizer = torch.optim.AdamW(param_groups(seg, 1e-2, 1.0, 0.0))
    seg.train()
    seg(torch.rand(2, 1, 64, 64)).log_softmax(1)[:, 1].mean().neg().backward()
    optimizer.step()
    assert lora_b and all(not torch.equal(lora_b[n], p) for n, p in seg.backbone.named_parameters() if n in lora_b)
    assert all(torch.equal(base[k], v) for k, v in seg.backbone.state_dict().items() if k in base)


@pytest.mark.parametrize("family", list_backbone_families())
def test_a_local_copy_of_a_named_size_architecture_gets_its_table(family: str, tmp_path: Path) -> None:
    """A folder is matched on (width, depth): the smallest named size's, with a narrow MLP to stay cheap."""
    import transformers

    fam = backbone_family(family)
    (width, depth), size = min(fam.arch_sizes.items())
    model_type = next(iter(fam.model_classes))
    fields = {**fam.tiny_config, "hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": 6}
    fields |= {"mlp_ratio": 1, "intermediate_size": width, "patch_size": fam.patch_size}
    config = transformers.AutoConfig.for_model(model_type, **fields)
    getattr(transformers, fam.model_classes[model_type])(config).save_pretrained(tmp_path)
    backbone = build_backbone(str(tmp_path))
    assert backbone.layer_indices == fam.layer_indices[size] and backbone.family == family
