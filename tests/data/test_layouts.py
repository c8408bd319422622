"""Dataset layouts: detection, case listing, label rules and loading one case (lasegseg.data.layouts)."""

from __future__ import annotations

import json
import shutil

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
from lasegseg.data.phantom import PHANTOM_LAYOUTS
from lasegseg.data.validate import validate_dataset
from lasegseg.errors import DataError
from tests.data.conftest import SMALL, copy_dataset, truncate


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
    from lasegseg.config_checks import LAYOUTS as CONFIG_LAYOUTS

    assert set(CONFIG_LAYOUTS) == {"auto", *LAYOUTS}


def test_natural_order_of_case_ids():
    ids = ["train_10", "train_2", "train_1", "la_003", "la_020"]
    assert sorted(ids, key=natural_key) == ["la_003", "la_020", "train_1", "train_2", "train_10"]


def test_lascarqs_cases_are_sorted_naturally(datasets, tmp_path):
    root = copy_dataset(datasets, "lascarqs", tmp_path)
    shutil.copytree(root / "train_2", root / "train_10")
    assert [c.case_id for c in list_cases(root)] == ["train_1", "train_2", "train_3", "train_10"]


def test_generic_labels_may_use_another_format(datasets, tmp_path):
    root = copy_dataset(datasets, "generic", tmp_path)
    label = read_volume(root / "labels" / "case_001.nii.gz", label=True)
    write_volume(root / "labels" / "case_001.nrrd", label.data, label.affine)
    (root / "labels" / "case_001.nii.gz").unlink()
    case = list_cases(root)[0]
    assert case.label_path.name == "case_001.nrrd"
    assert load_case(case).label.any()


def test_macos_resource_forks_and_hidden_files_are_ignored(datasets, tmp_path):
    for layout, junk in [("msd", "imagesTr/._la_001.nii.gz"), ("generic", "images/._case_001.nii.gz")]:
        root = copy_dataset(datasets, layout, tmp_path)
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
    root = copy_dataset(datasets, "msd", tmp_path)
    (root / "images").mkdir()
    (root / "labels").mkdir()
    with pytest.raises(DataError, match="matches several layouts"):
        detect_layout(root)
    assert len(list_cases(root, "msd")) == 3


def test_unreadable_dataset_json(datasets, tmp_path):
    root = copy_dataset(datasets, "msd", tmp_path)
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


def test_list_cases_raises_for_a_missing_partner(datasets, tmp_path):
    root = copy_dataset(datasets, "lasc2018", tmp_path)
    (root / "patient_003" / "laendo.nrrd").unlink()
    with pytest.raises(DataError, match="patient_003/laendo.nrrd: missing"):
        list_cases(root)


def test_scan_lists_cases_without_reading_volumes(datasets, tmp_path):
    root = copy_dataset(datasets, "msd", tmp_path)
    truncate(root / "imagesTr" / "la_001.nii.gz")
    cases, problems = scan_cases(root)
    assert [c.case_id for c in cases] == ["la_001", "la_002", "la_003"] and problems == []
