"""The command line: the bar's commands, and one clear line (no traceback, nothing written) per bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from lasegseg.cli import main
from lasegseg.train.metrics import dice_iou

TRAIN = ["--image-size", "42", "--epochs", "1", "--decoder", "linear", "--mode", "frozen", "--quiet"]


def test_cli_start_up_imports_nothing_heavy():
    heavy = "('torch', 'monai', 'ray', 'mlflow', 'transformers')"
    code = f"import sys, lasegseg.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_phantom_check_train_predict(tmp_path, capsys):
    data = tmp_path / "p"
    assert main(["phantom", str(data), "--cases", "6", "--seed", "1"]) == 0
    assert main(["check", str(data)]) == 0
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), *TRAIN]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    case = metrics["split"]["test"][0]
    image = data / "imagesTr" / f"{case}.nii.gz"
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", str(run / "model"), str(image), "--out", str(out), "--quiet"]) == 0
    mask, ref_img = nib.load(out), nib.load(image)
    np.testing.assert_allclose(mask.affine, ref_img.affine)
    assert mask.shape == ref_img.shape
    truth = np.asarray(nib.load(data / "labelsTr" / f"{case}.nii.gz").dataobj) > 0
    dice, _ = dice_iou(np.asarray(mask.dataobj) > 0, truth)
    reported = next(r["dice"] for r in metrics["per_patient"] if r["case_id"] == case)
    assert dice == pytest.approx(reported, abs=0.01)
    assert (tmp_path / "mask_volumes.csv").read_text().startswith("input,output,la_volume_ml")


def _corrupt(path):
    path.write_bytes(path.read_bytes()[:200])


@pytest.fixture()
def dataset(tmp_path):
    from lasegseg.data.phantom import write_phantom

    root = tmp_path / "d"
    write_phantom(root, cases=4, seed=3, layout="msd")
    return root


def test_check_names_the_corrupt_file(dataset, capsys):
    victim = dataset / "imagesTr" / "la_002.nii.gz"
    _corrupt(victim)
    assert main(["check", str(dataset)]) == 1
    err = capsys.readouterr().err
    assert "la_002.nii.gz" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--image-size", "100"], "data.image_size"),
        (["--fraction", "1.5"], "data.fraction"),
        (["--fraction", "0"], "data.fraction"),
        (["--patients", "50"], "data.patients"),
        (["--decoder", "transformer"], "transformer"),
        (["--backbone", "dinov2-enormous"], "dinov2-enormous"),
        (["--mode", "partial"], "model.mode"),
        (["--set", "optim.lr=-1"], "optim.lr"),
        (["--layout", "dicom"], "data.layout"),
        (["--set", "model.colour=red"], "model.colour"),
    ],
)
def test_train_refuses_bad_options_writing_nothing(phantom_dir, tmp_path, capsys, args, needle):
    run = tmp_path / "run"
    base = ["train", str(phantom_dir), "--out", str(run), "--image-size", "42", "--epochs", "1", "--quiet"]
    code = main(base + args)
    err = capsys.readouterr().err
    assert code != 0
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_train_on_missing_or_empty_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (tmp_path / "missing", empty):
        assert main(["train", str(target), "--out", str(tmp_path / "run"), *TRAIN]) != 0
        err = capsys.readouterr().err
        assert str(target.name) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_predict_refuses_bad_inputs(phantom_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(phantom_dir), "--out", str(run), *TRAIN]) == 0
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), flat)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(gzip.compress(b"not a nifti header at all")[:20])
    cases = [
        ([str(tmp_path / "nothing"), str(flat)], "nothing"),
        ([str(run / "model"), str(flat)], "flat.nii.gz"),
        ([str(run / "model"), str(broken)], "broken.nii.gz"),
    ]
    for args, needle in cases:
        assert main(["predict", *args, "--out", str(tmp_path / "o.nii.gz"), "--quiet"]) != 0
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o.nii.gz").exists()
    # a tampered weights file is refused by its hash
    weights = run / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    image = next((phantom_dir / "imagesTr").iterdir())
    assert main(["predict", str(run / "model"), str(image), "--out", str(tmp_path / "o.nii.gz"), "--quiet"]) != 0
    assert "SHA-256" in capsys.readouterr().err
