"""One trial end to end on a tiny phantom: outputs, determinism, reload, resume; the named backbones' stand-ins."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lasegseg.models.sources import STAND_IN_ENV
from lasegseg.train.checkpoint import load_model
from lasegseg.train.evaluation import evaluate, validation_stride
from lasegseg.train.features import features_root
from lasegseg.train.trial import run_trial
from lasegseg.train.trial_data import prepare_data
from tests.train.conftest import trial_cfg


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory):
    """A 2-epoch trial; ``nsd_calls`` records the (NSD tolerance, spacing) each test case's metrics were computed
    with."""
    import lasegseg.train.metrics as metrics

    cfg = trial_cfg(phantom_dir, **{"eval.nsd_tolerance_mm": 3.0})  # not the default: the trial must pass it through
    out = tmp_path_factory.mktemp("run")
    seen, nsd_calls = [], []

    def recording_case(pred, ref, spacing, nsd_tolerance_mm):
        nsd_calls.append((nsd_tolerance_mm, tuple(spacing)))
        return real_case(pred, ref, spacing, nsd_tolerance_mm)

    real_case = metrics.Case  # every case's metrics (NSD among them for the test cases) are computed on one Case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "Case", recording_case)
        results = run_trial(cfg, out, on_epoch=lambda e, m, s: seen.append((e, m, s)))
    return cfg, out, results, seen, nsd_calls


def test_outputs_and_metrics_file(trained):
    cfg, out, results, seen, nsd_calls = trained
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_dice", "test_dice_mean", "test_dice_std", "test_iou_mean", "test_iou_std", "test_hd95_mean"):
        assert key in metrics and isinstance(metrics[key], float)
    for key in ("test_nsd_mean", "test_nsd_std"):
        assert isinstance(metrics[key], float)
    assert 0.0 <= metrics["test_dice_mean"] <= 1.0 and 0.0 <= metrics["test_nsd_mean"] <= 1.0
    assert metrics["config"] == cfg.to_flat() and metrics["config"]["eval.nsd_tolerance_mm"] == 3.0
    rows = metrics["per_patient"]
    assert [row["case_id"] for row in rows] == metrics["split"]["test"]
    assert metrics["test_nsd_mean"] == pytest.approx(np.mean([row["nsd"] for row in rows]))
    assert metrics["test_hd95_n_undefined"] == sum(math.isnan(row["hd95"]) for row in rows)
    # Every case scored (the validation patients each epoch and, when epochs read every k-th slice, once more in
    # full; then the test patients) with the config's tolerance and the phantom's spacing.
    n_validated = (len(seen) + (results["val_slice_stride"] > 1)) * len(metrics["split"]["val"])
    assert nsd_calls == [(3.0, (1.25, 1.25, 2.5))] * (n_validated + len(rows))
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    with (out / "per_patient.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["case_id", "split", "dice", "iou", "nsd", "hd95", "slice_dice"]
    assert [float(r["nsd"]) for r in table] == pytest.approx([row["nsd"] for row in rows])
    assert [e for e, _, _ in seen] == [0, 1]
    assert all(s is None for _, _, s in seen)  # no checkpoint_dir given → no training state written
    assert max(m["val_dice"] for _, m, _ in seen) == pytest.approx(results["val_dice"])


def test_splits_are_patient_level_and_disjoint(trained):
    _, _, results, _, _ = trained
    split = results["split"]
    sets = [set(split[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == 6


def test_reloaded_model_reproduces_the_reported_test_metrics(trained):
    cfg, out, results, _, _ = trained
    model, cfg2, _ = load_model(out / "model")
    assert cfg2 == cfg
    data = prepare_data(cfg2)
    rows = evaluate(
        model, data.cache, data.split.test, device="cpu", amp="off", batch_size=8, full=True,
        nsd_tolerance_mm=cfg2.eval.nsd_tolerance_mm,
    )  # fmt: skip
    for ours, reported in zip(rows, results["per_patient"], strict=True):
        assert ours["dice"] == pytest.approx(reported["dice"], abs=1e-6)
        assert ours["nsd"] == pytest.approx(reported["nsd"], abs=1e-6)


def test_training_is_deterministic_on_cpu(phantom_dir):
    cfg = trial_cfg(phantom_dir, **{"train.epochs": 1, "model.decoder": "conv", "model.mode": "finetune"})
    a = run_trial(cfg)
    b = run_trial(cfg)
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    assert a["test_dice_mean"] == b["test_dice_mean"]
    c = run_trial(cfg.replace(seed=1))
    assert c["history"][0]["train_loss"] != a["history"][0]["train_loss"]


def test_resume_from_training_state_equals_uninterrupted(phantom_dir, tmp_path):
    cfg = trial_cfg(phantom_dir, **{"train.epochs": 3, "model.decoder": "conv", "model.mode": "finetune"})
    full = run_trial(cfg)
    states = tmp_path / "state"

    class Stop(Exception):
        pass

    def stop_after_first(epoch, metrics, saved):
        if epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        run_trial(cfg, checkpoint_dir=states, on_epoch=stop_after_first)
    resumed = run_trial(cfg, resume_from=states)
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    for a, b in zip(full["history"], resumed["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
    assert resumed["test_dice_mean"] == pytest.approx(full["test_dice_mean"], abs=1e-6)


def test_a_resume_from_an_older_checkpoint_repeats_the_epochs_since_and_ends_alike(phantom_dir, tmp_path):
    """``train.checkpoint_every=2``: states after epochs 1 and 3 only; a crash after epoch 2 resumes at epoch 2."""
    cfg = trial_cfg(phantom_dir, **{"train.epochs": 5, "model.mode": "finetune", "train.checkpoint_every": 2})
    full = run_trial(cfg)
    states, saved_on = tmp_path / "state", []

    class Crash(Exception):
        pass

    def crash_after_epoch_2(epoch, metrics, saved):
        if saved is not None:
            saved_on.append(epoch)
        if epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        run_trial(cfg, checkpoint_dir=states, on_epoch=crash_after_epoch_2)
    assert saved_on == [1] and json.loads((states / "state.json").read_text())["scalars"]["epoch"] == 2
    repeated = []
    resumed = run_trial(cfg, resume_from=states, checkpoint_dir=states, on_epoch=lambda e, m, s: repeated.append(e))
    assert repeated == [2, 3, 4]  # epoch 2 trained again, from the state saved after epoch 1
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3, 4]
    for a, b in zip(full["history"], resumed["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
    assert resumed["test_dice_mean"] == pytest.approx(full["test_dice_mean"], abs=1e-6)


@pytest.mark.parametrize("durable", [True, False])
def test_training_state_is_fsynced_only_when_it_must_survive_alone(phantom_dir, tmp_path, monkeypatch, durable):
    """A sweep trial's state is a scratch copy that Tune copies to its storage: no fsync; the CLI's folder is the
    only copy: every file and the folders are flushed. Either way the folder resumes the trial."""
    from lasegseg import fsio

    synced = []
    monkeypatch.setattr(fsio, "fsync_file", lambda path: synced.append(Path(path).name))
    monkeypatch.setattr(fsio, "fsync_dir", lambda path: synced.append(Path(path).name + "/"))
    cfg = trial_cfg(phantom_dir, **{"train.epochs": 1, "model.decoder": "linear"})
    run_trial(cfg, checkpoint_dir=tmp_path / "state", durable_checkpoints=durable)
    files = {"current.safetensors", "best.safetensors", "optimizer.safetensors", "rng.safetensors"}
    assert {n for n in synced if n.endswith(".safetensors")} == (files if durable else set())
    assert (tmp_path / "state" / "state.json").is_file()
    resumed = run_trial(cfg, resume_from=tmp_path / "state")
    assert [h["epoch"] for h in resumed["history"]] == [0]


def test_frozen_trial_leaves_backbone_weights_untouched(phantom_dir, tmp_path):
    from lasegseg.models.segmenter import build_segmenter

    cfg = trial_cfg(phantom_dir, **{"train.epochs": 1})
    run_trial(cfg, tmp_path)
    model, _, _ = load_model(tmp_path / "model")
    fresh = build_segmenter(cfg.model)
    for (name, a), (_, b) in zip(model.backbone.state_dict().items(), fresh.backbone.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_budgeted_validation_picks_the_epoch_on_strided_slices_and_reports_it_on_all(phantom_dir, tmp_path):
    """One training patient against one validation patient: validation would read as many slices as the epoch
    trains on. Each epoch is scored on every k-th slice; the trial's val_dice is the chosen epoch on every slice."""
    cfg = trial_cfg(phantom_dir, **{"data.patients": 1, "train.epochs": 3, "model.decoder": "conv"})
    out = tmp_path / "run"
    results = run_trial(cfg, out)
    data = prepare_data(cfg)
    n_val, n_train = len(data.cache.rows_for(list(data.split.val))), len(data.train_rows)
    assert n_val >= n_train / 2  # the case this setting is for
    stride = results["val_slice_stride"]
    assert stride == validation_stride(cfg.train.val_budget, n_val, n_train) > 1 and results["val_full_seconds"] > 0
    model, _, _ = load_model(out / "model")  # the best epoch's weights
    kwargs = {"device": "cpu", "amp": "off", "batch_size": 16}
    strided = evaluate(model, data.cache, data.split.val, stride=stride, **kwargs)
    every = evaluate(model, data.cache, data.split.val, **kwargs)
    best = results["history"][results["best_epoch"]]
    assert best["val_dice"] == max(h["val_dice"] for h in results["history"])
    assert np.mean([r["dice"] for r in strided]) == pytest.approx(best["val_dice"], abs=1e-6)
    assert results["val_dice"] == pytest.approx(np.mean([r["dice"] for r in every]), abs=1e-6)
    assert results["val_iou"] == pytest.approx(np.mean([r["iou"] for r in every]), abs=1e-6)
    exact = run_trial(cfg.replace(**{"train.val_budget": 0.0}))
    assert exact["val_slice_stride"] == 1 and exact["val_full_seconds"] == 0.0
    assert exact["val_dice"] == max(h["val_dice"] for h in exact["history"])
    with pytest.raises(ValueError, match="every slice"):
        evaluate(model, data.cache, data.split.test, full=True, stride=2, **kwargs)


