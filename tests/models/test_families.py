"""The backbone family registry: named sizes, layer tables, hub ids, and what registering a family requires."""

from __future__ import annotations

import dataclasses

import pytest

from lasegseg.errors import ModelError
from lasegseg.models.families import (
    FAMILIES,
    backbone_family,
    even_indices,
    list_backbone_families,
    list_backbones,
    register_backbone_family,
)
from lasegseg.models.sources import check_backbone_name, resolve_source

DINOV2 = backbone_family("dinov2")
DINOV3 = backbone_family("dinov3")
LAYER_INDICES = DINOV2.layer_indices


@pytest.mark.parametrize(
    ("num_layers", "expected"),
    [(12, [2, 5, 8, 11]), (24, [5, 11, 17, 23]), (40, [9, 19, 29, 39]), (4, [0, 1, 2, 3]), (2, [0, 1])],
)
def test_even_indices_for_unknown_architectures(num_layers: int, expected: list[int]) -> None:
    assert even_indices(num_layers) == expected


def test_named_size_tables_are_dinov2s() -> None:
    assert LAYER_INDICES["small"] == LAYER_INDICES["base"] == [2, 5, 8, 11]
    assert LAYER_INDICES["large"] == [4, 11, 17, 23]
    assert LAYER_INDICES["giant"] == [9, 19, 29, 39]


@pytest.mark.parametrize("family", list_backbone_families())
def test_every_family_names_its_sizes_and_their_layer_tables(family: str) -> None:
    fam = backbone_family(family)
    assert fam.tiny_name in list_backbones()
    for size in fam.sizes:
        name = f"{family}-{size}"
        assert name in list_backbones()
        hub_size = fam.hub_sizes.get(size, size)
        assert resolve_source(name, registers=False) == (fam.hub_id.format(size=hub_size), size, False)
        if fam.single_variant:
            with pytest.raises(ModelError, match="leave model.registers false"):
                check_backbone_name(name, registers=True)
        else:
            check_backbone_name(name, registers=True)
            assert resolve_source(name, registers=True) == (fam.registers_hub_id.format(size=size), size, False)
        taps = fam.layer_indices[size]
        assert taps == sorted(taps) and len(set(taps)) == len(taps) >= 1
    for (_, depth), size in fam.arch_sizes.items():
        assert max(fam.layer_indices[size]) == depth - 1  # the last tap is the last block


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
    monkeypatch.setitem(FAMILIES._entries, "toyvit", entry)
    assert list_backbones()[-3:] == ["tiny-toyvit", "toyvit-s", "toyvit-b"]
    assert resolve_source("toyvit-b", registers=True) == ("toy/toyvit-b16-reg", "b", False)
    check_backbone_name("tiny-toyvit")
    with pytest.raises(ModelError, match="unknown backbone 'toyvit-l'") as err:
        check_backbone_name("toyvit-l")
    assert "toyvit-s" in str(err.value)


def test_registering_a_family_twice_fails() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backbone_family(DINOV2)
    assert list_backbone_families() == ["dinov2", "dinov3"]


def test_a_family_missing_from_the_config_declarations_is_refused() -> None:
    """The config checks backbone names, registers and data.image_size from lasegseg.config_checks' declarations: the
    registry must agree with them."""
    with pytest.raises(ValueError, match="BACKBONE_FAMILIES"):
        register_backbone_family(dataclasses.replace(DINOV3, name="dinov4", tiny_name="tiny-dinov4"))
    with pytest.raises(ValueError, match="BACKBONE_FAMILIES"):
        register_backbone_family(dataclasses.replace(DINOV3, patch_size=14))
    with pytest.raises(ValueError, match="BACKBONE_FAMILIES"):
        register_backbone_family(dataclasses.replace(DINOV3, sizes=(*DINOV3.sizes, "huge")))
    with pytest.raises(ValueError, match="BACKBONE_FAMILIES"):
        register_backbone_family(dataclasses.replace(DINOV3, registers_model_types=("dinov3_vit",)))
    assert list_backbone_families() == ["dinov2", "dinov3"]


def test_dinov3_tables_are_four_even_intervals_of_each_depth() -> None:
    depths = {"small": 12, "small-plus": 12, "base": 12, "large": 24, "huge-plus": 32, "7b": 40}
    assert set(depths) == set(DINOV3.sizes)
    for size, depth in depths.items():
        assert DINOV3.layer_indices[size] == even_indices(depth), size
    assert DINOV3.layer_indices["large"] == [5, 11, 17, 23]
