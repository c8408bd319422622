from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lasegseg.errors import ModelError
from lasegseg.models import backbones
from lasegseg.models.backbones import (
    Backbone,
    backbone_family,
    build_backbone,
    check_backbone_name,
    fingerprint,
    list_backbone_families,
    list_backbones,
    lora_target_modules,
    tiny_backbone_dir,
    weights_fingerprint,
)

DINOV2 = backbone_family("dinov2")
DINOV3 = backbone_family("dinov3")
LAYER_INDICES = DINOV2.layer_indices
TINY_NAMES = [backbone_family(f).tiny_name for f in list_backbone_families()]
# Every (family, registers) pair a family builds: DINOv3 has one variant (always with registers) and refuses True.
FAMILY_VARIANTS = [
    (f, r) for f in list_backbone_families() for r in (False, True) if not (r and backbone_family(f).single_variant)
]


def _weights(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backbone.model.state_dict().items()}


@pytest.mark.parametrize("registers", [False, True])
def test_tiny_is_saved_as_safetensors_and_reloaded(_cache: Path, registers: bool) -> None:
    first = build_backbone("tiny", registers=registers)
    folder = _cache / "backbones" / ("tiny-reg" if registers else "tiny")
    assert tiny_backbone_dir(registers=registers) == folder
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert first.source == str(folder)
    second = build_backbone("tiny", registers=registers)
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fingerprint(first) == fingerprint(second)
    assert first.num_prefix_tokens == (1 + DINOV2.tiny_num_registers if registers else 1)


def test_tiny_weights_do_not_depend_on_the_cache_or_global_seed(tmp_path: Path, monkeypatch) -> None:
    reference = fingerprint(build_backbone("tiny"))
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    torch.manual_seed(1234)
    fresh = build_backbone("tiny")
    assert fresh.source == str(tmp_path / "backbones" / "tiny")
    assert fingerprint(fresh) == reference


def test_creating_tiny_does_not_move_the_global_rng(tmp_path: Path, monkeypatch) -> None:
    """Otherwise the first trial on a fresh machine (the one that creates the folder) would initialise its decoder
    from another RNG state than every later trial with the same seed."""
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    build_backbone("tiny")  # creates the folder
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(7)
    build_backbone("tiny")  # reloads it
    assert torch.equal(torch.rand(4), expected)


def test_tiny_creation_race_keeps_the_first_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    folder = tiny_backbone_dir()
    before = (folder / "model.safetensors").stat().st_mtime_ns
    # A second process that finished creating after the first one must neither fail nor leave its temp folder.
    backbones._create_tiny(folder, registers=False)
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]


def test_tiny_layer_table_and_attributes() -> None:
    backbone = build_backbone("tiny")
    assert backbone.layer_indices == LAYER_INDICES["tiny"]
    assert backbone.num_features_levels == len(backbone.layer_indices) == 4
    assert backbone.embed_dim == DINOV2.tiny_config["hidden_size"]
    assert backbone.patch_size == 14
    assert backbone.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("num_layers", "expected"),
    [(12, [2, 5, 8, 11]), (24, [5, 11, 17, 23]), (40, [9, 19, 29, 39]), (4, [0, 1, 2, 3]), (2, [0, 1])],
)
def test_even_indices_for_unknown_architectures(num_layers: int, expected: list[int]) -> None:
    assert backbones._even_indices(num_layers) == expected


def test_named_size_tables_are_dinov2s() -> None:
    assert LAYER_INDICES["small"] == LAYER_INDICES["base"] == [2, 5, 8, 11]
    assert LAYER_INDICES["large"] == [4, 11, 17, 23]
    assert LAYER_INDICES["giant"] == [9, 19, 29, 39]


@pytest.mark.parametrize(
    ("name", "registers", "hub_id"),
    [
        ("dinov2-small", False, "facebook/dinov2-small"),
        ("dinov2-giant", False, "facebook/dinov2-giant"),
        ("dinov2-large", True, "facebook/dinov2-with-registers-large"),
        ("someone/my-dinov2", False, "someone/my-dinov2"),
    ],
)
def test_names_resolve_to_hub_ids_without_loading(name: str, registers: bool, hub_id: str) -> None:
    source, _, local = backbones._resolve(name, registers=registers)
    assert (source, local) == (hub_id, False)


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


def test_local_folder_is_loaded_like_any_source() -> None:
    folder = tiny_backbone_dir()
    backbone = build_backbone(str(folder))
    assert backbone.source == str(folder)
    assert backbone.layer_indices == [0, 1, 2, 3]
    assert fingerprint(backbone) == fingerprint(build_backbone("tiny"))


