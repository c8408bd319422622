"""The synthetic LA phantom (lasegseg.data.phantom): determinism, realism checks and every layout round trip."""

from __future__ import annotations

import json

import nrrd
import numpy as np
import pytest
from scipy import ndimage

from lasegseg.data.io import read_volume
from lasegseg.data.layouts import list_cases, load_case
from lasegseg.data.phantom import DEFAULT_SHAPE, DEFAULT_SPACING, PHANTOM_LAYOUTS, make_case, write_phantom
from lasegseg.errors import DataError

SMALL = {"shape": (40, 40, 16), "spacing": (3.0, 3.0, 6.0)}


@pytest.fixture(scope="module")
def default_cases():
    """Three full-size phantom patients."""
    return [make_case(np.random.default_rng([0, i])) for i in range(3)]


def _best_threshold_dice(image: np.ndarray, label: np.ndarray) -> float:
    """Best Dice of one global threshold, scanning every half percentile of the normalised image."""
    lo, hi = np.percentile(image, [0.5, 99.5])
    norm = np.clip((image - lo) / (hi - lo), 0.0, 1.0)
    best = 0.0
    for t in np.percentile(norm, np.arange(0.5, 100.0, 0.5)):
        pred = norm > t
        best = max(best, 2.0 * np.sum(pred & label) / (pred.sum() + label.sum()))
    return best


def test_make_case_shapes_and_types(default_cases):
    image, label, spacing = default_cases[0]
    assert image.shape == label.shape == DEFAULT_SHAPE
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1}
    assert spacing == DEFAULT_SPACING and spacing[2] > spacing[0]
    assert np.all(np.isfinite(image))


def test_make_case_is_deterministic():
    a = make_case(np.random.default_rng(5), SMALL["shape"], SMALL["spacing"])
    b = make_case(np.random.default_rng(5), SMALL["shape"], SMALL["spacing"])
    c = make_case(np.random.default_rng(6), SMALL["shape"], SMALL["spacing"])
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != c[0].tobytes() and a[1].tobytes() != c[1].tobytes()


def test_thresholding_fails_but_la_is_there(default_cases):
    for image, label, spacing in default_cases:
        label = label.astype(bool)
        share = label.any(axis=(0, 1)).mean()
        assert 0.3 <= share <= 0.6, share
        # LA roughly 25–50 mm across in-plane (body plus vein stumps and appendage can reach further).
        extent = [np.ptp(np.nonzero(label.any(axis=tuple({0, 1, 2} - {k})))[0]) * spacing[k] for k in (0, 1)]
        assert all(25 <= e <= 90 for e in extent), extent
        assert _best_threshold_dice(image, label) < 0.6


def test_intensity_scale_varies_between_patients(default_cases):
    medians = [float(np.median(image)) for image, _, _ in default_cases]
    assert max(medians) / min(medians) > 1.5


def test_blood_snr_is_moderate(default_cases):
    for image, label, _ in default_cases:
        core = label.astype(bool)
        # Inner LA voxels (away from partial-volume edges) are blood: mean over spread is the SNR there.
        core = ndimage.binary_erosion(core, iterations=2)
        snr = image[core].mean() / image[core].std()
        assert 4 < snr < 20, snr


@pytest.mark.parametrize("layout", PHANTOM_LAYOUTS)
def test_every_layout_round_trips_exactly(tmp_path, layout):
    images = write_phantom(tmp_path, cases=2, seed=7, layout=layout, **SMALL)
    cases = list_cases(tmp_path)
    assert [c.image_path for c in cases] == images
    for i, case in enumerate(cases):
        expected_image, expected_label, spacing = make_case(np.random.default_rng([7, i]), **SMALL)
        loaded = load_case(case)
        # Files are written flipped for some layouts; canonical loading must undo it exactly.
        np.testing.assert_array_equal(loaded.image, expected_image)
        np.testing.assert_array_equal(loaded.label, expected_label.astype(bool))
        assert loaded.spacing == pytest.approx(spacing)
        raw = read_volume(case.label_path, label=True).data
        assert set(np.unique(raw)) == ({0, 255} if layout == "lasc2018" else {0, 1})
        assert read_volume(case.image_path).spacing == pytest.approx(SMALL["spacing"])


def test_default_files_record_anisotropic_spacing(tmp_path):
    for layout in ("msd", "lasc2018"):
        image = write_phantom(tmp_path / layout, cases=1, layout=layout)[0]
        assert read_volume(image).spacing == pytest.approx(DEFAULT_SPACING)


def test_nrrd_phantom_is_in_lps_space(tmp_path):
    image = write_phantom(tmp_path, cases=1, layout="lasc2018", **SMALL)[0]
    header = nrrd.read_header(str(image))
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(np.abs(np.diag(header["space directions"])), SMALL["spacing"])


def test_msd_dataset_json_lists_every_case(tmp_path):
    write_phantom(tmp_path, cases=3, **SMALL)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["numTraining"] == 3
    assert [e["image"] for e in meta["training"]] == [f"./imagesTr/la_00{i}.nii.gz" for i in (1, 2, 3)]


def test_cases_depend_only_on_seed_and_index(tmp_path):
    write_phantom(tmp_path / "a", cases=2, seed=1, layout="generic", **SMALL)
    write_phantom(tmp_path / "b", cases=3, seed=1, layout="generic", **SMALL)
    write_phantom(tmp_path / "c", cases=2, seed=2, layout="generic", **SMALL)
    for name in ("case_001", "case_002"):
        a = read_volume(tmp_path / "a" / "images" / f"{name}.nii.gz").data
        b = read_volume(tmp_path / "b" / "images" / f"{name}.nii.gz").data
        c = read_volume(tmp_path / "c" / "images" / f"{name}.nii.gz").data
        assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_write_phantom_rejects_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown phantom layout 'nnunet'"):
        write_phantom(tmp_path, layout="nnunet")
    with pytest.raises(DataError, match="at least 1 case"):
        write_phantom(tmp_path, cases=0)
