"""``lasegseg.load_model`` and ``Predictor``: orientation handling, and refusal of bad inputs and bad model folders."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import lasegseg
from lasegseg.errors import DataError, ModelError
from lasegseg.train.checkpoint import sha256_file


@pytest.fixture()
def folder(model_folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(model_folder, dst)
    return dst


def test_import_lasegseg_stays_light():
    code = "import sys, lasegseg; lasegseg.__getattr__; print('torch' in sys.modules, 'mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_predict_volume_follows_the_affine(model_folder):
    model = lasegseg.load_model(model_folder, device="cpu")
    assert model.config.data.image_size == 28 and "linear" in repr(model)
    rng = np.random.default_rng(1)
    canonical = rng.normal(size=(24, 20, 6)).astype(np.float32)
    canonical[6:14, 5:12, 1:5] += 3.0
    mask = model.predict_volume(canonical, spacing=(1.0, 1.0, 2.5))
    assert mask.shape == canonical.shape and mask.dtype == bool
    # The same image stored as (Z, Y, X) with the X axis pointing left: the mask comes back in that order.
    stored = np.transpose(canonical[::-1], (2, 1, 0))
    affine = np.array([[0, 0, -1, 23], [0, 1, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]], float)
    back = model.predict_volume(stored, affine=affine)
    np.testing.assert_array_equal(np.transpose(back, (2, 1, 0))[::-1], mask)


def test_predict_file_writes_the_input_grid(model_folder, tmp_path):
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(2).normal(size=(20, 22, 4)).astype(np.float32), affine), src)
    row = lasegseg.load_model(model_folder, device="cpu").predict_file(src, tmp_path / "mask.nii.gz")
    out = nib.load(tmp_path / "mask.nii.gz")
    assert out.shape == (20, 22, 4) and np.allclose(out.affine, affine)
    assert row["la_volume_ml"] == pytest.approx(np.asarray(out.dataobj).sum() * 0.8 * 0.8 * 2.0 / 1000)


@pytest.mark.parametrize(
    "array,kwargs,needle",
    [
        (np.zeros((8, 8)), {}, "not a 3D volume"),
        (np.zeros((2, 8, 8, 3)), {}, "not a 3D volume"),
        (np.full((8, 8, 2), np.nan), {}, "NaN"),
        (np.zeros((8, 8, 2)), {"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        (np.zeros((8, 8, 2)), {"affine": np.zeros((4, 4))}, "affine"),
    ],
)
def test_predict_volume_refuses_bad_arrays(model_folder, array, kwargs, needle):
    with pytest.raises(DataError, match=needle):
        lasegseg.load_model(model_folder, device="cpu").predict_volume(array, **kwargs)


def test_run_folder_is_accepted(model_folder):
    assert lasegseg.load_model(model_folder.parent, device="cpu").config.model.decoder == "linear"


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json"])
def test_missing_files_are_refused(folder, victim):
    (folder / victim).unlink()
    with pytest.raises(ModelError, match=victim):
        lasegseg.load_model(folder)


def test_tampered_weights_are_refused(folder):
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        lasegseg.load_model(folder)


def test_pickled_weights_are_refused_without_unpickling(folder, monkeypatch):
    """A torch.save file whose hash was updated too: only the safetensors format check can catch it."""
    import io

    import torch
    from safetensors.torch import load

    weights = folder / "model.safetensors"
    buffer = io.BytesIO()
    torch.save(load(weights.read_bytes()), buffer)  # read into memory first: the file is about to be replaced
    weights.write_bytes(buffer.getvalue())
    meta = json.loads((folder / "config.json").read_text())
    meta["weights_sha256"] = sha256_file(weights)
    (folder / "config.json").write_text(json.dumps(meta))

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ModelError, match="safetensors"):
        lasegseg.load_model(folder)


def test_ensemble_member_outside_the_folder_is_refused(folder, tmp_path):
    (folder / "metrics.json").write_text(json.dumps({"ensemble": ["../elsewhere"]}))
    with pytest.raises(ModelError, match="outside the export folder"):
        lasegseg.load_model(folder)


def test_predict_command_refuses_bad_sources(folder, tmp_path, capsys, monkeypatch):
    from lasegseg.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.float32), np.eye(4)), src)
    cases = [
        (["models:/la@champion"], "no tracking URI"),
        (["models:/la@champion", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"], "no MLflow database"),
        ([str(tmp_path / "nowhere")], "no such model folder"),
    ]
    for args, needle in cases:
        assert main(["predict", args[0], str(src), "--out", str(tmp_path / "m.nii.gz"), *args[1:]]) != 0
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    assert not (tmp_path / "m.nii.gz").exists()
