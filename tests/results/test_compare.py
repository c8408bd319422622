"""Paired statistics between sweep cells: the numbers against SciPy/numpy, and end to end from a sqlite MLflow store."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lasegseg import stats
from lasegseg.cli import main
from lasegseg.errors import LasegsegError
from lasegseg.results.compare import baseline_groups, compare, compare_cells, compare_groups, pick_reference
from lasegseg.results.comparison_tables import comparison_notes, format_table
from tests.results.conftest import N_PATIENTS
from tests.results.conftest import PATIENT_CELLS as CELLS
from tests.results.conftest import PATIENTS_EXPERIMENT as EXPERIMENT

# --------------------------------------------------------------------------------------------------- comparing

REF = np.array([0.80, 0.75, 0.90, 0.60, 0.85, 0.70, 0.82, 0.78])


def _summary(cells: list[str], val: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"model.decoder": cells, "cell": cells, "n": 2, "val_dice_mean": val})


def test_compare_cells_table_holm_and_notes():
    rng = np.random.default_rng(2)
    patients = [f"p{i}" for i in range(5)]  # fewer than 6: no comparison can reach p < 0.05
    matrix = pd.DataFrame(
        {"ref": REF[:5], "a": REF[:5] + rng.uniform(0.01, 0.05, 5), "b": REF[:5], "c": REF[:5] - 0.1}, index=patients
    )
    summary = _summary(["ref", "a", "b", "c"], [0.9, 0.8, 0.7, 0.6])
    table = compare_cells(matrix, summary, "ref", metric="dice", resamples=1000, seed=0)
    assert list(table["cell"]) == ["ref", "a", "b", "c"] and table["reference"].eq("ref").all()
    assert table["p"].isna().iloc[0] and table.loc[table["cell"] == "b", "p"].item() == 1.0
    np.testing.assert_allclose(table["p_holm"].iloc[1:], stats.holm(table["p"].iloc[1:]))
    assert table.loc[table["cell"] == "a", ["wins", "ties", "losses"]].values.tolist() == [[5, 0, 0]]
    assert table.loc[table["cell"] == "c", ["wins", "ties", "losses"]].values.tolist() == [[0, 0, 5]]
    assert table["small_sample"].iloc[1:].all() and table["p_first"].sum() == pytest.approx(1.0)
    notes = comparison_notes(table, "best mean validation Dice", resamples=1000, seed=0, tie=1e-6)
    text = "\n".join(notes)
    assert "fewer than 6 paired patients" in text and "0.0625" in text and "Holm" in text
    assert "never on test" in text and "Δ > 0 favours the cell" in text and "Kendall τ" in text
    printed = format_table(table, notes)
    assert "reference" in printed and "5/0/0" in printed and "0.0625†" in printed

    hd = compare_cells(matrix * 10, summary, "ref", metric="hd95", resamples=100)
    assert hd.loc[hd["cell"] == "c", "wins"].item() == 5 and hd["lower_is_better"].all()
    assert "Δ < 0 favours the cell" in "\n".join(comparison_notes(hd, resamples=100, seed=0, tie=1e-6))


def test_pick_reference_choices():
    summary = pd.DataFrame(
        {
            "model.backbone": ["tiny", "none", "tiny"],
            "cell": ["aaaa1111", "bbbb2222", "aaab3333"],
            "n": 2,
            "val_dice_mean": [0.9, 0.8, 0.7],
        }
    )
    trials = pd.DataFrame(
        {"run_id": ["r1", "r2"], "run_name": ["linear·p2·s0", "unet·p2·s0"], "cell": ["aaab3333"] * 2}
    )
    assert pick_reference(summary, trials, "best")[0] == "aaaa1111"
    assert pick_reference(summary, trials, "baseline") == ("bbbb2222", "the baseline (model.backbone=none)")
    assert pick_reference(summary, trials, "bbbb")[0] == "bbbb2222"
    assert pick_reference(summary, trials, "unet·p2·s0")[0] == "aaab3333"
    with pytest.raises(LasegsegError, match="matches 2 cells"):
        pick_reference(summary, trials, "aaa")
    with pytest.raises(LasegsegError, match="zzz: not best, baseline"):
        pick_reference(summary, trials, "zzz")
    with pytest.raises(LasegsegError, match="exactly one cell with model.backbone=none"):
        pick_reference(summary.assign(**{"model.backbone": "tiny"}), trials, "baseline")


def test_baseline_per_few_shot_size_and_holm_across_all_comparisons():
    summary = pd.DataFrame(
        {
            "model.backbone": ["tiny", "none", "tiny", "none"],
            "data.patients": [2, 2, 4, 4],
            "data.fraction": 1.0,
            "cell": ["t2", "b2", "t4", "b4"],
            "n": 2,
            "val_dice_mean": [0.9, 0.8, 0.95, 0.85],
        }
    )
    groups = baseline_groups(summary)
    assert groups == [("b2", ["t2", "b2"]), ("b4", ["t4", "b4"])]
    assert baseline_groups(summary.iloc[:2]) is None  # one baseline: the plain --against baseline
    rng = np.random.default_rng(3)
    matrix = pd.DataFrame(rng.uniform(0.5, 0.9, (8, 4)), columns=["t2", "b2", "t4", "b4"])
    matrix["t2"] += 0.05
    table = compare_groups(matrix, summary, groups, metric="dice", resamples=200, seed=0, tie=1e-6)
    assert list(table["cell"]) == ["b2", "t2", "b4", "t4"] and list(table["reference"]) == ["b2", "b2", "b4", "b4"]
    t2 = stats.paired_comparison(matrix["t2"].to_numpy(), matrix["b2"].to_numpy(), resamples=200, seed=0)
    t4 = stats.paired_comparison(matrix["t4"].to_numpy(), matrix["b4"].to_numpy(), resamples=200, seed=0)
    assert table["p"].iloc[[1, 3]].tolist() == pytest.approx([t2.p, t4.p])
    assert table["p_holm"].iloc[[1, 3]].tolist() == pytest.approx(list(stats.holm([t2.p, t4.p])))
    notes = "\n".join(comparison_notes(table, "for each few-shot size", resamples=200, seed=0, tie=1e-6))
    assert "only with the baseline of its own few-shot size" in notes and "among the cells of its own" in notes
    with pytest.raises(LasegsegError, match="2 baseline cells share a few-shot size"):
        baseline_groups(summary.assign(**{"data.patients": 2}))


# --------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def store(patients_store):
    return patients_store


def _cell_of(truth, decoder):
    return next(c for c, t in truth.items() if t["decoder"] == decoder)


def test_compare_end_to_end(store, tmp_path, caplog):
    truth, uri = store["truth"], store["uri"]
    with caplog.at_level(logging.WARNING, logger="lasegseg.results.compare"):
        table, notes = compare(uri, EXPERIMENT, tmp_path, parent_run_id=store["parent"], resamples=2000, seed=5)
    assert "1 of 9 finished trial run(s) have no readable per_patient.csv" in caplog.text
    ref = _cell_of(truth, "linear")
    best_test = max(truth, key=lambda c: truth[c]["dice"].mean())
    assert best_test == _cell_of(truth, "multiscale") != ref  # higher test Dice, lower validation Dice
    assert table["reference"].eq(ref).all() and table["cell"].iloc[0] == ref
    assert list(table["cell"]) == sorted(truth, key=lambda c: -truth[c]["val"])
    for _, row in table.iloc[1:].iterrows():
        expected = stats.paired_comparison(truth[row["cell"]]["dice"], truth[ref]["dice"], resamples=2000, seed=5)
        assert row["n_pairs"] == N_PATIENTS and row["median_diff"] == pytest.approx(expected.median_diff)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((expected.ci_low, expected.ci_high))
        assert row["p"] == pytest.approx(expected.p) and row["mean"] == pytest.approx(truth[row["cell"]]["dice"].mean())
        assert row["model.backbone"] == ("none" if truth[row["cell"]]["decoder"] == "unet" else "tiny")
    np.testing.assert_allclose(table["p_holm"].iloc[1:], stats.holm(table["p"].iloc[1:]))
    assert table.set_index("cell").loc[best_test, "wins"] == N_PATIENTS
    assert table.set_index("cell").loc[best_test, "p_first"] == 1.0
    assert any("left out" in n for n in notes) and not table["small_sample"].iloc[1:].any()

    back = pd.read_parquet(tmp_path / "comparison.parquet")
    pd.testing.assert_frame_equal(back, table)
    md = (tmp_path / "comparison.md").read_text()
    assert md.count("\n|") == 2 + len(CELLS) and "never on test" in md and "Holm" in md
    logged = {a.path for a in store["client"].list_artifacts(store["parent"], "summary")}
    assert {"summary/comparison.parquet", "summary/comparison.md"} <= logged


def test_reference_choices_and_hd95_end_to_end(store, tmp_path):
    truth = store["truth"]
    table, notes = compare(
        store["uri"], EXPERIMENT, tmp_path, store["parent"], metric="hd95", against="baseline", resamples=200,
        log_to_parent=False,
    )  # fmt: skip
    assert table["reference"].iloc[0] == _cell_of(truth, "unet") and table["lower_is_better"].all()
    assert (table["wins"].iloc[1:] == N_PATIENTS).all()  # every DINOv2 cell has the lower HD95 everywhere
    assert (tmp_path / "comparison_hd95.parquet").is_file() and not (tmp_path / "comparison.parquet").exists()
    assert "Δ < 0 favours the cell" in "\n".join(notes)


def test_missing_metric_column_is_a_clear_error(store, tmp_path):
    with pytest.raises(LasegsegError, match=r"no 'nsd' column \(runs from before nsd was recorded\?\).*dice, hd95"):
        compare(store["uri"], EXPERIMENT, tmp_path, store["parent"], metric="nsd", resamples=10, log_to_parent=False)
    assert not list(tmp_path.iterdir())


def test_cli_compare_prints_every_cell(store, tmp_path, capsys):
    args = ["compare", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"], "--parent", store["parent"]]
    assert main([*args, "--out", str(tmp_path), "--resamples", "500", "--seed", "1", "--no-log"]) == 0
    out = capsys.readouterr().out
    table = pd.read_parquet(tmp_path / "comparison.parquet")
    lines = out.splitlines()
    for _, row in table.iloc[1:].iterrows():
        line = next(x for x in lines if row["cell"][:8] in x)
        ci = f"{row['median_diff']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        assert ci in line and f"{row['wins']}/{row['ties']}/{row['losses']}" in line
        for p in (row["p"], row["p_holm"]):
            assert ("<0.0001" if p < 0.0001 else f"{p:.4f}") in line
    assert "reference" in next(x for x in lines if table["cell"].iloc[0][:8] in x)
    assert "Kendall τ" in out and f"comparison: {tmp_path}" in out

    assert main([*args, "--metric", "nsd", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no 'nsd' column" in err and "Traceback" not in err


def test_statistics_import_no_tracking_or_ray():
    code = "import sys, lasegseg.stats, lasegseg.results.compare; print(sorted({'mlflow', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sweep_hook_prints_the_table_and_never_raises(store, tmp_path, capsys):
    from lasegseg.sweep.finish import print_comparison as _compare

    _compare(store["uri"], EXPERIMENT, tmp_path, store["parent"])
    out = capsys.readouterr().out
    assert "Δ median [95% CI]" in out and (tmp_path / "comparison.md").is_file()
    _compare(store["uri"], "nope", tmp_path / "x", store["parent"])
    captured = capsys.readouterr()
    assert captured.err == "comparison: experiment 'nope' not found at " + store["uri"] + "\n" and not captured.out
