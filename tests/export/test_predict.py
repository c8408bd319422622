"""Segmenting new volumes: preprocessing as in training, the mask back on the native grid, written like the input.

A stub model that thresholds the normalised intensity at 0.5 makes the expected mask known exactly; the tiny model
folder of ``conftest.py`` checks the same path with a real segmenter.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from lasegseg.data.io import read_volume, write_volume
from lasegseg.errors import DataError
from lasegseg.export.predict import output_path_for, predict_file, preprocess_volume, segment_canonical
from tests.export.conftest import IMAGE_SIZE, tiny_config

# Stored as (Z, Y, X) with the X axis pointing left: the canonical (X, Y, Z) array is image[::-1].transpose(2, 1, 0).
STORED_AFFINE = np.array([[0, 0, -0.8, 30.0], [0, 0.9, 0, -12.0], [2.5, 0, 0, 4.0], [0, 0, 0, 1]])


class Threshold(torch.nn.Module):
    """Foreground wherever the preprocessed slice is brighter than 0.5 (two-class logits, like a segmenter)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = 20.0 * (x - 0.5)
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def _box_image(shape=(56, 42, 5), boxes=((slice(10, 34), slice(6, 24), slice(1, 3)),)) -> tuple[np.ndarray, np.ndarray]:
    """Canonical raw image (dark background, bright off-centre boxes, some noise) and the boolean box mask."""
    truth = np.zeros(shape, bool)
    for box in boxes:
        truth[box] = True
    rng = np.random.default_rng(0)
    image = (100.0 + 400.0 * truth + rng.normal(0, 5, shape)).astype(np.float32)
    return image, truth


def _to_stored(canonical: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(canonical[::-1], (2, 1, 0)))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# ------------------------------------------------------------------------------------------------ in memory


def test_preprocess_volume_gives_slices_first_at_the_configured_size():
    image, truth = _box_image()
    slices = preprocess_volume(image, tiny_config())
    assert slices.shape == (5, IMAGE_SIZE, IMAGE_SIZE) and slices.dtype == np.float16
    assert 0.0 <= slices.min() and slices.max() <= 1.0
    # Slice k is the axial plane image[:, :, k]: the box only shows on slices 1 and 2.
    assert [bool((s > 0.5).any()) for s in slices] == [False, True, True, False, False]
    # Percentile normalisation maps the dark background near 0 and the bright box near 1.
    assert slices[0].max() < 0.1 and slices[1, 7:15, 6:14].min() > 0.9
    wider = preprocess_volume(image, tiny_config(**{"data.image_size": 14}))
    assert wider.shape == (5, 14, 14)


def test_segment_canonical_finds_the_box_on_the_native_grid():
    image, truth = _box_image()
    mask = segment_canonical(Threshold(), tiny_config(), image)
    assert mask.shape == image.shape and mask.dtype == bool
    assert _dice(mask, truth) > 0.95
    assert mask[12:32, 8:22, 1:3].all()  # the box, one or two native voxels in from its edges
    outside = np.ones_like(truth)
    outside[8:36, 4:26, 1:3] = False
    assert not mask[outside].any()


def test_segment_canonical_does_not_depend_on_the_batch_size():
    image, _ = _box_image()
    ref = segment_canonical(Threshold(), tiny_config(), image, batch_size=16)
    np.testing.assert_array_equal(segment_canonical(Threshold(), tiny_config(), image, batch_size=2), ref)


def test_largest_cc_drops_the_smaller_blob_only_when_asked():
    big = (slice(8, 32), slice(8, 30), slice(1, 4))
    small = (slice(44, 52), slice(34, 40), slice(1, 3))
    image, truth = _box_image(boxes=(big, small))
    both = segment_canonical(Threshold(), tiny_config(), image)
    assert both[big].any() and both[small].any()
    kept = segment_canonical(Threshold(), tiny_config(), image, largest_cc=True)
    assert kept[big].any() and not kept[small].any()
    np.testing.assert_array_equal(kept[big], both[big])


def test_a_blank_volume_gives_an_empty_mask_even_with_largest_cc():
    blank = np.full((30, 30, 3), 7.0, np.float32)
    mask = segment_canonical(Threshold(), tiny_config(), blank, largest_cc=True)
    assert mask.shape == blank.shape and not mask.any()


# ------------------------------------------------------------------------------------------------ files


def test_predict_file_writes_the_mask_in_the_files_own_orientation_and_header(tmp_path):
    canonical, _ = _box_image()
    expected = _to_stored(segment_canonical(Threshold(), tiny_config(), canonical))
    img = nib.Nifti1Image(_to_stored(canonical), STORED_AFFINE)
    img.header["descrip"] = b"scan 7"
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(STORED_AFFINE, code=1)
    img.header.set_sform(STORED_AFFINE, code=2)
    src = tmp_path / "scan.nii.gz"
    nib.save(img, src)

    row = predict_file(Threshold(), tiny_config(), src, tmp_path / "out" / "mask.nii.gz")
    out = nib.load(tmp_path / "out" / "mask.nii.gz")
    mask = np.asarray(out.dataobj)
    assert out.shape == img.shape == (5, 42, 56) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_allclose(out.affine, STORED_AFFINE)
    assert out.header["descrip"].item() == b"scan 7" and out.header.get_xyzt_units() == ("mm", "sec")
    assert int(out.header["sform_code"]) == 2 and out.header.get_zooms() == pytest.approx((2.5, 0.9, 0.8))
    assert row == {
        "input": str(src),
        "output": str(tmp_path / "out" / "mask.nii.gz"),
        "la_volume_ml": pytest.approx(expected.sum() * 2.5 * 0.9 * 0.8 / 1000),
    }


