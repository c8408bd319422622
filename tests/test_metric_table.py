"""The metric table: its entries and derived names, and a metric added in one place reaching every reader.

The last test is the table's promise: one :class:`Metric` entry plus its function, and real trials score it, MLflow
tracks it, and the summary, the paired comparison, the report and the command line's ``--metric`` help show it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lasegseg import metric_table
from lasegseg.cli import build_parser
from lasegseg.config import Config, run_name
from lasegseg.errors import ConfigError
from lasegseg.export.report import write_report
from lasegseg.metric_table import METRICS, Metric
from lasegseg.results.aggregate import aggregate
from lasegseg.results.compare import compare
from lasegseg.results.tables import format_table
from lasegseg.tracking.store import ensure_experiment, start_parent
from lasegseg.tracking.tracker import TrialTracker, final_metrics
from lasegseg.train.metrics import case_metric, case_metrics, remove_case_metric, summarize
from lasegseg.train.trial import run_trial
from lasegseg.train.trial_data import prepare_data

NAN = math.nan


def test_the_table_holds_the_tracked_metrics_in_order():
    assert [m.name for m in metric_table.metrics()] == ["dice", "iou", "nsd", "hd95", "slice_dice"]
    assert [m.name for m in metric_table.summarised()] == ["dice", "iou", "nsd", "hd95"]
    assert metric_table.primary().name == "dice" and metric_table.selection_metrics() == ["val_dice", "val_iou"]
    assert metric_table.epoch_metrics() == ["train_loss", "val_dice", "val_iou", "lr"]
    hd95 = metric_table.metric("hd95")
    assert not hd95.higher_is_better and not hd95.bounded and hd95.label() == "HD95 (mm)"
    assert (hd95.test_mean, hd95.n_undefined, hd95.format(3.14159), hd95.format(NAN)) == (
        "test_hd95_mean", "test_hd95_n_undefined", "3.14", "–",
    )  # fmt: skip


def test_a_trial_tracks_the_names_it_always_tracked():
    assert metric_table.trial_metrics() == [
        "test_dice_mean", "test_dice_std", "test_iou_mean", "test_iou_std", "test_nsd_mean", "test_nsd_std",
        "test_hd95_mean", "test_hd95_std", "test_hd95_n_undefined", "test_slice_dice_mean", "test_slice_dice_std",
    ]  # fmt: skip
    final = final_metrics({"val_dice": 0.8, "val_iou": 0.7, "test_dice_mean": 0.75, "best_epoch": 2})
    assert {k: v for k, v in final.items() if v is not None} == {
        "best_epoch": 2, "test_dice_mean": 0.75, "best_val_dice": 0.8, "best_val_iou": 0.7,
    }  # fmt: skip


def test_unknown_names_and_bad_entries_are_refused():
    with pytest.raises(ConfigError, match=r"unknown metric 'dsc' \(valid metrics: dice, hd95, iou, nsd, slice_dice\)"):
        metric_table.metric("dsc")
    with pytest.raises(ValueError, match="lower-case identifier"):
        Metric("Vol-Err", "x")
    with pytest.raises(ValueError, match="higher must be better"):
        Metric("hd", "HD", higher_is_better=False, validation=True)
    with pytest.raises(ValueError, match="over_seeds"):
        Metric("x", "x", over_seeds="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        metric_table.add_metric(Metric("dice", "Dice again"))
    with pytest.raises(ValueError, match="not declared in the table"):
        case_metric("undeclared")(lambda case: 0.0)


@pytest.mark.parametrize(
    "pred,ref,expected",
    [
        (np.zeros((4, 4, 2), bool), np.zeros((4, 4, 2), bool), {"dice": 1, "iou": 1, "nsd": 1, "hd95": 0}),
        (np.ones((4, 4, 2), bool), np.zeros((4, 4, 2), bool), {"dice": 0, "iou": 0, "nsd": 0, "hd95": NAN}),
        (np.zeros((4, 4, 2), bool), np.ones((4, 4, 2), bool), {"dice": 0, "iou": 0, "nsd": 0, "hd95": NAN}),
    ],
)
def test_empty_masks_take_the_tables_values(pred, ref, expected):
    got = case_metrics(pred, ref, nsd_tolerance_mm=2.0)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, nan_ok=True), name


# ------------------------------------------------------------------------------------------- a metric added once


@pytest.fixture
def volume_error():
    """A throwaway metric: the absolute difference of the two masks' voxel counts (lower is better; an empty
    mask is no special case, except two, which agree)."""
    entry = metric_table.add_metric(
        Metric("vol_err", "Volume error", higher_is_better=False, high=math.inf, fmt=".1f", unit="voxels",
               empty_both=0.0, empty_pred=None, empty_ref=None, dots=True)
    )  # fmt: skip
    case_metric("vol_err")(lambda case: float(abs(int(case.pred.sum()) - int(case.ref.sum()))))
    yield entry
    remove_case_metric("vol_err")
    METRICS.remove("vol_err")


def test_the_new_metric_is_scored_with_its_empty_rule(volume_error):
    pred, ref = np.zeros((6, 6, 3), bool), np.zeros((6, 6, 3), bool)
    pred[1:4, 1:4, 1], ref[1:5, 1:4, 1] = True, True
    assert case_metrics(pred, ref, nsd_tolerance_mm=2.0)["vol_err"] == 3.0
    assert case_metrics(pred, np.zeros_like(ref), nsd_tolerance_mm=2.0)["vol_err"] == 9.0  # no rule: computed
    assert case_metrics(np.zeros_like(pred), np.zeros_like(ref), nsd_tolerance_mm=2.0)["vol_err"] == 0.0
    summary = summarize([{"vol_err": 3.0}, {"vol_err": 5.0}, {"vol_err": NAN}], "test")
    assert (summary["test_vol_err_mean"], summary["test_vol_err_std"]) == (4.0, 1.0)


def test_a_metric_added_in_one_place_reaches_tracking_summary_comparison_and_report(
    volume_error, phantom_dir, tmp_path, capsys
):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = "added-metric"
    exp_id = ensure_experiment(uri, experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    parent = start_parent(uri, exp_id, "sweep", {"sweep.name": experiment}, {"lasegseg.sweep": experiment})
    base = {"data.path": str(phantom_dir), "data.image_size": 28, "train.epochs": 1, "model.mode": "finetune"}
    data = None
    for decoder in ("linear", "conv"):
        for seed in (0, 1):
            cfg = Config().replace(**{**base, "model.decoder": decoder, "seed": seed})
            data = prepare_data(cfg, data.cache if data else None)
            out = tmp_path / f"{decoder}-{seed}"
            results = run_trial(cfg, out, data=data)
            assert "vol_err" in pd.read_csv(out / "per_patient.csv").columns
            assert math.isfinite(results["test_vol_err_mean"])
            tracker = TrialTracker(uri, exp_id, parent, f"{decoder}-{seed}", run_name(cfg), cfg.to_flat())
            tracker.start()
            tracker.finish(results, artifact_dir=out)

    summary = aggregate(uri, experiment, tmp_path / "summary", parent_run_id=parent, log_to_parent=False)
    assert summary["test_vol_err_mean_mean"].notna().all() and summary["test_vol_err_mean_ci95_low"].notna().all()
    assert "Volume error mean ± std" in format_table(summary)

    table, notes = compare(uri, experiment, tmp_path / "summary", parent, metric="vol_err", resamples=50,
                           log_to_parent=False)  # fmt: skip
    assert table["lower_is_better"].all() and (tmp_path / "summary" / "comparison_vol_err.parquet").is_file()
    assert "lower is better, so Δ < 0 favours the cell" in "\n".join(notes)

    page = write_report(uri, experiment, tmp_path / "report.html", parent_run_id=parent, log_to_parent=False)
    html = page.read_text()
    assert "Volume error mean ± std" in html and "Volume error 95% CI" in html
    assert "Test Volume error per patient, per cell" in html

    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--help"])
    assert "vol_err" in capsys.readouterr().out
