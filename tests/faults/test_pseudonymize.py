"""``--pseudonymize``: patient ids taken from file names appear nowhere in a run's outputs, only their aliases;
the results are otherwise those of the plain run, and the local key maps the aliases back."""

from __future__ import annotations

import csv
import json
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults


def _train(phantom_dir: Path, out: Path, *extra: str) -> dict:
    from lasegseg.cli import main

    argv = ["train", str(phantom_dir), "--out", str(out), "--decoder", "linear", "--mode", "frozen",
            "--image-size", "28", "--epochs", "1", "--quiet", *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def _case_ids(phantom_dir: Path) -> list[str]:
    return sorted(p.name.removesuffix(".nii.gz") for p in (phantom_dir / "imagesTr").glob("*.nii.gz"))


def test_train_outputs_carry_aliases_only(phantom_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("LASEGSEG_PSEUDONYM_SALT", raising=False)
    plain = _train(phantom_dir, tmp_path / "plain")
    private = _train(phantom_dir, tmp_path / "private", "--pseudonymize")
    ids = _case_ids(phantom_dir)

    published = [p for p in (tmp_path / "private").rglob("*") if p.is_file() and p.suffix in (".json", ".csv")]
    published = [p for p in published if p.name != "pseudonyms.csv"]
    assert {p.name for p in published} >= {"metrics.json", "per_patient.csv", "config.json"}
    for path in published:
        text = path.read_text()
        assert not [i for i in ids if i in text], f"{path} names a patient"

    with open(tmp_path / "private" / "pseudonyms.csv", newline="") as fh:
        key = {r["alias"]: r["case_id"] for r in csv.DictReader(fh)}
    assert sorted(key.values()) == ids
    assert stat.S_IMODE((tmp_path / "private" / "pseudonyms.csv").stat().st_mode) == 0o600
    # Same split and numbers as the plain run, with every id replaced by its alias.
    assert {k: [key[a] for a in v] for k, v in private["split"].items()} == plain["split"]
    assert [key[r["case_id"]] for r in private["per_patient"]] == [r["case_id"] for r in plain["per_patient"]]
    assert private["test_dice_mean"] == pytest.approx(plain["test_dice_mean"])

    again = _train(phantom_dir, tmp_path / "private", "--pseudonymize")  # same folder → same salt → same aliases
    assert again["split"] == private["split"]
