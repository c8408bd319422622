from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import stat
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lasegseg.config import Config
from lasegseg.data import cache as cache_mod
from lasegseg.data import fingerprint as fingerprint_mod
from lasegseg.data.cache import SliceCache, build_cache, get_or_build_cache, open_cache
from lasegseg.data.fingerprint import CACHE_VERSION, cache_key, dataset_fingerprint
from lasegseg.data.preprocess import (
    Preprocessing,
    normalize_intensity,
    preprocess_case,
    preprocess_image,
    resize_back,
    resize_slices,
)
from lasegseg.data.types import Case, LoadedCase
from lasegseg.errors import ConfigError, DataError
from lasegseg.paths import cache_root

SIZE = 28
PREP = Preprocessing(SIZE, 0.5, 99.5)
SHAPES = {"a": (32, 30, 6), "b": (24, 24, 5), "c": (40, 20, 7)}


def make_case(case_id: str, shape: tuple[int, int, int], seed: int) -> LoadedCase:
    """An ellipsoid 'atrium' in noise; the first and last slices stay background."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    radii = np.array([shape[0] / 4, shape[1] / 4, shape[2] / 3])
    label = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) < 1
    label[:, :, [0, -1]] = False
    image = (100 + 80 * label + rng.normal(0, 10, shape)).astype(np.float32)
    spacing = (0.7 + 0.1 * seed, 0.8, 2.0)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = rng.normal(0, 50, 3)
    return LoadedCase(case_id, image, label, affine, spacing)


@pytest.fixture
def cases() -> list[LoadedCase]:
    return [make_case(cid, shape, seed) for seed, (cid, shape) in enumerate(SHAPES.items())]


@pytest.fixture
def dataset(tmp_path: Path, cases):
    """A fake dataset folder (one file pair per case, content derived from the arrays) and counting readers."""
    root = tmp_path / "data"
    for c in cases:
        (root / c.case_id).mkdir(parents=True)
        (root / c.case_id / "image.bin").write_bytes(c.image.tobytes())
        (root / c.case_id / "label.bin").write_bytes(np.packbits(c.label).tobytes())
    calls = []

    def list_cases(root: Path, layout: str) -> list[Case]:
        return [Case(d.name, d / "image.bin", d / "label.bin", "fake") for d in sorted(root.iterdir())]

    def load_cases(root: Path, layout: str):
        calls.append(layout)
        return iter(cases)

    return root, list_cases, load_cases, calls


def build(dataset, cache_dir: Path, image_size: int = SIZE, **kw) -> SliceCache:
    root, list_cases, load_cases, _ = dataset
    prep = Preprocessing(image_size, 0.5, 99.5)
    return get_or_build_cache(root, "fake", prep, cache_dir, list_cases=list_cases, load_cases=load_cases, **kw)


# --- preprocess ------------------------------------------------------------------------------------------------


def test_normalize_maps_percentiles_to_unit_range():
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 20, (30, 30, 10))
    vol[0, 0, 0] = 1e6  # an outlier must not squash the rest
    out = normalize_intensity(vol, 0.5, 99.5)
    assert out.dtype == np.float32 and out.shape == vol.shape
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.4 < np.median(out) < 0.6
    assert (out == 1.0).mean() == pytest.approx(0.005, abs=0.002)


def test_normalize_constant_and_non_finite():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not normalize_intensity(np.full((4, 5, 6), 7.0)).any()
    vol = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    vol[0, 0, 0] = np.nan
    vol[1, 1, 1] = np.inf
    out = normalize_intensity(vol, 0, 100)
    assert np.isfinite(out).all() and out[0, 0, 0] == 0 and out[1, 1, 1] == 0 and out.max() == 1.0


@pytest.mark.parametrize("size", [17, 28, 64])
def test_nearest_resize_keeps_labels(size):
    labels = np.random.default_rng(1).random((30, 22, 4)) > 0.6
    out = resize_slices(labels, size, order=0)
    assert out.shape == (size, size, 4) and out.dtype == bool
    as_int = resize_slices(labels.astype(np.uint8), size, order=0)
    assert as_int.dtype == np.uint8 and set(np.unique(as_int)) <= {0, 1}


def test_resize_back_recovers_smooth_volume():
    x, y, z = np.meshgrid(np.linspace(0, 1, 40), np.linspace(0, 1, 36), np.arange(3), indexing="ij")
    smooth = (np.sin(3 * x + z) * np.cos(2 * y) + 1) / 2
    up = resize_slices(smooth, 64, order=1)
    assert up.shape == (64, 64, 3) and up.dtype == np.float32
    back = resize_back(up, (40, 36), order=1)
    assert back.shape == smooth.shape
    assert np.abs(back - smooth).max() < 0.01
    assert np.array_equal(resize_slices(smooth, 64, order=1), up)  # deterministic


def test_resize_back_of_label_probabilities_keeps_the_mask():
    label = make_case("x", (50, 44, 5), 0).label
    prob = resize_slices(label.astype(np.float32), 28, order=1)
    mask = resize_back(prob, (50, 44)) > 0.5
    dice = 2 * (mask & label).sum() / (mask.sum() + label.sum())
    assert dice > 0.95
    # Pixel-centre alignment: the mask's centroid does not drift by half a pixel.
    assert np.allclose(np.argwhere(mask).mean(0), np.argwhere(label).mean(0), atol=0.3)


@pytest.mark.parametrize("shape_xy", [(17, 23), (64, 70), (40, 36)])
def test_linear_resize_matches_scipy_pixel_centre_resampling(shape_xy):
    ndimage = pytest.importorskip("scipy.ndimage")
    vol = np.random.default_rng(3).random((40, 36, 2)).astype(np.float32)
    scale = np.array([40 / shape_xy[0], 36 / shape_xy[1]])
    expected = np.stack(
        [
            ndimage.affine_transform(
                vol[:, :, k], scale, offset=0.5 * scale - 0.5, output_shape=shape_xy, order=1, mode="nearest"
            )
            for k in range(2)
        ],
        axis=2,
    )
    assert np.allclose(resize_back(vol, shape_xy, order=1), expected, atol=1e-5)


def test_resize_rejects_other_orders():
    with pytest.raises(ValueError, match="order"):
        resize_slices(np.zeros((4, 4, 1)), 8, order=3)


def test_resize_same_size_is_identity():
    vol = np.random.default_rng(2).random((12, 12, 3)).astype(np.float32)
    assert np.array_equal(resize_slices(vol, 12, order=1), vol)


def test_preprocess_case_shapes_and_ranges(cases):
    case = cases[2]
    images, labels = preprocess_case(case, PREP)
    z = case.image.shape[2]
    assert images.shape == labels.shape == (z, SIZE, SIZE)
    assert images.dtype == np.float16 and labels.dtype == np.uint8
    assert images.flags.c_contiguous and labels.flags.c_contiguous
    assert images.min() >= 0 and images.max() <= 1
    assert set(np.unique(labels)) == {0, 1}
    assert np.array_equal(labels.reshape(z, -1).any(1), case.label.reshape(-1, z).any(0))


def test_preprocess_image_equals_the_public_resize_route(cases):
    # Inference built from normalize_intensity + resize_slices must see exactly the cached training inputs.
    image = cases[0].image
    route = np.moveaxis(resize_slices(normalize_intensity(image, 1.0, 99.0), SIZE, order=1), 2, 0).astype(np.float16)
    assert np.array_equal(preprocess_image(image, Preprocessing(SIZE, 1.0, 99.0)), route)


def test_preprocessing_reads_back_from_a_config_and_its_flat_view():
    cfg = Config().replace(**{"data.image_size": 56, "data.clip_low": 1, "data.clip_high": 99})
    prep = Preprocessing.from_config(cfg)
    assert prep == Preprocessing.from_flat(cfg.to_flat()) == Preprocessing(56, 1.0, 99.0)
    assert prep.as_dict() == {"image_size": 56, "clip_low": 1.0, "clip_high": 99.0}
    assert type(prep.image_size) is int and type(prep.clip_low) is float
    assert len({prep, Preprocessing(np.int64(56), 1, 99)}) == 1  # hashable, numpy scalars normalised
    with pytest.raises(dataclasses.FrozenInstanceError):
        prep.image_size = 14
    with pytest.raises(KeyError, match="data.clip_high"):
        Preprocessing.from_flat({"data.image_size": 56, "data.clip_low": 1.0})


# --- cache: build and read -------------------------------------------------------------------------------------


def test_build_then_open_roundtrip(tmp_path, cases):
    path = build_cache(cases, tmp_path, "k1", PREP, meta={"layout": "fake"})
    assert sorted(p.name for p in path.iterdir()) == ["cases.arrow", "manifest.json", "slices.arrow"]
    assert [p.name for p in tmp_path.iterdir()] == ["k1"]  # no temporary folder left behind
    cache = SliceCache.open(path)
    expected = [preprocess_case(c, PREP) for c in cases]
    assert cache.key == "k1" and cache.image_size == SIZE and len(cache) == sum(c.image.shape[2] for c in cases)
    assert np.array_equal(cache.images, np.concatenate([e[0] for e in expected]))
    assert np.array_equal(cache.labels, np.concatenate([e[1] for e in expected]))
    assert cache.cases == cache.case_names == ["a", "b", "c"]
    assert list(cache.case_ids) == [c.case_id for c in cases for _ in range(c.image.shape[2])]
    assert np.array_equal(cache.slice_index, np.concatenate([np.arange(c.image.shape[2]) for c in cases]))
    assert np.array_equal(cache.has_fg, cache.labels.reshape(len(cache), -1).any(1))
    assert not cache.has_fg[0] and cache.has_fg[1]
    for c in cases:
        rows = cache.rows_for([c.case_id])
        assert np.array_equal(cache.case_ids[rows], [c.case_id] * c.image.shape[2])
        native = cache.native_label(c.case_id)
        assert native.dtype == bool and np.array_equal(native, c.label)
        assert cache.native_shape(c.case_id) == c.image.shape
        assert cache.spacing(c.case_id) == pytest.approx(c.spacing)
        assert np.array_equal(cache.affine(c.case_id), c.affine)
    assert np.array_equal(cache.rows_for(["c", "a"]), np.concatenate([cache.rows_for("a"), cache.rows_for("c")]))
    with pytest.raises(DataError, match="'zz'"):
        cache.rows_for(["zz"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == CACHE_VERSION and manifest["cases"] == ["a", "b", "c"]
    assert manifest["rows"] == manifest["files"]["slices.arrow"]["rows"] == len(cache)
    assert manifest["params"]["layout"] == "fake" and manifest["params"]["image_size"] == SIZE


def test_views_are_memory_mapped_and_read_only(tmp_path, cases):
    path = build_cache(cases, tmp_path, "k1", PREP)
    before = pa.total_allocated_bytes()
    cache = SliceCache.open(path)
    # Zero-copy: opening allocates nothing from Arrow's pool and the arrays do not own their memory.
    assert pa.total_allocated_bytes() - before < 1024
    for arr in (cache.images, cache.labels, cache.case_codes, cache.slice_index):
        assert not arr.flags.owndata and not arr.flags.writeable
        base = arr
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, pa.Buffer)
    assert np.shares_memory(cache.images[3], cache.images)
    with pytest.raises(ValueError):
        cache.images[0, 0, 0] = 1


def test_pickle_reopens_by_path(tmp_path, cases):
    cache = SliceCache.open(build_cache(cases, tmp_path, "k1", PREP))
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 1000
    assert clone.path == cache.path and np.array_equal(clone.images, cache.images)


def test_build_errors(tmp_path, cases):
    bad = make_case("bad", (10, 10, 3), 0)
    bad.label = bad.label[:, :, :2]
    with pytest.raises(DataError, match="'bad'"):
        build_cache([cases[0], bad], tmp_path, "k1", PREP)
    with pytest.raises(DataError, match="duplicate"):
        build_cache([cases[0], cases[0]], tmp_path, "k1", PREP)
    with pytest.raises(DataError, match="empty"):
        build_cache([], tmp_path, "k1", PREP)
    assert list(tmp_path.iterdir()) == []  # failed builds leave neither a cache nor a temporary folder


def test_concurrent_builders_keep_one_valid_cache(tmp_path, cases):
    first = build_cache(cases, tmp_path, "k1", PREP)
    manifest = (first / "manifest.json").read_text()
    assert build_cache(cases[:1], tmp_path, "k1", PREP) == first  # the loser discards its own build
    assert (first / "manifest.json").read_text() == manifest
    results, errors = [], []

    def run():
        try:
            results.append(build_cache(lambda: iter(cases), tmp_path, "k2", PREP))
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert len(SliceCache.open(results[0])) == len(SliceCache.open(first))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1", "k2"]


# --- cache: keys and reuse -------------------------------------------------------------------------------------


def test_second_run_reads_no_volume_and_rehashes_nothing(tmp_path, dataset, monkeypatch):
    root, _, _, calls = dataset
    first = build(dataset, tmp_path / "cache")
    assert calls == ["fake"]
    assert (tmp_path / "cache" / "file_hashes.json").is_file()
    hashed = []
    real = cache_mod.sha256_file
    for module in (cache_mod, fingerprint_mod):
        monkeypatch.setattr(module, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    second = build(dataset, tmp_path / "cache")
    assert calls == ["fake"]
    assert second.key == first.key and np.array_equal(second.images, first.images)
    assert not [p for p in hashed if root in p.parents]  # only the cache's own files were verified


@pytest.mark.faults
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, dataset, damage, caplog):
    _, _, _, calls = dataset
    good = build(dataset, tmp_path)
    images = np.array(good.images)
    slices = good.path / "slices.arrow"
    del good
    data = bytearray(slices.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    slices.write_bytes(bytes(data))
    with pytest.raises(DataError, match="slices.arrow"):
        SliceCache.open(slices.parent)
    with caplog.at_level(logging.WARNING, logger="lasegseg.data.cache"):
        rebuilt = build(dataset, tmp_path)
    assert calls == ["fake", "fake"]
    assert "slices.arrow" in caplog.text
    assert np.array_equal(rebuilt.images, images)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.faults
def test_damaged_manifest_is_detected(tmp_path, cases):
    path = build_cache(cases, tmp_path, "k1", PREP)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json"):
        SliceCache.open(path)
    shutil.rmtree(path)
    with pytest.raises(DataError, match="manifest.json"):
        SliceCache.open(path)


def test_key_depends_on_params_and_content(tmp_path, dataset):
    root, list_cases, _, calls = dataset
    small, large = build(dataset, tmp_path, image_size=14), build(dataset, tmp_path, image_size=SIZE)
    assert small.key != large.key and small.images.shape[1:] == (14, 14)
    fp = dataset_fingerprint(list_cases(root, ""), "fake", cache_dir=tmp_path)
    keys = {
        cache_key(fp, Preprocessing(SIZE, 0.5, 99.5), "fake"),
        cache_key(fp, Preprocessing(SIZE, 1.0, 99.5), "fake"),
        cache_key(fp, Preprocessing(SIZE, 0.5, 99.0), "fake"),
        cache_key(fp, Preprocessing(SIZE, 0.5, 99.5), "msd"),
        cache_key(fp, Preprocessing(14, 0.5, 99.5), "fake"),
    }
    assert len(keys) == 5 and large.key in keys
    # The same bytes elsewhere share the fingerprint; one changed byte does not.
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert dataset_fingerprint(list_cases(copy, ""), "fake", cache_dir=tmp_path) == fp
    label = copy / "b" / "label.bin"
    label.write_bytes(b"\x01" + label.read_bytes()[1:])
    assert dataset_fingerprint(list_cases(copy, ""), "fake", cache_dir=tmp_path) != fp
    assert dataset_fingerprint(list_cases(root, ""), "other", cache_dir=tmp_path) != fp


def test_keys_of_existing_caches_are_unchanged():
    # Computed with the (image_size, clip_low, clip_high) signature this replaced: old caches stay valid.
    fp = "0" * 64
    assert cache_key(fp, Preprocessing(448, 0.5, 99.5), "msd") == "837f6bf863fe92f7f1fc0727"
    assert cache_key(fp, Preprocessing(28, 1, 99), "generic") == "5acbb164ef152120e849907a"


def test_shared_cache_files_are_readable_like_the_arrow_files(tmp_path, dataset):
    old = os.umask(0o022)
    try:
        cache = build(dataset, tmp_path)
    finally:
        os.umask(old)
    for path in (cache.path / "slices.arrow", cache.path / "manifest.json", tmp_path / "file_hashes.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    params = json.loads((cache.path / "manifest.json").read_text())["params"]
    assert {k: params[k] for k in ("image_size", "clip_low", "clip_high")} == PREP.as_dict()


def test_fingerprint_of_paths_and_in_memory_cases(tmp_path, cases):
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    (root / "x.nii").write_bytes(b"x")
    (root / "sub" / "y.nii").write_bytes(b"y")
    fp = dataset_fingerprint(fingerprint_mod.dataset_files(root), cache_dir=tmp_path)
    assert fp == dataset_fingerprint([root / "sub" / "y.nii", str(root / "x.nii")], cache_dir=tmp_path)
    (root / "sub" / "y.nii").rename(root / "sub" / "z.nii")
    assert dataset_fingerprint(fingerprint_mod.dataset_files(root), cache_dir=tmp_path) != fp
    assert dataset_fingerprint(cases, cache_dir=tmp_path) == dataset_fingerprint(cases, cache_dir=tmp_path)
    changed = make_case("a", SHAPES["a"], 1)
    assert dataset_fingerprint([changed, *cases[1:]], cache_dir=tmp_path) != dataset_fingerprint(
        cases, cache_dir=tmp_path
    )
    with pytest.raises(DataError, match="missing.nii"):
        dataset_fingerprint([root / "missing.nii"], cache_dir=tmp_path)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path / "env"))
    assert cache_root() == cache_root("") == tmp_path / "env"
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("LASEGSEG_CACHE")
    assert cache_root() == Path(os.path.expanduser("~")) / ".cache" / "lasegseg"


def test_default_readers_build_from_a_nifti_dataset(tmp_path, cases, monkeypatch):
    nib = pytest.importorskip("nibabel")
    layouts = pytest.importorskip("lasegseg.data.layouts")
    root = tmp_path / "generic"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for c in cases:
        nib.save(nib.Nifti1Image(c.image, c.affine), root / "images" / f"{c.case_id}.nii.gz")
        nib.save(nib.Nifti1Image(c.label.astype(np.uint8), c.affine), root / "labels" / f"{c.case_id}.nii.gz")
    loads = []
    real = layouts.load_case
    monkeypatch.setattr(layouts, "load_case", lambda case: loads.append(case.case_id) or real(case))
    monkeypatch.setenv(cache_mod.WORKERS_ENV, "1")  # loads counted in this process
    first = get_or_build_cache(root, "generic", PREP, cache_dir=tmp_path / "cache")
    assert loads == ["a", "b", "c"] and first.cases == ["a", "b", "c"]
    for c in cases:
        assert np.array_equal(first.native_label(c.case_id), c.label)
    second = get_or_build_cache(root, "generic", PREP, cache_dir=tmp_path / "cache")
    assert loads == ["a", "b", "c"] and second.key == first.key


def _write_generic(tmp_path, cases):
    """``cases`` as a generic-layout NIfTI dataset (images/ + labels/); returns its folder."""
    nib = pytest.importorskip("nibabel")
    root = tmp_path / "generic"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for c in cases:
        nib.save(nib.Nifti1Image(c.image, c.affine), root / "images" / f"{c.case_id}.nii.gz")
        nib.save(nib.Nifti1Image(c.label.astype(np.uint8), c.affine), root / "labels" / f"{c.case_id}.nii.gz")
    return root


def test_open_cache_follows_the_config_and_resolves_auto(tmp_path, cases):
    root = _write_generic(tmp_path, cases)
    flat = {"data.path": str(root), "data.image_size": SIZE, "data.cache_dir": str(tmp_path / "cache")}
    cache = open_cache(Config().replace(**flat))
    assert cache.image_size == SIZE and cache.cases == ["a", "b", "c"]
    explicit = get_or_build_cache(root, "generic", PREP, tmp_path / "cache")
    assert explicit.key == cache.key  # "auto" and the detected layout share one cache
    assert open_cache(Config().replace(**flat, **{"data.layout": "generic"})).key == cache.key


def test_default_loader_reports_every_bad_file(tmp_path, cases):
    root = _write_generic(tmp_path, cases)
    for cid in ("a", "c"):
        (root / "labels" / f"{cid}.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=r"(?s)a\.nii\.gz.*c\.nii\.gz"):
        get_or_build_cache(root, "generic", PREP, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["file_hashes.json"]


# --- cache: parallel build -------------------------------------------------------------------------------------

MANY = {"a": (32, 30, 6), "b": (24, 24, 5), "c": (40, 20, 7), "d": (20, 28, 4), "e": (36, 36, 8), "f": (26, 22, 5)}


@pytest.fixture
def many_cases() -> list[LoadedCase]:
    """Six cases of different sizes: more than two workers hold at once, finishing out of order."""
    return [make_case(cid, shape, seed) for seed, (cid, shape) in enumerate(MANY.items())]


def _cache_files(path: Path) -> tuple[dict[str, bytes], dict]:
    """Every file of a cache folder, and its manifest without the fields that say when and by whom it was built."""
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    manifest = json.loads(files.pop("manifest.json"))
    assert set(manifest.pop("builder")) == {"host", "pid"} and manifest.pop("created")
    return files, manifest


@pytest.fixture(params=["processes", "threads"])
def pool_kind(request, monkeypatch):
    """Build with worker processes (lasegseg's own entry points) or threads (a Ray worker, a user's script)."""
    monkeypatch.setattr(cache_mod, "processes_are_safe", lambda: request.param == "processes")
    yield request.param
    assert not multiprocessing.active_children()  # every pool is gone
    assert not [t for t in threading.enumerate() if t.name.startswith("slice-cache")]


@pytest.mark.parametrize("source", ["arrays", "files"])
def test_two_workers_build_the_same_bytes_as_one(tmp_path, many_cases, source, pool_kind):
    root = _write_generic(tmp_path, many_cases) if source == "files" else None
    paths = {}
    for workers in (1, 2):
        if root is None:
            paths[workers] = build_cache(many_cases, tmp_path / f"c{workers}", "k1", PREP, workers=workers)
        else:  # the default readers: the workers read the NIfTI files themselves
            paths[workers] = get_or_build_cache(root, "generic", PREP, tmp_path / f"c{workers}", workers=workers).path
    assert paths[1].name == paths[2].name  # the same key
    (files1, manifest1), (files2, manifest2) = _cache_files(paths[1]), _cache_files(paths[2])
    assert sorted(files1) == ["cases.arrow", "slices.arrow"]
    assert files1 == files2 and manifest1 == manifest2
    assert manifest1["cases"] == list(MANY)
    assert sorted(p.name for p in paths[2].parent.iterdir() if p.name.startswith(".")) == []


def test_default_worker_count_starts_a_pool_only_for_slow_cases(tmp_path, many_cases, monkeypatch):
    monkeypatch.delenv(cache_mod.WORKERS_ENV, raising=False)
    serial = build_cache(many_cases, tmp_path / "serial", "k1", PREP, workers=1)
    pools = []
    real_pool = cache_mod._pool
    monkeypatch.setattr(cache_mod, "_pool", lambda n: pools.append(n) or real_pool(n))
    build_cache(many_cases, tmp_path / "quick", "k1", PREP)  # tiny cases: quicker inline than any pool
    assert pools == []
    monkeypatch.setattr(cache_mod, "_PARALLEL_AFTER_S", 0.0)
    monkeypatch.setattr(cache_mod, "_usable_cores", lambda: 2)  # a pool even on a one-core runner
    parallel = build_cache(many_cases, tmp_path / "slow", "k1", PREP)  # the first case inline, the rest in the pool
    assert pools == [2] == [cache_mod.cache_workers()]
    assert _cache_files(parallel) == _cache_files(serial)


@pytest.mark.parametrize("bad", [["b"], ["b", "f"]])
def test_bad_cases_fail_the_same_under_two_workers_and_leave_nothing(tmp_path, many_cases, bad, pool_kind):
    root = _write_generic(tmp_path, many_cases)
    for cid in bad:
        (root / "labels" / f"{cid}.nii.gz").write_bytes(b"not a nifti")
    messages = []
    for workers in (1, 2):
        cache_dir = tmp_path / f"cache{workers}"
        with pytest.raises(DataError) as err:
            get_or_build_cache(root, "generic", PREP, cache_dir, workers=workers)
        messages.append(str(err.value))
        assert [p.name for p in cache_dir.iterdir()] == ["file_hashes.json"]  # no cache, no temporary folder
    assert messages[0] == messages[1]
    # Every bad file is named (the cases after the first bad one are still checked), and nothing else.
    named = [line for line in messages[1].splitlines() if ".nii.gz" in line]
    assert len(named) == len(bad)
    assert all(str(root / "labels" / f"{cid}.nii.gz") in line for cid, line in zip(bad, named, strict=True))
    assert len(messages[1].splitlines()) == (1 if len(bad) == 1 else 1 + len(bad))


@pytest.mark.parametrize(
    ("spec", "file", "safe"),
    [
        (None, "/opt/venv/lib/python3.11/site-packages/ray/_private/workers/default_worker.py", False),  # no guard
        (None, "/home/me/my_script.py", False),  # a user's script may not guard its work
        (None, "/repo/sweeps/fewshot.py", True),
        (None, "/repo/.venv/bin/lasegseg", True),  # the console script
        (None, None, True),  # python -c, a notebook: no main file to run again
        ("lasegseg.cli", "/repo/lasegseg/cli.py", True),
        ("pytest.__main__", "/venv/pytest/__main__.py", True),  # multiprocessing never re-runs a package's __main__
        ("mytool", "/venv/mytool.py", False),
    ],
)
def test_worker_processes_only_where_the_main_module_may_run_again(monkeypatch, spec, file, safe):
    import types

    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name=spec) if spec else None
    if file is not None:
        main.__file__ = file
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert cache_mod.processes_are_safe() is safe


def test_bad_array_case_under_two_workers(tmp_path, many_cases):
    bad = make_case("bad", (10, 10, 3), 0)
    bad.label = bad.label[:, :, :2]
    with pytest.raises(DataError, match=r"^case 'bad': image \(10, 10, 3\) and label \(10, 10, 2\)"):
        build_cache([*many_cases[:3], bad, *many_cases[3:]], tmp_path, "k1", PREP, workers=2)
    with pytest.raises(DataError, match=r"^case 'a': duplicate case id$"):
        build_cache([*many_cases, many_cases[0]], tmp_path, "k1", PREP, workers=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5", "2x"])
def test_worker_count_from_the_environment_is_validated(tmp_path, many_cases, monkeypatch, value):
    monkeypatch.setenv(cache_mod.WORKERS_ENV, value)
    with pytest.raises(ConfigError, match=rf"^LASEGSEG_CACHE_WORKERS must be .* got '{re.escape(value)}'$"):
        build_cache(many_cases, tmp_path / "c", "k1", PREP)
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_worker_count_keyword_then_environment_then_cores(monkeypatch):
    monkeypatch.delenv(cache_mod.WORKERS_ENV, raising=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cache_mod.cache_workers() == cores
    monkeypatch.setenv(cache_mod.WORKERS_ENV, " 3 ")
    assert cache_mod.cache_workers() == 3 and cache_mod.cache_workers(1) == 1
    for bad in (0, True, 2.0):
        with pytest.raises(ConfigError, match="workers"):
            cache_mod.cache_workers(bad)
