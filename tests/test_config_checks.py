"""The config's one check: every rule a trial follows that the config alone tells, one line naming the key, no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lasegseg.config import Config
from lasegseg.config_checks import (
    BACKBONE_FAMILIES,
    DECODER_NEEDS_BACKBONE,
    MODES,
    Mode,
    backbone_names,
    declared_family,
    validate_config,
    validate_model,
)
from lasegseg.errors import ConfigError


def _check(**changes) -> None:
    validate_config({**Config().to_flat(), **changes})


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"data.image_size": 100}, "'data.image_size' must be a positive multiple of the patch size 14"),
        ({"data.image_size": 0}, "'data.image_size' must be a positive number of pixels, got 0"),
        ({"data.fraction": 0.0}, "'data.fraction' must be in (0, 1]"),
        ({"data.fraction": 1.5}, "'data.fraction' must be in (0, 1]"),
        ({"data.val_fraction": 0.5, "data.test_fraction": 0.5}, "must leave patients for training"),
        ({"optim.lr": 0.0}, "'optim.lr' must be > 0"),
        ({"optim.lr": -1e-3}, "'optim.lr' must be > 0"),
        ({"model.mode": "partial"}, "'model.mode' must be one of frozen, finetune, lora"),
        ({"data.patients": -1}, "'data.patients' must be >= 0"),
        ({"data.patients": 2, "data.fraction": 0.5}, "not both"),
        ({"data.layout": "dicom"}, "'data.layout' must be one of"),
        ({"train.loss": "focal"}, "'train.loss' must be one of dicece, dicefocal, got 'focal'"),
        ({"train.augment": "mixup"}, "'train.augment' must be one of none, flip, spatial, got 'mixup'"),
        ({"eval.nsd_tolerance_mm": 0.0}, "'eval.nsd_tolerance_mm' must be a finite distance > 0 (mm), got 0.0"),
        ({"eval.nsd_tolerance_mm": -1}, "'eval.nsd_tolerance_mm' must be a finite distance > 0"),
        ({"eval.nsd_tolerance_mm": float("inf")}, "'eval.nsd_tolerance_mm' must be a finite distance > 0"),
    ],
)
def test_bad_values_name_the_key(changes, message):
    with pytest.raises(ConfigError) as info:
        _check(**changes)
    assert str(info.value).startswith("config key '") and message in str(info.value)


def test_modes_equal_their_strings():
    assert MODES == ("frozen", "finetune", "lora") and Mode("lora") is Mode.LORA
    assert Mode.FROZEN == "frozen" and f"{Mode.FINETUNE}" == "finetune" and str(Mode.LORA) == "lora"


@pytest.mark.parametrize(
    "model,message",
    [
        (
            {"backbone": "tiny", "decoder": "unet"},
            "config key 'model.backbone' must be 'none' for model.decoder=unet (it reads only the image), got 'tiny'",
        ),
        (
            {"backbone": "none", "decoder": "linear"},
            "config key 'model.decoder' must be a decoder without backbone (unet) when model.backbone=none, "
            "got 'linear'",
        ),
        (
            {"decoder": "segformer"},
            "config key 'model.decoder' must be one of linear, conv, multiscale, unetr, unet, got 'segformer'",
        ),
        (
            {"backbone": "tiny-dinov3", "registers": True},
            "config key 'model.registers' must be false for backbone 'tiny-dinov3': a DINOv3 has one variant",
        ),
        ({"backbone": "dinov3-7b", "registers": True}, "config key 'model.registers' must be false"),
        ({"backbone": "dinov2-huge"}, "config key 'model.backbone' must be a backbone name (tiny, dinov2-small"),
        ({"backbone": "vit-b"}, "a hub id org/name, a local folder or 'none', got 'vit-b'"),
        ({"backbone": ""}, "config key 'model.backbone' must be a backbone name"),
        ({"lora_alpha": float("inf")}, "config key 'model.lora_alpha' must be a finite number > 0, got inf"),
        ({"lora_alpha": -16.0}, "config key 'model.lora_alpha' must be a finite number > 0"),
        ({"lora_rank": 0}, "config key 'model.lora_rank' must be >= 1"),
        ({"lora_dropout": 1.0}, "config key 'model.lora_dropout' must be in [0, 1)"),
        ({"decoder_width": 3}, "config key 'model.decoder_width' must be >= 4"),
    ],
)
def test_model_rules_name_the_key_in_one_line(model, message):
    flat = {**Config().to_flat(), **{f"model.{k}": v for k, v in model.items()}}
    for check in (validate_model, validate_config):
        with pytest.raises(ConfigError) as info:
            check(flat)
        assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "model",
    [
        {"backbone": "none", "decoder": "unet", "mode": "frozen"},  # the baseline ignores the mode
        {"backbone": "dinov2-giant", "registers": True, "decoder": "unetr", "mode": "lora"},
        {"backbone": "dinov3-huge-plus", "decoder": "linear"},
        {"backbone": "tiny-dinov3", "decoder": "conv", "registers": False},
        {"backbone": "facebook/dinov2-small", "registers": True},  # a hub id: what it holds is the loader's to say
        {"backbone": "/models/my-dinov2"},  # a path: it may exist only where the trials run
        {"backbone": "./dinov2-local"},
        {"backbone": "~/weights/dinov3"},
    ],
)
def test_what_can_work_passes(model):
    _check(**{f"model.{k}": v for k, v in model.items()})


def test_a_bare_name_is_a_folder_when_one_is_there(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="got 'my-vit'"):
        _check(**{"model.backbone": "my-vit"})
    (tmp_path / "my-vit").mkdir()
    _check(**{"model.backbone": "my-vit"})


def test_the_declared_names_are_the_backbone_short_names():
    assert backbone_names()[:5] == ["tiny", "dinov2-small", "dinov2-base", "dinov2-large", "dinov2-giant"]
    assert "tiny-dinov3" in backbone_names() and "dinov3-small-plus" in backbone_names()
    assert len(backbone_names()) == sum(1 + len(f.sizes) for f in BACKBONE_FAMILIES.values())
    assert declared_family("dinov3-small-plus") is BACKBONE_FAMILIES["dinov3"]
    assert declared_family("tiny") is BACKBONE_FAMILIES["dinov2"]
    assert declared_family("dinov2-huge") is declared_family("none") is declared_family("org/dinov2-small") is None
    assert DECODER_NEEDS_BACKBONE["unet"] is False


def test_checking_a_sweep_worth_of_configs_imports_no_torch():
    code = (
        "import sys; from lasegseg.config import from_flat; "
        "[from_flat({'model.backbone': b, 'model.decoder': 'multiscale', 'data.image_size': 448}) "
        "for b in ('tiny', 'dinov2-giant', 'dinov3-large')]; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
        "or m.startswith('lasegseg.models')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
