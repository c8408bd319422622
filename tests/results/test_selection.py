"""Choosing the best cell on validation, never on test, from a fake sweep in a sqlite MLflow store."""

from __future__ import annotations

import numpy as np
import pytest

from lasegseg.errors import LasegsegError
from lasegseg.results.selection import check_metric, select_best
from tests.export.conftest import log_trial, tiny_config

EXPERIMENT = "fake-sweep"
# (decoder, patients) → per-seed (val_dice, val_iou, test_dice). Cell A is best on validation, B best on test,
# C has the single best validation seed but a worse mean; D is best by val IoU.
CELLS = {
    ("linear", 2): [(0.80, 0.60, 0.50), (0.84, 0.62, 0.52)],  # A
    ("linear", 4): [(0.70, 0.55, 0.90), (0.72, 0.56, 0.92)],  # B
    ("conv", 2): [(0.95, 0.50, 0.60), (0.40, 0.50, 0.61)],  # C
    ("conv", 4): [(0.78, 0.80, 0.70), (0.79, 0.81, 0.71)],  # D
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp_id, run_name="sweep", tags={"lasegseg.role": "sweep"}).info.run_id
    runs = {}
    for (decoder, patients), seeds in CELLS.items():
        for seed, (val, iou, test) in enumerate(seeds):
            cfg = tiny_config(**{"model.decoder": decoder, "data.patients": patients, "seed": seed})
            metrics = {"best_val_dice": val, "best_val_iou": iou, "test_dice_mean": test, "test_iou_mean": test - 0.1}
            runs[(decoder, patients, seed)] = log_trial(client, exp_id, parent, cfg, metrics)
    for name in ("empty", "no-val"):
        other = client.create_experiment(name, artifact_location=(root / name).as_uri())
        other_parent = client.create_run(other, tags={"lasegseg.role": "sweep"}).info.run_id
        if name == "no-val":
            log_trial(client, other, other_parent, tiny_config(), {"test_dice_mean": 0.9})
    return {"uri": uri, "runs": runs, "root": root}


def test_best_cell_is_chosen_on_validation_not_test(store):
    sel = select_best(store["uri"], EXPERIMENT)
    assert (sel.cell["model.decoder"], sel.cell["data.patients"]) == ("linear", 2)
    assert sel.cell["val_dice_mean"] == pytest.approx(0.82)
    assert sel.run_ids == [store["runs"][("linear", 2, 1)], store["runs"][("linear", 2, 0)]]  # best seed first
    assert sel.stats["test_dice_mean"]["mean"] == pytest.approx(0.51)
    assert sel.stats["test_dice_mean"]["std"] == pytest.approx(np.std([0.50, 0.52], ddof=1))


def test_val_iou_ranks_by_its_own_mean(store):
    sel = select_best(store["uri"], EXPERIMENT, metric="val_iou")
    assert (sel.cell["model.decoder"], sel.cell["data.patients"]) == ("conv", 4)
    assert sel.best_run_id == store["runs"][("conv", 4, 1)]


@pytest.mark.parametrize(
    "experiment,metric,needle",
    [
        (EXPERIMENT, "test_dice_mean", "is a test metric"),
        (EXPERIMENT, "train_loss", "unknown selection metric"),
        ("empty", "val_dice", "no finished trial runs"),
        ("no-val", "val_dice", "metric 'val_dice' was not logged"),
        ("missing", "val_dice", "experiment 'missing' not found"),
    ],
)
def test_bad_selection_is_one_clear_error(store, experiment, metric, needle):
    with pytest.raises(LasegsegError, match=needle):
        select_best(store["uri"], experiment, metric)


def test_selection_metrics_come_from_the_table():
    check_metric("val_dice")
    check_metric("val_iou")
    with pytest.raises(LasegsegError, match=r"use one of val_dice, val_iou"):
        check_metric("val_nsd")