@pytest.mark.parametrize("src_name,dst_name", [("scan.nrrd", "mask.nrrd"), ("scan.nii.gz", "mask.nrrd"),
                                               ("scan.nrrd", "mask.nii")])  # fmt: skip
def test_predict_file_keeps_the_grid_across_formats(tmp_path, src_name, dst_name):
    canonical, truth = _box_image()
    write_volume(tmp_path / src_name, _to_stored(canonical), STORED_AFFINE)
    predict_file(Threshold(), tiny_config(), tmp_path / src_name, tmp_path / dst_name)
    out = read_volume(tmp_path / dst_name, label=True)
    assert out.data.shape == (5, 42, 56) and out.data.dtype == np.uint8
    np.testing.assert_allclose(out.affine, STORED_AFFINE, atol=1e-6)
    assert _dice(out.data.astype(bool), _to_stored(truth)) > 0.95


def test_real_model_file_and_array_predictions_agree(model_folder, tmp_path):
    import lasegseg

    predictor = lasegseg.load_model(model_folder, device="cpu")
    canonical, _ = _box_image(shape=(36, 30, 4), boxes=((slice(8, 24), slice(6, 20), slice(1, 3)),))
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(_to_stored(canonical), STORED_AFFINE), src)
    predict_file(predictor.model, predictor.config, src, tmp_path / "a.nii.gz", batch_size=16)
    predict_file(predictor.model, predictor.config, src, tmp_path / "b.nii.gz", batch_size=1)
    a, b = (np.asarray(nib.load(tmp_path / n).dataobj) for n in ("a.nii.gz", "b.nii.gz"))
    assert a.shape == (4, 30, 36)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a.astype(bool), predictor.predict_volume(_to_stored(canonical), affine=STORED_AFFINE))


def _nan(path):
    data = np.ones((8, 8, 3), np.float32)
    data[2, 3, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def _inf(path):
    data = np.ones((8, 8, 3), np.float32)
    data[0, 0, 0] = -np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def _truncated(path):
    blob = gzip.compress(nib.Nifti1Image(np.ones((16, 16, 8), np.float32), np.eye(4)).to_bytes(), mtime=0)
    path.write_bytes(blob[: len(blob) // 2])


def _flat(path):
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), path)


@pytest.mark.parametrize(
    "name,make,needle",
    [
        ("nan.nii.gz", _nan, "NaN or infinite voxels"),
        ("inf.nii.gz", _inf, "NaN or infinite voxels"),
        ("cut.nii.gz", _truncated, "gzip"),
        ("flat.nii.gz", _flat, "3D"),
        ("missing.nii.gz", None, "missing file"),
        ("scan.mha", lambda p: p.write_bytes(b"x"), "unsupported file type"),
    ],
)
def test_bad_input_fails_with_one_line_naming_the_file_and_writes_nothing(tmp_path, name, make, needle):
    src = tmp_path / name
    if make is not None:
        make(src)
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        predict_file(Threshold(), tiny_config(), src, out / "mask.nii.gz")
    message = str(err.value)
    assert message.startswith(str(src)) and needle in message and "\n" not in message
    assert not out.exists()


@pytest.mark.parametrize(
    "out,single,expected",
    [
        ("masks/m.nii.gz", True, "masks/m.nii.gz"),
        ("masks/m.nii", True, "masks/m.nii"),
        ("masks/m.nrrd", True, "masks/m.nrrd"),
        ("masks", True, "masks/la_001.nii.gz"),
        ("masks", False, "masks/la_001.nii.gz"),
        ("masks/m.nii.gz", False, "masks/m.nii.gz/la_001.nii.gz"),
    ],
)
def test_output_path_is_the_named_file_for_one_input_else_a_file_in_the_folder(tmp_path, out, single, expected):
    assert output_path_for(tmp_path / "in" / "la_001.nii.gz", tmp_path / out, single) == tmp_path / expected


@pytest.mark.parametrize("backbone", ["tiny", "tiny-dinov3"])
def test_a_saved_model_of_every_tiny_family_predicts_from_a_fresh_cache(backbone, tmp_path, monkeypatch):
    """The model folder names its backbone; a machine without the tiny weights recreates them, the fingerprint in
    the checkpoint matches, and the mask comes back on the input grid."""
    import lasegseg
    from lasegseg.models.families import backbone_family
    from lasegseg.models.segmenter import build_segmenter
    from lasegseg.train.checkpoint import save_model

    patch = backbone_family("dinov3" if backbone == "tiny-dinov3" else "dinov2").patch_size
    cfg = tiny_config(**{"model.backbone": backbone, "model.mode": "lora", "data.image_size": 2 * patch})
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path / "train-cache"))
    torch.manual_seed(0)
    folder = save_model(build_segmenter(cfg.model), cfg, tmp_path / "model")
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path / "predict-cache"))
    predictor = lasegseg.load_model(folder, device="cpu")
    assert predictor.config.model.backbone == backbone and predictor.model.backbone.patch_size == patch
    canonical, _ = _box_image(shape=(36, 30, 4), boxes=((slice(8, 24), slice(6, 20), slice(1, 3)),))
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(_to_stored(canonical), STORED_AFFINE), src)
    predict_file(predictor.model, predictor.config, src, tmp_path / "mask.nii.gz")
    mask = np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj)
    assert mask.shape == (4, 30, 36) and set(np.unique(mask)) <= {0, 1}
