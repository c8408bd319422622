"""The flat dotted config: round trips, typed parsing, and one clear error per bad key."""

from __future__ import annotations

import pytest

from lasegseg.config import (
    Config,
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
        ({"eval.nsd_tolerance_mm": "2mm"}, "'eval.nsd_tolerance_mm' expects float"),
        ({"eval.nsd_tol": 2.0}, "unknown config key 'eval.nsd_tol'"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(flat, needle):
    with pytest.raises(ConfigError) as info:
        from_flat(flat)
    assert needle in str(info.value)


def test_building_a_config_checks_its_values_unless_told_not_to():
    """from_flat runs config_checks.validate_config (the values, and every model rule the config alone tells); a
    config read back (a finished trial's params) may skip it."""
    with pytest.raises(ConfigError, match="config key 'optim.lr' must be > 0"):
        from_flat({"optim.lr": 0.0})
    with pytest.raises(ConfigError, match="config key 'model.backbone' must be 'none' for model.decoder=unet"):
        from_flat({"model.decoder": "unet"})
    with pytest.raises(ConfigError, match="config key 'model.decoder' must be one of"):
        Config().replace(**{"model.decoder": "segformer"})
    assert from_flat({"optim.lr": 0.0, "model.decoder": "unet"}, validate=False).model.decoder == "unet"


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


@pytest.mark.parametrize(
    "mode,backbone,frozen",
    [("frozen", "tiny", True), ("frozen", "none", False), ("finetune", "tiny", False), ("lora", "dinov2-small", False)],
)
def test_frozen_backbone_is_one_definition_for_a_section_or_a_flat_view(mode, backbone, frozen):
    assert frozen_backbone(ModelConfig(mode=mode, backbone=backbone)) is frozen
    assert frozen_backbone({"model.mode": mode, "model.backbone": backbone}) is frozen
    decoder = "unet" if backbone == "none" else "multiscale"
    flat = Config().replace(**{"model.mode": mode, "model.backbone": backbone, "model.decoder": decoder}).to_flat()
    assert frozen_backbone(flat) is frozen
