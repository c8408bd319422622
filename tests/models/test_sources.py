"""Backbone names → sources: short names, hub ids and folders, resolved without loading or creating anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from lasegseg.errors import ModelError
from lasegseg.models.backbones import build_backbone
from lasegseg.models.families import list_backbones
from lasegseg.models.sources import check_backbone_name, resolve_source
from lasegseg.models.tiny import tiny_backbone_dir


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
    source, _, local = resolve_source(name, registers=registers)
    assert (source, local) == (hub_id, False)


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
    assert resolve_source(name, registers=False) == (hub_id, name.removeprefix("dinov3-"), False)


def test_dinov3_refuses_model_registers_true() -> None:
    for name in ("tiny-dinov3", "dinov3-large"):
        with pytest.raises(ModelError, match=r"DINOv3, which has one variant .* leave model.registers false"):
            check_backbone_name(name, registers=True)
    with pytest.raises(ModelError, match="leave model.registers false"):
        build_backbone(str(tiny_backbone_dir(family="dinov3")), registers=True)
