"""Layouts, per-case checks and whole-dataset validation (lasegseg.data.layouts, lasegseg.data.validate)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lasegseg.data.io import read_volume, write_volume
from lasegseg.data.layouts import (
    LAYOUTS,
    detect_layout,
    label_to_mask,
    list_cases,
    load_case,
    natural_key,
    scan_cases,
)
from lasegseg.data.phantom import PHANTOM_LAYOUTS, write_phantom
from lasegseg.data.validate import load_dataset, validate_dataset
from lasegseg.errors import DataError

# Coarse grid over the same field of view: the whole heart, a few thousand voxels, fast to write and read.
SMALL = {"shape": (40, 40, 16), "spacing": (3.0, 3.0, 6.0)}


def _phantom(root: Path, layout: str, cases: int = 3) -> Path:
    write_phantom(root, cases=cases, seed=3, layout=layout, **SMALL)
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """One small phantom per layout, written once; tests that modify a dataset copy it first."""
    base = tmp_path_factory.mktemp("datasets")
    return {layout: _phantom(base / layout, layout) for layout in PHANTOM_LAYOUTS}


def _copy(datasets: dict[str, Path], layout: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(datasets[layout], tmp_path / layout))


@pytest.mark.parametrize("layout", PHANTOM_LAYOUTS)
def test_each_layout_is_detected_listed_and_loaded(datasets, layout):
    root = datasets[layout]
    assert detect_layout(root) == layout
    cases = list_cases(root)
    assert [c.layout for c in cases] == [layout] * 3
    assert [c.case_id for c in cases] == sorted((c.case_id for c in cases), key=natural_key)
    loaded = load_case(cases[0])
    assert loaded.image.dtype == np.float32 and loaded.label.dtype == bool
    assert loaded.image.shape == loaded.label.shape == SMALL["shape"]
    assert loaded.spacing == pytest.approx(SMALL["spacing"])
    assert 0 < loaded.label.sum() < loaded.label.size
    assert loaded.image_path == cases[0].image_path and loaded.meta["layout"] == layout


def test_layout_registry_matches_the_config_choices():
    from lasegseg.config import LAYOUTS as CONFIG_LAYOUTS

    assert set(CONFIG_LAYOUTS) == {"auto", *LAYOUTS}


def test_natural_order_of_case_ids():
    ids = ["train_10", "train_2", "train_1", "la_003", "la_020"]
    assert sorted(ids, key=natural_key) == ["la_003", "la_020", "train_1", "train_2", "train_10"]


def test_lascarqs_cases_are_sorted_naturally(datasets, tmp_path):
    root = _copy(datasets, "lascarqs", tmp_path)
    shutil.copytree(root / "train_2", root / "train_10")
    assert [c.case_id for c in list_cases(root)] == ["train_1", "train_2", "train_3", "train_10"]


def test_generic_labels_may_use_another_format(datasets, tmp_path):
    root = _copy(datasets, "generic", tmp_path)
    label = read_volume(root / "labels" / "case_001.nii.gz", label=True)
    write_volume(root / "labels" / "case_001.nrrd", label.data, label.affine)
    (root / "labels" / "case_001.nii.gz").unlink()
    case = list_cases(root)[0]
    assert case.label_path.name == "case_001.nrrd"
    assert load_case(case).label.any()


def test_macos_resource_forks_and_hidden_files_are_ignored(datasets, tmp_path):
    for layout, junk in [("msd", "imagesTr/._la_001.nii.gz"), ("generic", "images/._case_001.nii.gz")]:
        root = _copy(datasets, layout, tmp_path)
        (root / junk).write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (root / "._dataset.json").write_bytes(b"\x00\x05\x16\x07")
        cases, problems = validate_dataset(root)
        assert problems == [] and len(cases) == 3


# ------------------------------------------------------------------------------------------------ folder errors


def test_folder_level_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        list_cases(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no known dataset layout") as info:
        detect_layout(tmp_path / "other")
    for spec in LAYOUTS.values():
        assert spec.looks_for in str(info.value)


def test_unknown_layout_lists_the_valid_ones(datasets):
    for call in (lambda: list_cases(datasets["msd"], "nnunet"), lambda: label_to_mask(np.zeros(3), "nnunet")):
        with pytest.raises(DataError, match="unknown dataset layout 'nnunet'") as info:
            call()
        assert all(name in str(info.value) for name in LAYOUTS)


def test_ambiguous_folder_asks_for_an_explicit_layout(datasets, tmp_path):
    root = _copy(datasets, "msd", tmp_path)
    (root / "images").mkdir()
    (root / "labels").mkdir()
    with pytest.raises(DataError, match="matches several layouts"):
        detect_layout(root)
    assert len(list_cases(root, "msd")) == 3


def test_unreadable_dataset_json(datasets, tmp_path):
    root = _copy(datasets, "msd", tmp_path)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json: not a readable JSON"):
        list_cases(root)
    (root / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(DataError, match="has no 'training' list"):
        list_cases(root)


# ------------------------------------------------------------------------------------------------ label rules

LABEL_RULES = [
    # (layout, label values, LA voxels or the error)
    ("msd", [0, 1, 1, 0], [False, True, True, False]),
    ("msd", [0, 2, 2, 0], "not binary"),
    ("msd", [0, 1, 2, 0], "not binary"),
    ("lasc2018", [0, 255, 255, 0], [False, True, True, False]),
    ("lasc2018", [0, 1, 1, 0], "not binary"),
    ("lasc2018", [0, 255, 1, 0], "not binary"),
    ("lascarqs", [0, 7, 7, 0], [False, True, True, False]),
    ("lascarqs", [0, 1, 2, 0], "not binary"),
    ("generic", [0.0, 1.0, 1.0, 0.0], [False, True, True, False]),
    ("generic", [0, 1, 1, -1], "not binary"),
    ("generic", [0.0, 1.0, np.nan, 0.0], "NaN"),
]


@pytest.mark.parametrize(("layout", "values", "expected"), LABEL_RULES)
def test_label_rule(layout, values, expected):
    label = np.array(values)
    if isinstance(expected, str):
        with pytest.raises(DataError, match=expected) as info:
            label_to_mask(label, layout, path="labels/x.nii.gz")
        assert str(info.value).startswith("labels/x.nii.gz: ")
    else:
        np.testing.assert_array_equal(label_to_mask(label, layout), expected)


# ------------------------------------------------------------------------------------------------ bad cases


def _rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    vol = read_volume(path, label=True)
    write_volume(path, vol.data if data is None else data, vol.affine if affine is None else affine)


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


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
    "truncated .nii.gz": ("msd", IMAGE, _truncate, IMAGE, "truncated or corrupt gzip"),
    "corrupt .nrrd": ("lasc2018", "patient_002/laendo.nrrd", _truncate, "patient_002/laendo.nrrd", "NRRD"),
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
    root = _copy(datasets, layout, tmp_path)
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


def test_list_cases_raises_for_a_missing_partner(datasets, tmp_path):
    root = _copy(datasets, "lasc2018", tmp_path)
    (root / "patient_003" / "laendo.nrrd").unlink()
    with pytest.raises(DataError, match="patient_003/laendo.nrrd: missing"):
        list_cases(root)


def test_validate_reports_every_bad_case_at_once(datasets, tmp_path):
    root = _copy(datasets, "msd", tmp_path)
    write_phantom(root, cases=5, seed=3, layout="msd", **SMALL)
    _truncate(root / "imagesTr" / "la_002.nii.gz")
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


def test_scan_lists_cases_without_reading_volumes(datasets, tmp_path):
    root = _copy(datasets, "msd", tmp_path)
    _truncate(root / "imagesTr" / "la_001.nii.gz")
    cases, problems = scan_cases(root)
    assert [c.case_id for c in cases] == ["la_001", "la_002", "la_003"] and problems == []
