"""The bar: a demo sweep, ``lasegseg export --register``, then ``lasegseg predict`` from the folder and the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from lasegseg.train.metrics import dice_iou
from tests.helpers import dinov2_demo

ROOT = Path(__file__).resolve().parents[2]
FOUR_FILES = ["MODEL_CARD.md", "config.json", "metrics.json", "model.safetensors"]
EXPERIMENT = "lasegseg-demo"
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _lasegseg(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The command line in a fresh process."""
    cmd = [sys.executable, "-m", "lasegseg.cli", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def exported(phantom_dir, tmp_path_factory):
    """The demo sweep cut to 2 cells × 2 seeds (frozen vs finetune) with enough epochs for a non-zero Dice."""
    tmp = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    sweep = [
        sys.executable, str(ROOT / "sweeps" / "fewshot.py"), "--config", str(ROOT / "sweeps" / "configs" / "demo.yaml"),
        "--data", str(phantom_dir), "--tracking-uri", uri, "--storage-path", str(tmp / "runs"),
        "--set", "train.epochs=5", *dinov2_demo(28), "--set", "model.decoder=multiscale",
        "--set", "data.patients=4",
    ]  # fmt: skip
    proc = subprocess.run(sweep, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    best = tmp / "best"
    out = _lasegseg("export", "--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(best),
                    "--register", "la-demo")  # fmt: skip
    assert "registered models:/la-demo/1" in out.stdout
    return {"tmp": tmp, "uri": uri, "best": best, "summary": tmp / "runs" / EXPERIMENT / "summary.parquet"}


def test_export_holds_the_four_files_of_the_best_cell_on_validation(exported):
    best = exported["best"]
    assert sorted(p.name for p in best.iterdir()) == FOUR_FILES
    assert not [p for p in best.parent.iterdir() if p.name.startswith(".best")]
    metrics = json.loads((best / "metrics.json").read_text())
    summary = pd.read_parquet(exported["summary"])
    top = summary.sort_values("val_dice_mean", ascending=False).iloc[0]
    assert metrics["cell"] == top["cell"]
    assert metrics["cell_metrics"]["val_dice"]["mean"] == pytest.approx(top["val_dice_mean"])
    assert metrics["cell_metrics"]["test_dice_mean"]["mean"] == pytest.approx(top["test_dice_mean_mean"])
    assert metrics["n"] == 2 and len(metrics["run_ids"]) == 2 and metrics["selection_metric"] == "val_dice"
    card = (best / "MODEL_CARD.md").read_text()
    assert "multiscale" in card and "±" in card and "Not for clinical use" in card and "phantom" in card


def _run_metrics(uri: str, run_id: str, dst: Path) -> dict:
    from mlflow.artifacts import download_artifacts

    return json.loads(Path(download_artifacts(run_id=run_id, artifact_path="metrics.json", dst_path=str(dst),
                                              tracking_uri=uri)).read_text())  # fmt: skip


def test_folder_and_registry_predict_the_same_mask_as_the_run_measured(exported, phantom_dir, tmp_path):
    best, uri = exported["best"], exported["uri"]
    chosen = json.loads((best / "metrics.json").read_text())["run_id"]
    run = _run_metrics(uri, chosen, tmp_path / "dl")
    case = run["split"]["test"][0]
    image = phantom_dir / "imagesTr" / f"{case}.nii.gz"
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    _lasegseg("predict", str(best), str(image), "--out", str(a), "--quiet")
    _lasegseg("predict", "models:/la-demo@champion", str(image), "--out", str(b), "--tracking-uri", uri, "--quiet")
    mask_a, mask_b, ref = nib.load(a), nib.load(b), nib.load(image)
    np.testing.assert_array_equal(np.asarray(mask_a.dataobj), np.asarray(mask_b.dataobj))
    np.testing.assert_allclose(mask_a.affine, ref.affine)
    np.testing.assert_allclose(mask_b.affine, ref.affine)
    truth = np.asarray(nib.load(phantom_dir / "labelsTr" / f"{case}.nii.gz").dataobj) > 0
    dice, _ = dice_iou(np.asarray(mask_a.dataobj) > 0, truth)
    reported = next(r["dice"] for r in run["per_patient"] if r["case_id"] == case)
    assert reported > 0.2  # a real segmentation, not an empty mask agreeing with an empty mask
    assert dice == pytest.approx(reported, abs=0.01)


def test_predict_a_folder_with_clean_up_and_tta(exported, phantom_dir, tmp_path):
    out = tmp_path / "masks"
    _lasegseg("predict", str(exported["best"]), str(phantom_dir / "imagesTr"), "--out", str(out), "--largest-cc",
              "--tta", "--quiet")  # fmt: skip
    inputs = sorted(p.name for p in (phantom_dir / "imagesTr").iterdir())
    assert sorted(p.name for p in out.glob("*.nii.gz")) == inputs
    volumes = pd.read_csv(out / "volumes.csv")
    assert list(volumes.columns) == ["input", "output", "la_volume_ml"] and len(volumes) == len(inputs)
    assert (volumes["la_volume_ml"] > 0).all()


def test_ensemble_of_the_cells_seeds(exported, phantom_dir, tmp_path):
    ens = tmp_path / "ens"
    _lasegseg("export", "--experiment", EXPERIMENT, "--tracking-uri", exported["uri"], "--out", str(ens), "--ensemble")
    metrics = json.loads((ens / "metrics.json").read_text())
    assert len(metrics["ensemble"]) == 2
    image = next((phantom_dir / "imagesTr").iterdir())
    _lasegseg("predict", str(ens), str(image), "--out", str(tmp_path / "e.nii.gz"), "--quiet")
    assert nib.load(tmp_path / "e.nii.gz").shape == nib.load(image).shape