def test_fingerprint_identifies_the_source_not_the_trained_weights() -> None:
    backbone = build_backbone("tiny")
    before = fingerprint(backbone)
    assert before == weights_fingerprint(backbone.model)
    with torch.no_grad():
        backbone.model.embeddings.patch_embeddings.projection.weight.view(-1)[0] += 1.0
    assert weights_fingerprint(backbone.model) != before
    assert fingerprint(backbone) == before


def test_check_backbone_name_loads_nothing(_cache: Path) -> None:
    for name in ["tiny", "dinov2-base", "org/model", str(_cache)]:
        check_backbone_name(name, registers=True)
    with pytest.raises(ModelError, match="unknown backbone"):
        check_backbone_name("tinyy")
    with pytest.raises(ModelError, match="does not exist"):
        check_backbone_name("./missing")


def test_check_backbone_name_does_not_create_the_tiny_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    check_backbone_name("tiny")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["dinov2-huge", "vit-small", "tinyy"])
def test_unknown_short_name_lists_valid_names(name: str) -> None:
    with pytest.raises(ModelError, match=f"unknown backbone '{name}'") as err:
        build_backbone(name)
    for valid in list_backbones():
        assert valid in str(err.value)


@pytest.mark.parametrize("name", ["/no/such/folder", "./missing", "~/no-such-lasegseg-backbone/x/y"])
def test_missing_local_folder_is_named(name: str) -> None:
    with pytest.raises(ModelError, match=f"backbone folder '{name}' does not exist"):
        build_backbone(name)


def test_none_is_not_a_backbone() -> None:
    with pytest.raises(ModelError, match="unet"):
        build_backbone("none")


def test_unloadable_folder_gives_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot load backbone folder") as err:
        build_backbone(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_folder_with_another_model_type(tmp_path: Path) -> None:
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path
    )
    with pytest.raises(ModelError, match="'vit' model, not DINOv2"):
        build_backbone(str(tmp_path))


def test_registers_requested_on_a_folder_without_them() -> None:
    with pytest.raises(ModelError, match="without registers"):
        build_backbone(str(tiny_backbone_dir()), registers=True)


# ----------------------------------------------------------------------------------------- the family registry


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
def test_every_family_names_its_sizes_and_their_layer_tables(family: str) -> None:
    fam = backbone_family(family)
    assert fam.tiny_name in list_backbones()
    for size in fam.sizes:
        name = f"{family}-{size}"
        assert name in list_backbones()
        hub_size = fam.hub_sizes.get(size, size)
        assert backbones._resolve(name, registers=False) == (fam.hub_id.format(size=hub_size), size, False)
        if fam.single_variant:
            with pytest.raises(ModelError, match="leave model.registers false"):
                check_backbone_name(name, registers=True)
        else:
            check_backbone_name(name, registers=True)
            assert backbones._resolve(name, registers=True) == (fam.registers_hub_id.format(size=size), size, False)
        taps = fam.layer_indices[size]
        assert taps == sorted(taps) and len(set(taps)) == len(taps) >= 1
    for (_, depth), size in fam.arch_sizes.items():
        assert max(fam.layer_indices[size]) == depth - 1  # the last tap is the last block


@pytest.mark.parametrize("family", list_backbone_families())
def test_every_family_has_lora_targets_in_its_tiny_model(family: str) -> None:
    backbone = build_backbone(backbone_family(family).tiny_name)
    targets = lora_target_modules(backbone)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in backbone.model.named_modules()}
    assert targets and set(targets) <= leaves


def test_unknown_family_lists_the_valid_ones() -> None:
    with pytest.raises(ModelError, match="unknown backbone family 'dinov9'") as err:
        backbone_family("dinov9")
    assert all(name in str(err.value) for name in list_backbone_families())


def test_a_new_family_is_one_registry_entry(monkeypatch) -> None:
    """Its tiny name and sizes become backbone names that resolve to its hub ids, without loading anything."""
    entry = dataclasses.replace(
        DINOV2,
        name="toyvit",
        display_name="ToyViT",
        patch_size=16,
        sizes=("s", "b"),
        hub_id="toy/toyvit-{size}16",
        registers_hub_id="toy/toyvit-{size}16-reg",
        tiny_name="tiny-toyvit",
    )
    monkeypatch.setitem(backbones.FAMILIES._entries, "toyvit", entry)
    assert list_backbones()[-3:] == ["tiny-toyvit", "toyvit-s", "toyvit-b"]
    assert backbones._resolve("toyvit-b", registers=True) == ("toy/toyvit-b16-reg", "b", False)
    check_backbone_name("tiny-toyvit")
    with pytest.raises(ModelError, match="unknown backbone 'toyvit-l'") as err:
        check_backbone_name("toyvit-l")
    assert "toyvit-s" in str(err.value)


