"""Damaged caches on disk — the slice cache and the frozen-feature cache, truncated or altered in place — are
found by their content hashes and rebuilt; a training run never reads them silently."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults


def _train(phantom_dir: Path, out: Path) -> dict:
    from lasegseg.cli import main

    argv = ["train", str(phantom_dir), "--out", str(out), "--backbone", "tiny", "--decoder", "linear", "--mode",
            "frozen", "--image-size", "28", "--epochs", "2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # flip one byte in the middle: same size, so only a content hash can tell
        data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "alter"])
def test_damaged_slice_and_feature_caches_are_rebuilt_not_used(phantom_dir, tmp_path, monkeypatch, caplog, how):
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path / "cache"))
    first = _train(phantom_dir, tmp_path / "run1")
    slices = sorted((tmp_path / "cache").rglob("slices.arrow"))
    levels = sorted((tmp_path / "cache").rglob("level_*.npy"))
    assert len(slices) == 1 and levels, "the frozen run should have built both caches"
    _damage(slices[0], how)
    _damage(levels[-1], how)

    with caplog.at_level(logging.WARNING):
        second = _train(phantom_dir, tmp_path / "run2")
    assert "slices.arrow" in caplog.text  # both damages were reported …
    assert levels[-1].name in caplog.text
    # … and both caches rebuilt, so the run is the undamaged one.
    for key in ("test_dice_mean", "test_iou_mean", "val_dice"):
        assert second[key] == pytest.approx(first[key], abs=1e-6), key
    assert [h["train_loss"] for h in second["history"]] == pytest.approx([h["train_loss"] for h in first["history"]])
