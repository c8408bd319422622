"""The Tune trainable outside Tune: what it reports and checkpoints, and how it restores a trial that had finished."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from lasegseg.config import Config
from lasegseg.sweep import trainable
from lasegseg.sweep.context import TrialContext
from lasegseg.sweep.study_table import ROW, StudyTable
from lasegseg.sweep.timings import TIMING, timing
from lasegseg.tracking import client, store


class _Tune:
    """The parts of ``ray.tune`` the trainable uses, recording each report and keeping a copy of its checkpoint."""

    def __init__(self, trial_dir: Path, checkpoint=None, trial_id: str = "abc_00000"):
        self.trial_dir, self.checkpoint, self.reports, self.trial_id = trial_dir, checkpoint, [], trial_id

    def get_context(self):
        return SimpleNamespace(get_trial_dir=lambda: str(self.trial_dir), get_trial_id=lambda: self.trial_id)

    def get_checkpoint(self):
        return self.checkpoint

    def report(self, metrics, checkpoint=None):
        kept = None
        if checkpoint is not None:  # Tune persists the folder before the trainable's scratch copy goes away
            kept = self.trial_dir / f"checkpoint_{len(list(self.trial_dir.glob('checkpoint_*'))):06d}"
            shutil.copytree(checkpoint.path, kept)
        self.reports.append((dict(metrics), kept))


@pytest.fixture
def sweep_ctx(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = store.ensure_experiment(uri, "trainable", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = store.start_parent(uri, exp, "trainable", params={}, tags={})
    return TrialContext(uri, exp, parent, threads=1)


def _run(monkeypatch, tmp_path, ctx, flat, checkpoint=None, trial_id: str = "abc_00000") -> _Tune:
    from ray import tune

    fake = _Tune(tmp_path / "trial", checkpoint, trial_id)
    fake.trial_dir.mkdir(exist_ok=True)
    for name in ("get_context", "get_checkpoint", "report"):
        monkeypatch.setattr(tune, name, getattr(fake, name))
    table = StudyTable((flat,), 0, (-1,))
    trainable.run_tune_trial({ROW: 0}, dataclasses.replace(ctx, table=table))
    return fake


def test_finished_trial_leaves_a_run_marker_and_is_not_retrained_from_it(phantom_dir, tmp_path, monkeypatch, sweep_ctx):
    from ray import tune

    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path / "cache"))
    flat = Config().replace(**{"data.path": str(phantom_dir), "data.image_size": 28, "train.epochs": 2,
                               "model.decoder": "linear", "model.mode": "frozen"}).to_flat()  # fmt: skip
    first = _run(monkeypatch, tmp_path, sweep_ctx, flat)
    epochs, (final, marker) = first.reports[:-1], first.reports[-1]
    # Tune hears what its scheduler and the driver's timings need, nothing more: the rest is in MLflow.
    assert [m["epoch"] for m, _ in epochs] == [0, 1] and TIMING in epochs[0][0]
    assert all(set(m) <= {"val_dice", "epoch", TIMING} for m, _ in epochs)
    assert set(final) == {"val_dice", "test_dice_mean", "done", "mlflow_run_id", TIMING} and final["done"]
    # Resumable while it trains: the first epoch always saves; the next waits until 19× that save's cost passed.
    assert epochs[0][1] is not None and (epochs[0][1] / "state.json").is_file()
    assert all(kept is None or (kept / "state.json").is_file() for _, kept in epochs)
    assert sorted(p.name for p in marker.iterdir()) == [trainable.RUN_FILE]
    run_id = json.loads((marker / trainable.RUN_FILE).read_text())["run_id"]
    assert run_id == final["mlflow_run_id"]

    # Restored from the marker (the driver died before Tune recorded the end): one report, no training.
    again = _run(monkeypatch, tmp_path, sweep_ctx, flat, tune.Checkpoint.from_directory(str(marker)))
    ((metrics, kept),) = again.reports
    assert kept is None
    assert metrics["test_dice_mean"] == pytest.approx(final["test_dice_mean"])
    assert metrics["mlflow_run_id"] == run_id

    # A marker whose run MLflow does not hold as finished is trained again, in the same run, from epoch 0.
    client.client(sweep_ctx.tracking_uri).update_run(run_id, status="RUNNING")
    retried = _run(monkeypatch, tmp_path, sweep_ctx, flat, tune.Checkpoint.from_directory(str(marker)))
    assert [m.get("epoch") for m, _ in retried.reports] == [0, 1, None] and "test_dice_mean" in retried.reports[-1][0]
    assert retried.reports[-1][0]["mlflow_run_id"] == run_id


def test_a_local_sweeps_first_frozen_trial_publishes_its_features_for_the_next(
    phantom_dir, tmp_path, monkeypatch, sweep_ctx
):
    """The first frozen trial of a local sweep whose workers load backbones anyway builds the features with its
    backbone and records them in the sweep's feature index; the next frozen trial of that backbone decodes them
    without loading it (Tune's last report says so)."""
    from lasegseg.models import segmenter

    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path / "cache"))
    ctx = dataclasses.replace(sweep_ctx, feature_index=str(tmp_path / "index"))
    flat = Config().replace(**{"data.path": str(phantom_dir), "data.image_size": 28, "train.epochs": 1,
                               "model.decoder": "linear", "model.mode": "frozen"}).to_flat()  # fmt: skip
    first = _run(monkeypatch, tmp_path, ctx, flat)
    said = timing(first.reports[0][0])
    assert said["backbone_loaded"] is True and said["features_built"] is True
    assert len(list((tmp_path / "index").glob("*.json"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(segmenter, "load_backbone", refuse)
    other = {**flat, "model.decoder": "conv", "seed": 1}
    second = _run(monkeypatch, tmp_path, ctx, other, trial_id="abc_00001")
    said = timing(second.reports[0][0])
    assert said["backbone_loaded"] is False and said["features_built"] is False
    assert "test_dice_mean" in second.reports[-1][0]