# Each decoder once per stand-in, the modes spread so that each stand-in is frozen (last level and all levels), fine-
# tuned with gradient checkpointing and adapted with LoRA.
STAND_IN_TRIALS = [("linear", "frozen"), ("conv", "lora"), ("multiscale", "frozen"), ("unetr", "finetune")]


@pytest.mark.parametrize("backbone", ["dinov2-giant", "dinov3-large"])
@pytest.mark.parametrize(("decoder", "mode"), STAND_IN_TRIALS)
def test_a_trial_runs_on_the_stand_in_of_a_named_backbone(phantom_dir, tmp_path, monkeypatch, backbone, decoder, mode):
    """The paper grid's backbones, shrunk by the stand-in switch alone: the real size's taps and code paths."""
    from lasegseg.models.families import backbone_family

    monkeypatch.setenv(STAND_IN_ENV, "1")
    family = backbone_family(backbone.split("-")[0])
    flat = {"model.backbone": backbone, "model.decoder": decoder, "model.mode": mode, "model.decoder_width": 16}
    cfg = trial_cfg(phantom_dir, **flat, **{"data.image_size": 2 * family.patch_size, "train.epochs": 1})
    results = run_trial(cfg, tmp_path)
    assert 0.0 <= results["test_dice_mean"] <= 1.0 and math.isfinite(results["history"][0]["train_loss"])
    model, saved, _ = load_model(tmp_path / "model")
    assert saved.model.backbone == backbone
    assert model.backbone.source.endswith(f"stand-in-{backbone}")
    assert model.backbone.layer_indices == family.layer_indices[backbone.split("-", 1)[1]]


def test_frozen_trials_of_two_stand_ins_read_feature_caches_of_their_own(phantom_dir, tmp_path, monkeypatch):
    """Two names, two feature caches over the same slices; the same name again reads its first one."""
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    monkeypatch.setenv(STAND_IN_ENV, "1")
    for backbone in ("dinov2-giant", "dinov2-large", "dinov2-giant"):
        cfg = trial_cfg(phantom_dir, **{"model.backbone": backbone, "data.image_size": 28, "train.epochs": 1})
        run_trial(cfg)
    folders = [p for p in features_root(prepare_data(cfg).cache).iterdir() if not p.name.startswith(".")]
    manifests = [json.loads((f / "manifest.json").read_text()) for f in folders]
    assert sorted(Path(m["backbone_source"]).name for m in manifests) == [
        "stand-in-dinov2-giant",
        "stand-in-dinov2-large",
    ]
    assert len({m["backbone_fingerprint"] for m in manifests}) == 2
