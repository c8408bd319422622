"""The slice cache's file names and Arrow schemas, and that a built cache has exactly them
(lasegseg.data.cache_format)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.ipc as ipc

from lasegseg.data.cache_format import CASES_FILE, CASES_SCHEMA, MANIFEST_FILE, SLICES_FILE, slices_schema
from lasegseg.data.cache_write import build_cache
from tests.data.conftest import PREP, SIZE


def test_slices_schema_holds_one_flattened_slice_per_row():
    schema = slices_schema(4)
    assert schema.names == ["case_id", "case_index", "slice_index", "image", "label", "has_fg"]
    assert schema.field("image").type == pa.list_(pa.field("item", pa.float16(), nullable=False), 16)
    assert schema.field("label").type == pa.binary(16)
    assert schema.field("case_index").type == schema.field("slice_index").type == pa.int32()
    assert not any(field.nullable for field in schema)
    assert not slices_schema(4).equals(slices_schema(5))


def test_cases_schema_holds_the_native_grid_of_each_case():
    assert CASES_SCHEMA.names == [
        "case_id", "case_index", "first_row", "num_slices", "native_shape", "spacing", "affine", "native_label",
    ]  # fmt: skip
    sizes = [CASES_SCHEMA.field(name).type.list_size for name in ("native_shape", "spacing", "affine")]
    assert sizes == [3, 3, 16]
    assert CASES_SCHEMA.field("first_row").type == pa.int64()
    assert CASES_SCHEMA.field("native_label").type == pa.large_binary()


def test_a_built_cache_has_exactly_these_files_and_schemas(tmp_path, cases):
    path = build_cache(cases, tmp_path, "k1", PREP)
    assert sorted(p.name for p in path.iterdir()) == sorted([SLICES_FILE, CASES_FILE, MANIFEST_FILE])
    with pa.memory_map(str(path / SLICES_FILE)) as source:
        assert ipc.open_file(source).schema.equals(slices_schema(SIZE))
    with pa.memory_map(str(path / CASES_FILE)) as source:
        assert ipc.open_file(source).schema.equals(CASES_SCHEMA)
