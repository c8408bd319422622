"""data.image_size against the backbone's own patch size: refused before any data is read or any trial starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lasegseg.config import from_flat
from lasegseg.config_checks import backbone_patch_size
from lasegseg.errors import ConfigError

D3_56 = (
    "config key 'data.image_size' must be a positive multiple of the patch size 16 of backbone 'tiny-dinov3' "
    "(DINOv3), got 56; 48 or 64 would do"
)


@pytest.mark.parametrize(
    ("backbone", "size", "ok"),
    [
        ("tiny-dinov3", 64, True),
        ("dinov3-large", 448, True),
        ("dinov2-large", 448, True),
        ("tiny", 56, True),
        ("tiny-dinov3", 56, False),
        ("dinov3-7b", 518, False),
        ("tiny", 64, False),
        ("none", 50, True),  # the UNet baseline pads to its own stride
        ("org/some-hub-model", 50, True),  # not known without the hub: the loader decides
    ],
)
def test_image_size_must_fit_the_backbone_patch(backbone: str, size: int, ok: bool) -> None:
    decoder = "unet" if backbone == "none" else "conv"  # the UNet baseline is the one decoder without backbone
    flat = {"model.backbone": backbone, "data.image_size": size, "model.decoder": decoder}
    if ok:
        assert from_flat(flat).data.image_size == size
    else:
        with pytest.raises(ConfigError, match=r"config key 'data.image_size' must be a positive multiple of"):
            from_flat(flat)


def test_the_message_names_key_backbone_patch_and_sizes_that_fit() -> None:
    with pytest.raises(ConfigError) as err:
        from_flat({"model.backbone": "tiny-dinov3", "data.image_size": 56})
    assert str(err.value) == D3_56


def test_a_local_folder_is_checked_against_its_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov3_vit", "patch_size": 16}))
    assert backbone_patch_size(str(tmp_path)) == (16, f"patch_size in {tmp_path / 'config.json'}")
    with pytest.raises(ConfigError, match=r"patch size 16 of backbone .* \(patch_size in .*config.json\), got 70"):
        from_flat({"model.backbone": str(tmp_path), "data.image_size": 70})
    assert backbone_patch_size(str(tmp_path / "missing")) is None


def test_lasegseg_train_refuses_in_one_line_before_reading_data(phantom_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lasegseg.cli", "train", str(phantom_dir), "--backbone", "tiny-dinov3",
           "--image-size", "56", "--epochs", "1", "--out", str(out), "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"lasegseg train: error: {D3_56}"
    assert not out.exists()


def test_a_sweep_refuses_a_trial_before_anything_starts(tmp_path: Path, capsys) -> None:
    from lasegseg.sweep.runner import main

    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        "name: d3\nbase: {data.image_size: 56, train.epochs: 1}\n"
        "grid: {model.backbone: [tiny, tiny-dinov3], model.decoder: [linear]}\n"
    )
    code = main(["--config", str(spec), "--storage-path", str(tmp_path / "runs"), "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "trial {'model.backbone': 'tiny-dinov3', 'model.decoder': 'linear'}" in err[0] and D3_56 in err[0]
    assert not (tmp_path / "runs").exists()
