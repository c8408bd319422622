"""The slice cache's files on disk: their names and Arrow schemas, shared by the writer and the reader.

Layout of ``<cache_dir>/<key>/``::

    slices.arrow   one record batch, one row per axial slice (case order, then slice order):
                   case_id string, case_index int32, slice_index int32,
                   image fixed_size_list<float16>[S*S], label fixed_size_binary[S*S] (uint8 0/1), has_fg bool
    cases.arrow    one row per case: case_id, case_index, first_row, num_slices, native_shape int32[3],
                   spacing float64[3], affine float64[16] (canonical, row-major),
                   native_label large_binary (np.packbits of the C-ordered bool (X, Y, Z) label)
    manifest.json  version, key, params, case list, row count, and bytes + sha256 of both arrow files

The format version is :data:`lasegseg.data.fingerprint.CACHE_VERSION` (part of every key).
"""

from __future__ import annotations

import pyarrow as pa

SLICES_FILE = "slices.arrow"
CASES_FILE = "cases.arrow"
MANIFEST_FILE = "manifest.json"


def slices_schema(image_size: int) -> pa.Schema:
    """The schema of ``slices.arrow`` for slices of ``image_size`` x ``image_size`` pixels."""
    s2 = image_size * image_size
    return pa.schema(
        [
            pa.field("case_id", pa.string(), nullable=False),
            pa.field("case_index", pa.int32(), nullable=False),
            pa.field("slice_index", pa.int32(), nullable=False),
            pa.field("image", pa.list_(pa.field("item", pa.float16(), nullable=False), s2), nullable=False),
            pa.field("label", pa.binary(s2), nullable=False),
            pa.field("has_fg", pa.bool_(), nullable=False),
        ]
    )


CASES_SCHEMA = pa.schema(
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("case_index", pa.int32(), nullable=False),
        pa.field("first_row", pa.int64(), nullable=False),
        pa.field("num_slices", pa.int32(), nullable=False),
        pa.field("native_shape", pa.list_(pa.int32(), 3), nullable=False),
        pa.field("spacing", pa.list_(pa.float64(), 3), nullable=False),
        pa.field("affine", pa.list_(pa.float64(), 16), nullable=False),
        pa.field("native_label", pa.large_binary(), nullable=False),
    ]
)
"""The schema of ``cases.arrow``."""
