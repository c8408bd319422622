"""Aggregation of a fake sweep written to a sqlite MLflow store exactly as the sweep writes it."""

from __future__ import annotations

import itertools
import logging
import math
import socket
import time

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lasegseg.config import Config, config_hash, run_name
from lasegseg.errors import LasegsegError
from lasegseg.results.aggregate import aggregate, format_table, load_trials, summarize, write_summary
from lasegseg.results.plots import plot_all

DECODERS = ("linear", "multiscale")
MODES = ("frozen", "finetune")
PATIENTS = (2, 0)
SEEDS = (0, 1, 2)
N_TRAIN = 12
EXPERIMENT = "fewshot"


def _log_trial(client, exp_id, parent_id, cfg, metrics, status="FINISHED", start_time=None, drop=()):
    """Log a trial run as the sweep does; ``drop``: config keys the run does not log (a run from an older version)."""
    from mlflow.entities import Metric, Param

    flat = {k: v for k, v in cfg.to_flat().items() if k not in drop}
    run = client.create_run(
        exp_id,
        run_name=run_name(cfg),
        start_time=start_time,
        tags={
            "lasegseg.role": "trial",
            "mlflow.parentRunId": parent_id,
            "lasegseg.cell": config_hash(flat, exclude=("seed",)),
        },
    )
    now = int(time.time() * 1000)
    history = [Metric(k, 0.1 * (e + 1), now, e) for e in range(3) for k in ("train_loss", "val_dice", "val_iou")]
    final = [Metric(k, v, now, 3) for k, v in metrics.items()]
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in flat.items()], metrics=history + final)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two sweeps (parents) in one experiment, a FAILED trial, and an experiment without trials.

    The older sweep's trials predate ``eval.nsd_tolerance_mm`` and NSD: they log neither.
    """
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    kind = {"mlflow.experimentKind": "custom_model_development"}
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri(), tags=kind)
    t0 = int(time.time() * 1000)
    old_parent = client.create_run(exp_id, run_name="old", start_time=t0 - 60_000, tags={"lasegseg.role": "sweep"})
    parent = client.create_run(exp_id, run_name="sweep", start_time=t0, tags={"lasegseg.role": "sweep"})
    parent_id = parent.info.run_id

    rng = np.random.default_rng(0)
    known: dict[tuple, dict[str, list[float]]] = {}
    base = Config().replace(**{"data.path": "/data/msd", "model.backbone": "dinov2-small", "optim.lr": 3e-4})
    for dec, mode, patients in itertools.product(DECODERS, MODES, PATIENTS):
        cell = known.setdefault((dec, mode, patients), {"dice": [], "iou": [], "nsd": [], "val": []})
        for seed in SEEDS:
            dice, iou, val = rng.uniform(0.6, 0.9), rng.uniform(0.4, 0.8), rng.uniform(0.5, 0.95)
            nsd = rng.uniform(0.5, 0.9)
            cell["dice"].append(dice)
            cell["iou"].append(iou)
            cell["nsd"].append(nsd)
            cell["val"].append(val)
            cfg = base.replace(**{"model.decoder": dec, "model.mode": mode, "data.patients": patients, "seed": seed})
            metrics = {
                "test_dice_mean": dice,
                "test_dice_std": 0.05,
                "test_iou_mean": iou,
                "test_iou_std": 0.04,
                "test_nsd_mean": nsd,
                "test_nsd_std": 0.03,
                "test_hd95_mean": 5.0 + seed,
                "test_hd95_n_undefined": seed,
                "val_dice": val,
                "val_iou": val - 0.1,
                "n_train_patients": N_TRAIN,
            }
            _log_trial(client, exp_id, parent_id, cfg, metrics)
    failed = base.replace(**{"model.decoder": "linear", "model.mode": "frozen", "data.patients": 2, "seed": 3})
    _log_trial(client, exp_id, parent_id, failed, {"test_dice_mean": 0.0, "val_dice": 0.99}, status="FAILED")
    for seed in (0, 1):
        other = base.replace(**{"model.decoder": "conv", "seed": seed})
        metrics = {"test_dice_mean": 0.5, "val_dice": 0.5, "test_hd95_mean": 4.0}
        _log_trial(client, exp_id, old_parent.info.run_id, other, metrics, drop=("eval.nsd_tolerance_mm",))

    client.create_experiment("empty", artifact_location=(root / "empty").as_uri(), tags=kind)
    empty_id = client.get_experiment_by_name("empty").experiment_id
    client.create_run(empty_id, tags={"lasegseg.role": "sweep"})
    return {"uri": uri, "parent": parent_id, "old_parent": old_parent.info.run_id, "known": known, "root": root}


@pytest.fixture(scope="module")
def trials(store):
    return load_trials(store["uri"], EXPERIMENT, store["parent"])


def test_load_trials_types_and_parent_filter(store, trials):
    assert len(trials) == len(DECODERS) * len(MODES) * len(PATIENTS) * len(SEEDS)
    assert set(trials["status"]) == {"FINISHED"}
    assert set(trials["parent_run_id"]) == {store["parent"]}
    assert "conv" not in set(trials["model.decoder"])
    assert trials["data.fraction"].dtype == np.float64 and trials["data.patients"].dtype == np.int64
    assert trials["optim.lr"].iloc[0] == pytest.approx(3e-4) and trials["model.registers"].dtype == bool
    assert set(trials["data.patients"]) == set(PATIENTS) and set(trials["data.cache_dir"]) == {""}
    assert trials.attrs["skipped"] == {"FAILED": 1}
    # The cell column matches the tag the sweep wrote.
    flat = Config().replace(**trials.iloc[0][list(Config().to_flat())].to_dict()).to_flat()
    assert trials["cell"].iloc[0] == config_hash(flat, exclude=("seed",))

    everything = load_trials(store["uri"], EXPERIMENT)
    assert len(everything) == len(trials) + 2 and "conv" in set(everything["model.decoder"])


def test_load_trials_paginates(store, trials, monkeypatch):
    import lasegseg.results.aggregate as agg

    monkeypatch.setattr(agg, "_PAGE_SIZE", 5)
    paged = load_trials(store["uri"], EXPERIMENT, store["parent"])
    assert sorted(paged["run_id"]) == sorted(trials["run_id"])


def test_failed_trials_are_noted(store, caplog):
    with caplog.at_level(logging.WARNING, logger="lasegseg.results.aggregate"):
        load_trials(store["uri"], EXPERIMENT, store["parent"])
    assert "1 FAILED" in caplog.text


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


def test_plots_are_real_pngs(tmp_path, trials):
    summary = summarize(trials)
    paths = plot_all(summary, tmp_path)
    names = sorted(p.name for p in paths)
    # Only the patient axis varies in this sweep (2 patients and all 12).
    assert names == ["fewshot_patients_dice.png", "fewshot_patients_iou.png"]
    for path in paths:
        assert path.stat().st_size > 20_000
        img = mpimg.imread(path)
        assert img.shape[:2] == (750, 1200)
        assert img[..., :3].std() > 0.05  # not blank


def test_fraction_axis_plot(tmp_path):
    base = Config().to_flat()
    rows = []
    for dec, frac, seed in itertools.product(("linear", "unet"), (0.1, 0.25, 0.5, 1.0), (0, 1)):
        dice = 0.5 + 0.3 * frac + 0.02 * seed + (0.05 if dec == "unet" else 0)
        rows.append(
            {
                **base,
                "model.decoder": dec,
                "data.fraction": frac,
                "seed": seed,
                "test_dice_mean": dice,
                "test_iou_mean": dice - 0.1,
                "val_dice": dice,
                "test_hd95_mean": 4.0,
            }
        )
    summary = summarize(pd.DataFrame(rows))
    paths = plot_all(summary, tmp_path)
    assert sorted(p.name for p in paths) == ["fewshot_fraction_dice.png", "fewshot_fraction_iou.png"]
    assert mpimg.imread(paths[0]).shape[:2] == (750, 1200)


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


def test_format_table(trials):
    summary = summarize(trials)
    text = format_table(summary, max_rows=3)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["decoder", "mode", "backbone"] and "NSD mean ± std" in lines[0]
    assert len(lines) == 2 + 3 + 1 and lines[-1].startswith("… 5 more")
    assert "all" in text or "2" in text


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


def test_unknown_and_empty_experiments(store):
    with pytest.raises(LasegsegError, match="experiment 'nope' not found"):
        load_trials(store["uri"], "nope")
    with pytest.raises(LasegsegError, match="no finished trial runs"):
        load_trials(store["uri"], "empty")


def test_unreachable_stores_fail_fast(tmp_path):
    with pytest.raises(LasegsegError, match="no MLflow database"):
        load_trials(f"sqlite:///{tmp_path}/missing.db", EXPERIMENT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        start = time.monotonic()
        with pytest.raises(LasegsegError, match="unreachable"):
            load_trials(f"http://127.0.0.1:{port}", EXPERIMENT)
    assert time.monotonic() - start < 10
