"""Backbone names → sources: short names, hub ids and folders, resolved without loading or creating anything; the
stand-in switch."""

from __future__ import annotations

from pathlib import Path

import pytest

from lasegseg.errors import ConfigError, ModelError
from lasegseg.models.backbones import build_backbone
from lasegseg.models.families import backbone_family, list_backbones
from lasegseg.models.sources import STAND_IN_ENV, check_backbone_name, resolve_source, stand_ins_enabled
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


@pytest.mark.parametrize(
    ("name", "registers", "folder", "size"),
    [
        ("dinov2-giant", False, "stand-in-dinov2-giant", "giant"),
        ("dinov2-large", True, "stand-in-dinov2-large-reg", "large"),
        ("dinov3-large", False, "stand-in-dinov3-large", "large"),
        ("dinov3-small-plus", False, "stand-in-dinov3-small-plus", "small-plus"),
    ],
)
def test_the_switch_resolves_named_sizes_to_their_stand_ins(
    _cache: Path, monkeypatch, name: str, registers: bool, folder: str, size: str
) -> None:
    monkeypatch.setenv(STAND_IN_ENV, "1")
    assert resolve_source(name, registers=registers) == (str(_cache / "backbones" / folder), size, True)
    backbone = build_backbone(name, registers=registers)
    family = backbone_family(name.split("-", 1)[0])
    assert backbone.source == str(_cache / "backbones" / folder)
    assert backbone.layer_indices == family.layer_indices[size]  # the real size's taps
    assert (backbone.model.config.model_type in family.registers_model_types) == registers


def test_the_switch_leaves_tiny_names_hub_ids_folders_and_none_alone(_cache: Path, monkeypatch) -> None:
    monkeypatch.setenv(STAND_IN_ENV, "1")
    assert resolve_source("tiny", registers=False) == (str(tiny_backbone_dir()), "tiny", True)
    assert resolve_source("tiny-dinov3", registers=False)[0] == str(tiny_backbone_dir(family="dinov3"))
    assert resolve_source("someone/my-dinov2", registers=False) == ("someone/my-dinov2", None, False)
    assert resolve_source(str(_cache), registers=False) == (str(_cache), None, True)
    with pytest.raises(ModelError, match="unet"):
        resolve_source("none", registers=False)
    with pytest.raises(ModelError, match="leave model.registers false"):
        check_backbone_name("dinov3-large", registers=True)


@pytest.mark.parametrize(("value", "enabled"), [("1", True), (" 1 ", True), ("0", False), ("", False), (None, False)])
def test_the_switch_reads_1_or_0(monkeypatch, value: str | None, enabled: bool) -> None:
    if value is None:
        monkeypatch.delenv(STAND_IN_ENV, raising=False)
    else:
        monkeypatch.setenv(STAND_IN_ENV, value)
    assert stand_ins_enabled() is enabled
    assert (resolve_source("dinov2-giant", registers=False, create=False)[2]) is enabled


def test_a_bad_switch_value_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv(STAND_IN_ENV, "yes")
    with pytest.raises(ConfigError, match=f"{STAND_IN_ENV} must be 1 .* or 0, got 'yes'"):
        check_backbone_name("dinov2-giant")


def test_checking_a_name_under_the_switch_creates_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    monkeypatch.setenv(STAND_IN_ENV, "1")
    check_backbone_name("dinov2-giant")
    assert resolve_source("dinov2-giant", registers=False, create=False) == ("dinov2-giant", "giant", True)
    assert list(tmp_path.iterdir()) == []
