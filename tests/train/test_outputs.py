"""What a finished trial leaves in its folder, and its results with case ids pseudonymised."""

from __future__ import annotations

import csv
import json

from lasegseg.config import Config
from lasegseg.models.segmenter import build_segmenter
from lasegseg.train.metrics import metric_names
from lasegseg.train.outputs import pseudonymize_results, write_outputs


def _results() -> dict:
    row = {"case_id": "a", "split": "test", "dice": 0.9, "iou": 0.8, "nsd": 0.7, "hd95": 1.5, "slice_dice": 0.6}
    return {
        "val_dice": 0.5,
        "per_patient": [row, {**row, "case_id": "b", "dice": 0.4}],
        "split": {"train": ["c"], "val": ["d"], "test": ["a", "b"]},
    }


def _alias(case_id: str) -> str:
    return f"P-{case_id}"


def test_pseudonymised_results_name_every_case_by_its_alias():
    results = _results()
    out = pseudonymize_results(results, _alias)
    assert [row["case_id"] for row in out["per_patient"]] == ["P-a", "P-b"]
    assert [row["dice"] for row in out["per_patient"]] == [0.9, 0.4]
    assert out["split"] == {"train": ["P-c"], "val": ["P-d"], "test": ["P-a", "P-b"]}
    assert out["val_dice"] == 0.5 and results == _results()  # the trial's own results are left as they were
    assert pseudonymize_results(results, None) is results


def test_a_trials_folder_holds_its_model_metrics_and_per_patient_table_under_aliases(tmp_path):
    cfg = Config().replace(**{"model.mode": "frozen", "model.decoder": "linear", "data.image_size": 28})
    out = tmp_path / "run"
    write_outputs(out, build_segmenter(cfg.model), cfg, _results(), alias=_alias)
    with (out / "per_patient.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["case_id", "split", *metric_names()]
    assert [row["case_id"] for row in table] == ["P-a", "P-b"] and float(table[1]["dice"]) == 0.4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"] == cfg.to_flat() and metrics["split"]["test"] == ["P-a", "P-b"]
    assert json.loads((out / "model" / "config.json").read_text())["val_dice"] == 0.5
    assert (out / "model" / "model.safetensors").is_file()
    assert not (out / "overlays.png").exists()  # no cache given: no figure to draw
