"""Shared data for the data tests: small in-memory cases and fake datasets for the slice cache, and one small
phantom per dataset layout for the layout and validation tests."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from lasegseg.data import cache_workers
from lasegseg.data.cache import get_or_build_cache
from lasegseg.data.cache_read import SliceCache
from lasegseg.data.phantom import PHANTOM_LAYOUTS, write_phantom
from lasegseg.data.preprocess import Preprocessing
from lasegseg.data.types import Case, LoadedCase

SIZE = 28
PREP = Preprocessing(SIZE, 0.5, 99.5)
SHAPES = {"a": (32, 30, 6), "b": (24, 24, 5), "c": (40, 20, 7)}
MANY = {"a": (32, 30, 6), "b": (24, 24, 5), "c": (40, 20, 7), "d": (20, 28, 4), "e": (36, 36, 8), "f": (26, 22, 5)}
# Coarse grid over the same field of view: the whole heart, a few thousand voxels, fast to write and read.
SMALL = {"shape": (40, 40, 16), "spacing": (3.0, 3.0, 6.0)}


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
def many_cases() -> list[LoadedCase]:
    """Six cases of different sizes: more than two workers hold at once, finishing out of order."""
    return [make_case(cid, shape, seed) for seed, (cid, shape) in enumerate(MANY.items())]


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


def write_generic(tmp_path, cases):
    """``cases`` as a generic-layout NIfTI dataset (images/ + labels/); returns its folder."""
    nib = pytest.importorskip("nibabel")
    root = tmp_path / "generic"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for c in cases:
        nib.save(nib.Nifti1Image(c.image, c.affine), root / "images" / f"{c.case_id}.nii.gz")
        nib.save(nib.Nifti1Image(c.label.astype(np.uint8), c.affine), root / "labels" / f"{c.case_id}.nii.gz")
    return root


def cache_files(path: Path) -> tuple[dict[str, bytes], dict]:
    """Every file of a cache folder, and its manifest without the fields that say when and by whom it was built."""
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    manifest = json.loads(files.pop("manifest.json"))
    assert set(manifest.pop("builder")) == {"host", "pid"} and manifest.pop("created")
    return files, manifest


@pytest.fixture(params=["processes", "threads"])
def pool_kind(request, monkeypatch):
    """Build with worker processes (lasegseg's own entry points) or threads (a Ray worker, a user's script)."""
    monkeypatch.setattr(cache_workers, "processes_are_safe", lambda: request.param == "processes")
    yield request.param
    assert not multiprocessing.active_children()  # every pool is gone
    assert not [t for t in threading.enumerate() if t.name.startswith("slice-cache")]


def _phantom(root: Path, layout: str, cases: int = 3) -> Path:
    write_phantom(root, cases=cases, seed=3, layout=layout, **SMALL)
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """One small phantom per layout, written once; tests that modify a dataset copy it first."""
    base = tmp_path_factory.mktemp("datasets")
    return {layout: _phantom(base / layout, layout) for layout in PHANTOM_LAYOUTS}


def copy_dataset(datasets: dict[str, Path], layout: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(datasets[layout], tmp_path / layout))


def truncate(path: Path) -> None:
    """Cut a file in half."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


# A voxel → RAS+ matrix with a flipped x axis, and volumes to write with it.
AFFINE = np.array([[-1.25, 0, 0, 40.0], [0, 1.25, 0, -30.0], [0, 0, 2.5, 12.5], [0, 0, 0, 1]])


def volume_data(shape=(12, 10, 6), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def nrrd_header(space: str | None = "left-posterior-superior") -> dict:
    """NRRD space fields equal to AFFINE (RAS) in the given space."""
    signs = np.array([-1.0, -1.0, 1.0]) if space == "left-posterior-superior" else np.ones(3)
    header = {"space directions": (AFFINE[:3, :3] * signs[:, None]).T, "space origin": AFFINE[:3, 3] * signs}
    if space is not None:
        header["space"] = space
    return header
