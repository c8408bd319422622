"""Whole-dataset validation: every bad case reported at once, naming its file, and the loaders that hold all
cases or stream them (lasegseg.data.validate)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lasegseg.data.io import read_volume, write_volume
from lasegseg.data.phantom import write_phantom
from lasegseg.data.validate import load_cases_streaming, load_dataset, validate_dataset
from lasegseg.errors import DataError
from tests.data.conftest import SMALL, copy_dataset, truncate

# ------------------------------------------------------------------------------------------------ bad cases


def _rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    vol = read_volume(path, label=True)
    write_volume(path, vol.data if data is None else data, vol.affine if affine is None else affine)


def _shape_mismatch(path: Path) -> None:
    _rewrite(path, read_volume(path, label=True).data[:-2])


def _affine_mismatch(path: Path) -> None:
    affine = read_volume(path).affine.copy()
    affine[:3, 3] += 2.0
    _rewrite(path, affine=affine)


def _three_classes(path: Path) -> None:
    data = read_volume(path, label=True).data.copy()
    data[0, 0, :] = 2
    _rewrite(path, data)


def _empty_label(path: Path) -> None:
    _rewrite(path, np.zeros_like(read_volume(path, label=True).data))


def _poison(value: float):
    def poison(path: Path) -> None:
        data = read_volume(path).data.copy()
        data[3, 4, 5] = value
        _rewrite(path, data)

    return poison


def _flatten(path: Path) -> None:
    vol = read_volume(path)
    nib.save(nib.Nifti1Image(vol.data[:, :, 0], vol.affine), path)


def _add_time(path: Path) -> None:
    vol = read_volume(path)
    nib.save(nib.Nifti1Image(np.stack([vol.data, vol.data], -1), vol.affine), path)


def _absurd_header(path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.float32)
    # A .nii.gz whose header promises ~100 TB of voxels.
    nib.openers.Opener(str(path), "wb").write(header.binaryblock + b"\x00" * 4)


def _traversal(path: Path) -> None:
    root = path.parents[1]
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1]["image"] = "../outside/la_002.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))


IMAGE, LABEL = "imagesTr/la_002.nii.gz", "labelsTr/la_002.nii.gz"

# name → (layout, file of case 2 to break, how, file named in the problem, phrase)
BAD_CASES = {
    "truncated .nii.gz": ("msd", IMAGE, truncate, IMAGE, "truncated or corrupt gzip"),
    "corrupt .nrrd": ("lasc2018", "patient_002/laendo.nrrd", truncate, "patient_002/laendo.nrrd", "NRRD"),
    "shape mismatch": ("msd", LABEL, _shape_mismatch, LABEL, "differs from la_002.nii.gz shape"),
    "affine mismatch": ("msd", LABEL, _affine_mismatch, LABEL, "voxel-to-world matrix differs"),
    "missing label": ("msd", LABEL, Path.unlink, LABEL, "missing"),
    "missing image": ("lascarqs", "train_2/enhanced.nii.gz", Path.unlink, "train_2/enhanced.nii.gz", "missing"),
    "missing generic label": ("generic", "labels/case_002.nii.gz", Path.unlink, "labels/case_002.nii.gz", "missing"),
    "non-binary label": ("msd", LABEL, _three_classes, LABEL, "not binary"),
    "empty label": ("msd", LABEL, _empty_label, LABEL, "no left-atrium voxels"),
    "NaN voxels": ("msd", IMAGE, _poison(np.nan), IMAGE, "contains 1 NaN/inf voxel(s)"),
    "inf voxels": ("lascarqs", "train_2/enhanced.nii.gz", _poison(np.inf), "train_2/enhanced.nii.gz", "NaN/inf"),
    "2D image": ("msd", IMAGE, _flatten, IMAGE, "expected a 3D volume"),
    "4D image": ("msd", IMAGE, _add_time, IMAGE, "expected a 3D volume"),
    "absurd header dims": ("msd", IMAGE, _absurd_header, IMAGE, "GiB"),
    "path traversal": ("msd", IMAGE, _traversal, "dataset.json training[1] image", "points outside"),
}


@pytest.mark.parametrize("name", list(BAD_CASES), ids=list(BAD_CASES))
def test_bad_case_is_reported_naming_the_file(datasets, tmp_path, name):
    layout, target, breaker, named, phrase = BAD_CASES[name]
    root = copy_dataset(datasets, layout, tmp_path)
    breaker(root / target)

    start = time.perf_counter()
    good, problems = validate_dataset(root)
    assert time.perf_counter() - start < 10
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{named}:") and phrase in problems[0], problems[0]
    assert "\n" not in problems[0]
    assert [c.case_id for c in good] == [c for c in _ids(layout) if "2" not in c[-1]]

    with pytest.raises(DataError) as info:
        load_dataset(root)
    assert named in str(info.value) and phrase in str(info.value)


def _ids(layout: str) -> list[str]:
    return {
        "msd": ["la_001", "la_002", "la_003"],
        "lasc2018": ["patient_001", "patient_002", "patient_003"],
        "lascarqs": ["train_1", "train_2", "train_3"],
        "generic": ["case_001", "case_002", "case_003"],
    }[layout]


def test_validate_reports_every_bad_case_at_once(datasets, tmp_path):
    root = copy_dataset(datasets, "msd", tmp_path)
    write_phantom(root, cases=5, seed=3, layout="msd", **SMALL)
    truncate(root / "imagesTr" / "la_002.nii.gz")
    (root / "labelsTr" / "la_003.nii.gz").unlink()
    _three_classes(root / "labelsTr" / "la_005.nii.gz")

    good, problems = validate_dataset(root)
    assert [c.case_id for c in good] == ["la_001", "la_004"]
    assert len(problems) == 3
    assert all("\n" not in p for p in problems)
    expected = ["labelsTr/la_003.nii.gz: missing", "imagesTr/la_002.nii.gz: truncated", "labelsTr/la_005.nii.gz: label"]
    for start in expected:
        assert sum(p.startswith(start) for p in problems) == 1, (start, problems)

    with pytest.raises(DataError) as info:
        load_dataset(root)
    message = str(info.value)
    assert message.splitlines()[0] == f"{root}: 3 problems"
    assert all(p in message for p in problems)


def test_validate_reports_folder_problems_as_lines(tmp_path):
    (tmp_path / "empty").mkdir()
    assert validate_dataset(tmp_path / "empty") == ([], [f"{tmp_path / 'empty'}: dataset folder is empty"])
    good, problems = validate_dataset(tmp_path, layout="nnunet")
    assert good == [] and len(problems) == 1 and "unknown dataset layout" in problems[0]


def test_streaming_yields_the_cases_one_at_a_time(datasets):
    stream = load_cases_streaming(datasets["lasc2018"])
    first = next(stream)
    assert first.case_id == "patient_001" and first.label.any() and first.image.shape == SMALL["shape"]
    assert [c.case_id for c in stream] == ["patient_002", "patient_003"]


def test_streaming_stops_yielding_at_a_bad_case_and_reports_them_all_at_the_end(datasets, tmp_path):
    root = copy_dataset(datasets, "msd", tmp_path)
    _three_classes(root / "labelsTr" / "la_002.nii.gz")
    seen = []
    with pytest.raises(DataError, match=r"^\S+: \S+la_002\.nii\.gz: label") as info:
        for case in load_cases_streaming(root, "msd"):
            seen.append(case.case_id)
    assert seen == ["la_001"] and "\n" not in str(info.value)
    truncate(root / "imagesTr" / "la_003.nii.gz")
    with pytest.raises(DataError) as info:
        list(load_cases_streaming(root))
    lines = str(info.value).splitlines()
    assert lines[0] == f"{root}: 2 problems" and len(lines) == 3
    assert "la_002.nii.gz" in lines[1] and "la_003.nii.gz: truncated" in lines[2]
