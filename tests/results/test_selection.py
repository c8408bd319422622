"""Choosing the best cell on validation, never on test, from a fake sweep in a sqlite MLflow store."""

from __future__ import annotations

import numpy as np
import pytest

from lasegseg.errors import LasegsegError
from lasegseg.results.selection import check_metric, select_best
from tests.export.conftest import EXPERIMENT, fake_sweep


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return fake_sweep(tmp_path_factory.mktemp("mlflow"))


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
