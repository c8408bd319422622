"""Aggregation over seeds of a fake sweep written to a sqlite MLflow store exactly as the sweep writes it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lasegseg.config import Config
from lasegseg.results.aggregate import aggregate, summarize, write_summary
from lasegseg.results.tables import format_table
from lasegseg.results.trials import load_trials
from tests.results.conftest import DECODERS, EXPERIMENT, MODES, N_TRAIN, PATIENTS, SEEDS


def test_summary_statistics(store, trials):
    summary = summarize(trials)
    assert len(summary) == len(DECODERS) * len(MODES) * len(PATIENTS)
    assert (summary["n"] == len(SEEDS)).all() and (summary["seeds"] == "0,1,2").all()
    assert summary["cell"].is_unique
    assert list(summary["val_dice_mean"]) == sorted(summary["val_dice_mean"], reverse=True)
    assert summary["n_train_patients"].eq(N_TRAIN).all()
    for _, row in summary.iterrows():
        known = store["known"][(row["model.decoder"], row["model.mode"], row["data.patients"])]
        for metric, key in (
            ("test_dice_mean", "dice"),
            ("test_iou_mean", "iou"),
            ("test_nsd_mean", "nsd"),
            ("val_dice", "val"),
        ):
            values = np.array(known[key])
            assert row[f"{metric}_mean"] == pytest.approx(values.mean())
            assert row[f"{metric}_std"] == pytest.approx(values.std(ddof=1))
            half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
            assert row[f"{metric}_ci95_low"] == pytest.approx(values.mean() - half)
            assert row[f"{metric}_ci95_low"] < row[f"{metric}_mean"] < row[f"{metric}_ci95_high"]
        assert row["test_hd95_mean_mean"] == pytest.approx(6.0)  # seeds 0..2 → 5, 6, 7
        assert row["test_hd95_n_undefined_sum"] == 3  # 0 + 1 + 2 cases without an HD95
        assert row["eval.nsd_tolerance_mm"] == 2.0
        # The FAILED trial (val_dice 0.99, seed 3) never enters a cell.
        assert row["val_dice_mean"] < 0.96


def test_summary_single_seed_and_missing_config_values():
    base = Config().to_flat()
    rows = [
        {**base, "seed": 0, "test_dice_mean": 0.8, "test_iou_mean": 0.7, "val_dice": 0.8, "test_hd95_mean": 3.0},
        {**base, "seed": 0, "test_dice_mean": 0.6, "test_iou_mean": 0.5, "val_dice": 0.6, "test_hd95_mean": 3.0},
    ]
    rows[1]["model.decoder_width"] = None  # a key an older run did not log
    summary = summarize(pd.DataFrame(rows))
    assert len(summary) == 2 and (summary["n"] == 1).all()
    assert summary["test_dice_mean_std"].isna().all() and summary["test_dice_mean_ci95_low"].isna().all()
    assert summary["model.decoder_width"].isna().sum() == 1
    assert "model.decoder_width" in format_table(summary)  # a varying key is shown


def test_write_summary_round_trip(tmp_path, trials):
    summary = summarize(trials)
    paths = write_summary(summary, trials, tmp_path)
    assert {"summary_parquet", "summary_csv", "summary_md", "trials_csv"} <= set(paths)
    back = pd.read_parquet(paths["summary_parquet"])
    pd.testing.assert_frame_equal(back, summary)
    csv = pd.read_csv(paths["summary_csv"], keep_default_na=False, na_values=[""])
    np.testing.assert_allclose(csv["test_dice_mean_mean"], summary["test_dice_mean_mean"])
    assert list(csv["cell"]) == list(summary["cell"])
    assert len(pd.read_csv(paths["trials_csv"])) == len(trials)
    md = paths["summary_md"].read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + len(summary)
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:7] == ["decoder", "mode", "backbone", "patients", "fraction", "lr", "n"]
    assert {"Dice mean ± std", "IoU mean ± std", "NSD mean ± std"} <= set(header) and "±" in table[2]
    nsd = table[2].split("|")[1 + header.index("NSD mean ± std")].strip()
    assert nsd == f"{summary['test_nsd_mean_mean'].iloc[0]:.3f} ± {summary['test_nsd_mean_std'].iloc[0]:.3f}"
    assert not list(tmp_path.glob(".*.tmp"))


def test_aggregate_logs_to_latest_parent(tmp_path, store):
    from mlflow import MlflowClient

    summary = aggregate(store["uri"], EXPERIMENT, tmp_path / "out", parent_run_id=store["parent"])
    assert (tmp_path / "out" / "summary.md").is_file()
    client = MlflowClient(store["uri"])
    logged = {a.path for a in client.list_artifacts(store["parent"], "summary")}
    assert {"summary/summary.parquet", "summary/summary.md", "summary/fewshot_patients_dice.png"} <= logged
    run = client.get_run(store["parent"])
    assert run.data.metrics["best_test_dice_mean"] == pytest.approx(summary["test_dice_mean_mean"].iloc[0])
    assert run.data.tags["lasegseg.best_cell"] == summary["cell"].iloc[0]

    # Without a parent id: every trial of the experiment, logged to the most recent sweep run.
    summary = aggregate(store["uri"], EXPERIMENT, tmp_path / "all")
    assert "conv" in set(summary["model.decoder"])
    assert client.get_run(store["parent"]).data.metrics["best_val_dice"] == pytest.approx(
        summary["val_dice_mean"].iloc[0]
    )
    assert not client.list_artifacts(store["old_parent"])


def test_runs_from_before_nsd_keep_their_own_cell(store, trials):
    everything = load_trials(store["uri"], EXPERIMENT)
    old = everything[everything["model.decoder"] == "conv"]
    assert old["eval.nsd_tolerance_mm"].isna().all() and old["test_nsd_mean"].isna().all()
    assert trials["eval.nsd_tolerance_mm"].eq(2.0).all()  # never filled with today's default
    summary = summarize(everything)
    row = summary[summary["model.decoder"] == "conv"].iloc[0]
    assert row["n"] == 2 and row["cell"] == old["cell"].iloc[0]
    assert math.isnan(row["test_nsd_mean_mean"]) and math.isnan(row["test_hd95_n_undefined_sum"])
    assert row["test_hd95_mean_mean"] == pytest.approx(4.0)
    shown = format_table(summary, max_rows=len(summary)).splitlines()
    assert "eval.nsd_tolerance_mm" in shown[0]  # it varies between these cells
    conv = next(line for line in shown if line.startswith("conv"))
    assert "–" in conv
