"""One case as the slice cache stores it: preprocessed arrays and a packed native label, or the message of what
makes the case unusable (lasegseg.data.cache_prepare)."""

from __future__ import annotations

import numpy as np
import pytest

from lasegseg.data import layouts
from lasegseg.data.cache_prepare import Prepared, prepare_case
from lasegseg.data.preprocess import preprocess_case
from lasegseg.data.types import LoadedCase
from tests.data.conftest import PREP, write_generic


def test_a_loaded_case_is_preprocessed_and_its_native_label_packed(cases):
    case = cases[2]
    prep = prepare_case(case, PREP, check_only=False)
    images, labels = preprocess_case(case, PREP)
    assert (prep.case_id, prep.where) == ("c", "case 'c'")
    assert np.array_equal(prep.images, images) and np.array_equal(prep.labels, labels)
    assert prep.images.flags.c_contiguous and prep.labels.flags.c_contiguous
    assert np.array_equal(prep.has_fg, labels.reshape(len(labels), -1).any(1))
    assert prep.native_shape == list(case.label.shape) and prep.spacing == pytest.approx(list(case.spacing))
    assert prep.affine == case.affine.ravel().tolist()
    unpacked = np.unpackbits(np.frombuffer(prep.native_label, np.uint8), count=case.label.size)
    assert np.array_equal(unpacked.reshape(case.label.shape).view(bool), case.label)


def test_check_only_returns_the_case_without_arrays(cases):
    assert prepare_case(cases[1], PREP, check_only=True) == Prepared("b", "case 'b'")


def _bad(image_shape, label_shape, affine=None, spacing=(1.0, 1.0, 1.0)) -> LoadedCase:
    affine = np.eye(4) if affine is None else affine
    return LoadedCase("x", np.zeros(image_shape, np.float32), np.zeros(label_shape, bool), affine, spacing)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (_bad((4, 4, 3), (4, 4, 2)), "case 'x': image (4, 4, 3) and label (4, 4, 2) must be the same 3D shape"),
        (_bad((4, 4), (4, 4)), "case 'x': image (4, 4) and label (4, 4) must be the same 3D shape"),
        (_bad((4, 0, 3), (4, 0, 3)), "case 'x': empty volume (4, 0, 3)"),
        (_bad((4, 4, 3), (4, 4, 3), affine=np.eye(3)), "case 'x': affine must be 4x4 and spacing 3 values"),
        (_bad((4, 4, 3), (4, 4, 3), spacing=(1.0, 1.0)), "case 'x': affine must be 4x4 and spacing 3 values"),
    ],
)
def test_a_bad_case_comes_back_as_its_message(case, message):
    assert prepare_case(case, PREP, check_only=False) == message
    assert prepare_case(case, PREP, check_only=True) == message


def test_a_listed_case_is_read_from_its_files_and_named_by_its_image(tmp_path, cases):
    root = write_generic(tmp_path, cases[:1])
    listed = layouts.list_cases(root, "generic")[0]
    prep = prepare_case(listed, PREP, check_only=False)
    assert prep.where == f"case 'a' ({listed.image_path})"
    assert np.array_equal(prep.labels, preprocess_case(cases[0], PREP)[1])
    listed.label_path.write_bytes(b"not a nifti")
    message = prepare_case(listed, PREP, check_only=False)
    assert isinstance(message, str) and message.startswith(f"{listed.label_path}: ")