def test_registering_a_family_twice_fails() -> None:
    with pytest.raises(ValueError, match="already registered"):
        backbones.register_backbone_family(DINOV2)
    assert list_backbone_families() == ["dinov2", "dinov3"]


def test_a_bf16_checkpoint_loads_with_fp32_master_weights(tmp_path: Path) -> None:
    """Fine-tuning keeps fp32 master weights whatever dtype the checkpoint was saved in (bf16 comes from autocast)."""
    import transformers

    source = transformers.Dinov2Model.from_pretrained(str(tiny_backbone_dir()), dtype=torch.bfloat16)
    assert next(source.parameters()).dtype == torch.bfloat16
    source.save_pretrained(tmp_path / "bf16")
    loaded = build_backbone(str(tmp_path / "bf16"))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_a_family_missing_from_the_config_declarations_is_refused() -> None:
    """The config checks data.image_size from lasegseg.config's declarations: the registry must agree with them."""
    with pytest.raises(ValueError, match="BACKBONE_PATCH_SIZES"):
        backbones.register_backbone_family(dataclasses.replace(DINOV3, name="dinov4", tiny_name="tiny-dinov4"))
    with pytest.raises(ValueError, match="BACKBONE_PATCH_SIZES"):
        backbones.register_backbone_family(dataclasses.replace(DINOV3, patch_size=14))
    assert list_backbone_families() == ["dinov2", "dinov3"]


# ------------------------------------------------------------------------------- every tiny model, every family


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


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_saved_and_reloaded_through_from_pretrained_gives_identical_outputs(name: str, tmp_path: Path) -> None:
    first = build_backbone(name).eval()
    first.model.save_pretrained(tmp_path / "copy")
    second = build_backbone(str(tmp_path / "copy")).eval()
    assert fingerprint(second) == fingerprint(first) and second.layer_indices == first.layer_indices
    x = torch.rand(1, 1, 64, 48)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(first(x), second(x), strict=True))


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


# ------------------------------------------------------------------------------------------------------- DINOv3


@pytest.mark.parametrize(
    ("name", "hub_id"),
    [
        ("dinov3-small", "facebook/dinov3-vits16-pretrain-lvd1689m"),
        ("dinov3-small-plus", "facebook/dinov3-vits16plus-pretrain-lvd1689m"),
        ("dinov3-base", "facebook/dinov3-vitb16-pretrain-lvd1689m"),
        ("dinov3-large", "facebook/dinov3-vitl16-pretrain-lvd1689m"),
        ("dinov3-huge-plus", "facebook/dinov3-vith16plus-pretrain-lvd1689m"),
        ("dinov3-7b", "facebook/dinov3-vit7b16-pretrain-lvd1689m"),
    ],
)
def test_dinov3_names_resolve_to_meta_hub_ids(name: str, hub_id: str) -> None:
    assert backbones._resolve(name, registers=False) == (hub_id, name.removeprefix("dinov3-"), False)


def test_dinov3_tables_are_four_even_intervals_of_each_depth() -> None:
    depths = {"small": 12, "small-plus": 12, "base": 12, "large": 24, "huge-plus": 32, "7b": 40}
    assert set(depths) == set(DINOV3.sizes)
    for size, depth in depths.items():
        assert DINOV3.layer_indices[size] == backbones._even_indices(depth), size
    assert DINOV3.layer_indices["large"] == [5, 11, 17, 23]


def test_tiny_dinov3_is_saved_with_its_registers_and_no_rope_augmentation(_cache: Path) -> None:
    backbone = build_backbone("tiny-dinov3")
    folder = _cache / "backbones" / "tiny-dinov3"
    assert backbone.source == str(folder) and (folder / "model.safetensors").is_file()
    config = backbone.model.config
    assert (config.model_type, config.patch_size, config.num_register_tokens) == ("dinov3_vit", 16, 4)
    assert backbone.num_prefix_tokens == 5
    assert config.pos_embed_rescale is None and config.pos_embed_jitter is None and config.pos_embed_shift is None
    # Training mode is the geometry of inference: the same features in train() and eval().
    x = torch.rand(1, 1, 64, 80)
    with torch.no_grad():
        train = backbone.train()(x)
        test = backbone.eval()(x)
    assert all(torch.equal(a, b) for a, b in zip(train, test, strict=True))


def test_dinov3_refuses_model_registers_true() -> None:
    for name in ("tiny-dinov3", "dinov3-large"):
        with pytest.raises(ModelError, match=r"DINOv3, which has one variant .* leave model.registers false"):
            check_backbone_name(name, registers=True)
    with pytest.raises(ModelError, match="leave model.registers false"):
        build_backbone(str(tiny_backbone_dir(family="dinov3")), registers=True)
