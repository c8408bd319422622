"""The flat dotted config: round trips, typed parsing, and one clear error per bad key."""

from __future__ import annotations

import pytest

from lasegseg.config import (
    MODES,
    Config,
    Mode,
    ModelConfig,
    config_hash,
    config_keys,
    from_flat,
    frozen_backbone,
    parse_overrides,
    run_name,
)
from lasegseg.errors import ConfigError


def test_flat_round_trip_keeps_every_key_and_type():
    cfg = Config()
    flat = cfg.to_flat()
    assert set(flat) == set(config_keys())
    assert from_flat(flat) == cfg
    changed = cfg.replace(**{"optim.lr": 1e-3, "model__decoder": "linear", "seed": 3})
    assert (changed.optim.lr, changed.model.decoder, changed.seed) == (1e-3, "linear", 3)
    assert cfg.optim.lr == 3e-4  # the original is untouched


def test_strings_are_parsed_by_declared_type():
    flat = parse_overrides(["optim.lr=1e-3", "data.patients=5", "model.registers=true", "train.epochs=2e1"])
    assert flat == {"optim.lr": 1e-3, "data.patients": 5, "model.registers": True, "train.epochs": 20}
    assert isinstance(flat["train.epochs"], int)


@pytest.mark.parametrize(
    "flat,needle",
    [
        ({"model.decodr": "linear"}, "unknown config key 'model.decodr'"),
        ({"optim.lr": "fast"}, "'optim.lr' expects float"),
        ({"train.epochs": 2.5}, "'train.epochs' expects int"),
        ({"train.epochs": True}, "'train.epochs' expects int"),
        ({"model.registers": "maybe"}, "'model.registers' expects bool"),
        ({"data.image_size": 100}, "'data.image_size' must be a positive multiple of the patch size 14"),
        ({"data.fraction": 0.0}, "'data.fraction' must be in (0, 1]"),
        ({"data.fraction": 1.5}, "'data.fraction' must be in (0, 1]"),
        ({"optim.lr": 0.0}, "'optim.lr' must be > 0"),
        ({"optim.lr": -1e-3}, "'optim.lr' must be > 0"),
        ({"model.mode": "partial"}, "'model.mode' must be one of frozen, finetune, lora"),
        ({"data.patients": -1}, "'data.patients' must be >= 0"),
        ({"data.patients": 2, "data.fraction": 0.5}, "not both"),
        ({"data.layout": "dicom"}, "'data.layout' must be one of"),
        ({"eval.nsd_tolerance_mm": 0.0}, "'eval.nsd_tolerance_mm' must be a finite distance > 0 (mm), got 0.0"),
        ({"eval.nsd_tolerance_mm": -1}, "'eval.nsd_tolerance_mm' must be a finite distance > 0"),
        ({"eval.nsd_tolerance_mm": float("inf")}, "'eval.nsd_tolerance_mm' must be a finite distance > 0"),
        ({"eval.nsd_tolerance_mm": "2mm"}, "'eval.nsd_tolerance_mm' expects float"),
        ({"eval.nsd_tol": 2.0}, "unknown config key 'eval.nsd_tol'"),
    ],
)
def test_bad_values_name_the_key(flat, needle):
    with pytest.raises(ConfigError) as info:
        from_flat(flat)
    assert needle in str(info.value)


def test_nsd_tolerance_key():
    assert config_keys()["eval.nsd_tolerance_mm"] is float
    assert Config().eval.nsd_tolerance_mm == 2.0
    flat = parse_overrides(["eval.nsd_tolerance_mm=1"])
    assert flat == {"eval.nsd_tolerance_mm": 1.0} and from_flat(flat).eval.nsd_tolerance_mm == 1.0
    # A config stored before the key existed (a checkpoint's config.json) still loads, with the default.
    old = {k: v for k, v in Config().to_flat().items() if k != "eval.nsd_tolerance_mm"}
    assert from_flat(old).eval.nsd_tolerance_mm == 2.0


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_run_name_and_cell_hash_are_deterministic():
    a = Config().replace(**{"model.decoder": "conv", "model.mode": "frozen", "data.patients": 5, "seed": 2})
    assert run_name(a) == "conv·frozen·p5·lr0.0003·s2"
    b = a.replace(seed=7)
    assert config_hash(a.to_flat(), exclude=("seed",)) == config_hash(b.to_flat(), exclude=("seed",))
    assert config_hash(a.to_flat()) != config_hash(b.to_flat())
    assert run_name(Config().replace(**{"data.fraction": 0.25})).endswith("f0.25·lr0.0003·s0")


def test_modes_equal_their_strings():
    assert MODES == ("frozen", "finetune", "lora") and Mode("lora") is Mode.LORA
    assert Mode.FROZEN == "frozen" and f"{Mode.FINETUNE}" == "finetune" and str(Mode.LORA) == "lora"


@pytest.mark.parametrize(
    "mode,backbone,frozen",
    [("frozen", "tiny", True), ("frozen", "none", False), ("finetune", "tiny", False), ("lora", "dinov2-small", False)],
)
def test_frozen_backbone_is_one_definition_for_a_section_or_a_flat_view(mode, backbone, frozen):
    assert frozen_backbone(ModelConfig(mode=mode, backbone=backbone)) is frozen
    assert frozen_backbone({"model.mode": mode, "model.backbone": backbone}) is frozen
    assert frozen_backbone(Config().replace(**{"model.mode": mode, "model.backbone": backbone}).to_flat()) is frozen
