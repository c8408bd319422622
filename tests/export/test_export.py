"""Selection on validation, the export folder and the MLflow registry, on a fake sweep with real model artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lasegseg.cli import main
from lasegseg.errors import LasegsegError
from lasegseg.export.export import export_best
from tests.export.conftest import EXPERIMENT, fake_sweep

FOUR_FILES = ["MODEL_CARD.md", "config.json", "metrics.json", "model.safetensors"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_folder):
    return fake_sweep(tmp_path_factory.mktemp("mlflow"), model_folder)


def test_export_folder_and_registry(store, tmp_path, model_folder):
    out = tmp_path / "best"
    result = export_best(store["uri"], EXPERIMENT, out, register="la-fake")
    assert sorted(p.name for p in out.iterdir()) == FOUR_FILES
    assert (out / "config.json").read_bytes() == (model_folder / "config.json").read_bytes()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run_id"] == store["runs"][("linear", 2, 1)] and metrics["selection_metric"] == "val_dice"
    assert metrics["n"] == 2 and len(metrics["run_ids"]) == 2 and metrics["experiment"] == EXPERIMENT
    assert metrics["cell_metrics"]["val_dice"]["mean"] == pytest.approx(0.82)
    assert metrics["split_sizes"] == {"train": 2, "val": 1, "test": 1}
    card = (out / "MODEL_CARD.md").read_text()
    for needle in ("0.510 ± 0.014", "Not for clinical use", "phantom", "lasegseg predict", "lasegseg.load_model",
                   "models:/la-fake@champion", "train 2, validation 1, test 1", "28² px"):  # fmt: skip
        assert needle in card
    assert result["registered"] == {"name": "la-fake", "version": 1, "alias": "champion"}

    from mlflow import MlflowClient

    client = MlflowClient(store["uri"], registry_uri=store["uri"])
    mv = client.get_model_version_by_alias("la-fake", "champion")
    assert mv.run_id == metrics["run_id"] and mv.source.endswith("/model")
    assert float(mv.tags["val_dice_mean"]) == pytest.approx(0.82)
    # A second export adds a version and moves the alias.
    export_best(store["uri"], EXPERIMENT, out, metric="val_iou", register="la-fake")
    assert str(client.get_model_version_by_alias("la-fake", "champion").version) == "2"


def test_registered_and_exported_models_load_alike(store, tmp_path):
    import lasegseg

    out = tmp_path / "best"
    export_best(store["uri"], EXPERIMENT, out, register="la-same")
    from_dir = lasegseg.load_model(out, device="cpu")
    from_registry = lasegseg.load_model("models:/la-same@champion", device="cpu", tracking_uri=store["uri"])
    by_version = lasegseg.load_model("models:/la-same/1", device="cpu", tracking_uri=store["uri"])
    volume = np.random.default_rng(0).normal(size=(20, 18, 5)).astype(np.float32)
    probs = [m.predict_volume(volume) for m in (from_dir, from_registry, by_version)]
    assert probs[0].shape == volume.shape and probs[0].dtype == bool
    assert all(np.array_equal(probs[0], p) for p in probs[1:])
    for bad, needle in (("models:/la-same@nope", "no alias 'nope'"), ("models:/nobody@champion", "no registered"),
                        ("models:/la-same/9", "no version 9"), ("models:/la-same", "models:/NAME@ALIAS")):  # fmt: skip
        with pytest.raises(LasegsegError, match=needle):
            lasegseg.load_model(bad, tracking_uri=store["uri"])


def test_ensemble_export_averages_its_members(store, tmp_path):
    import lasegseg

    out = tmp_path / "ens"
    result = export_best(store["uri"], EXPERIMENT, out, ensemble=True)
    assert len(result["ensemble"]) == 2 and all((out / m / "model.safetensors").is_file() for m in result["ensemble"])
    model = lasegseg.load_model(out, device="cpu")
    assert len(model.model.members) == 2
    assert model.predict_volume(np.ones((16, 16, 3), np.float32)).shape == (16, 16, 3)


def test_export_command_failures_leave_nothing(store, tmp_path, capsys):
    out = tmp_path / "best"
    cases = [
        (["--experiment", EXPERIMENT, "--metric", "test_dice_mean"], "is a test metric"),
        (["--experiment", "empty"], "no finished trial runs"),
        (["--experiment", "no-val", "--metric", "val_iou"], "not logged"),
    ]
    for args, needle in cases:
        assert main(["export", *args, "--tracking-uri", store["uri"], "--out", str(out)]) != 0
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())
    assert main(["export", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"], "--out", str(out)]) == 0
    assert "best cell" in capsys.readouterr().out and (out / "MODEL_CARD.md").is_file()
