"""Hostile and malformed input through the real entry points: one clear line, no traceback, bounded memory, no
writes outside the output folder.

Every input is generated here (nibabel / pynrrd writes, then bytes patched). Each corpus case runs the command a
user would run (``lasegseg check``, ``train``, ``predict``, ``sweeps/fewshot.py --dry-run``) in-process; a few run
as real subprocesses under an address-space cap to prove the exit code, the clean stderr and that no header can
make the reader allocate gigabytes.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import resource
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lasegseg import cli
from lasegseg.data.io import read_volume
from lasegseg.data.validate import validate_dataset
from lasegseg.errors import DataError
from lasegseg.sweep import runner
from lasegseg.sweep.spec import MAX_TRIALS

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
SHAPE = (8, 8, 4)
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
# Reading any file of the corpus may not trace more than this (numpy and Python allocations both count).
PEAK_BYTES = 16 * 1024**2
# Address-space cap of the subprocess runs: Python with numpy and nibabel needs under 512 MiB, and the corpus
# asks for 768 MiB (a missing payload), 1 GiB (an extension) and terabytes (dims) that must never be reserved.
CAP_BYTES = 1024**3

# NIfTI-1 header offsets (little endian as nibabel writes on x86/arm).
DIM, DATATYPE, PIXDIM, VOX_OFFSET, SROW_X = 40, 70, 76, 108, 280


# ------------------------------------------------------------------------------------------------ volume makers


def _image(shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(0).normal(100, 20, shape).astype(np.float32)


def _label(shape=SHAPE, values=(1,)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    for i, v in enumerate(values):
        lab[2 + i, 2:5, 1:3] = v
    return lab


def _nifti_bytes(data: np.ndarray, affine: np.ndarray = AFFINE) -> bytearray:
    return bytearray(nib.Nifti1Image(data, affine).to_bytes())


def _write(path: Path, blob: bytes | bytearray, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(bytes(blob), mtime=0) if gz else bytes(blob))
    return path


def _negative_dim(d: Path) -> Path:
    b = _nifti_bytes(_image())
    struct.pack_into("<h", b, DIM + 2, -4)
    return _write(d / "c1.nii", b)


def _terabyte_dims(d: Path) -> Path:
    # NIfTI-2 stores 64-bit dims: 2**15 per axis of int16 is 64 TiB, behind a few hundred gzip bytes.
    hdr = nib.Nifti2Header()
    hdr.set_data_shape((2**15,) * 3)
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 544
    return _write(d / "c1.nii.gz", hdr.binaryblock + b"\0" * 4 + b"\1" * 64, gz=True)


def _datatype_2048(d: Path) -> Path:
    b = _nifti_bytes(_image())
    struct.pack_into("<hh", b, DATATYPE, 2048, 256)  # complex256: no numpy scalar we accept
    return _write(d / "c1.nii", b)


def _complex(d: Path) -> Path:
    return _write(d / "c1.nii.gz", _nifti_bytes(_image().astype(np.complex64)), gz=True)


def _rgb(d: Path) -> Path:
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return _write(d / "c1.nii.gz", _nifti_bytes(rgb), gz=True)


def _truncated_gzip(d: Path) -> Path:
    full = gzip.compress(bytes(_nifti_bytes(_image((32, 32, 16)))), mtime=0)
    return _write(d / "c1.nii.gz", full[: len(full) // 2])


def _garbage_gzip(d: Path) -> Path:
    return _write(d / "c1.nii.gz", b"\x1f\x8b\x08\x00" + np.random.default_rng(1).bytes(4096))


def _zero_bytes(d: Path) -> Path:
    return _write(d / "c1.nii.gz", b"")


def _extension_bomb(d: Path) -> Path:
    # One extension claiming 1 GiB: nibabel would read(2**30) whatever the file holds.
    b = _nifti_bytes(_image())
    struct.pack_into("<f", b, VOX_OFFSET, 368.0)
    blob = b[:348] + b"\1\0\0\0" + struct.pack("<ii", 2**30, 4) + b"\0" * 8 + b[352:]
    return _write(d / "c1.nii.gz", blob, gz=True)


def _gigabyte_claim(d: Path) -> Path:
    # A plausible 768 MiB volume (1024 x 1024 x 384 int16) whose data is simply not there.
    b = _nifti_bytes(np.zeros(SHAPE, np.int16))
    struct.pack_into("<4h", b, DIM, 3, 1024, 1024, 384)
    return _write(d / "c1.nii.gz", b, gz=True)


def _nan_zooms(d: Path) -> Path:
    b = _nifti_bytes(_image())
    struct.pack_into("<3f", b, PIXDIM + 4, float("nan"), float("nan"), float("nan"))
    struct.pack_into("<f", b, SROW_X, float("nan"))
    return _write(d / "c1.nii", b)


def _inf_voxels(d: Path) -> Path:
    data = _image()
    data[1, 2, 3], data[4, 4, 0] = np.inf, np.nan
    return _write(d / "c1.nii", _nifti_bytes(data))


def _image_2d(d: Path) -> Path:
    return _write(d / "c1.nii.gz", _nifti_bytes(_image()[:, :, 0]), gz=True)


def _image_5d(d: Path) -> Path:
    return _write(d / "c1.nii.gz", _nifti_bytes(np.zeros((*SHAPE, 2, 2), np.float32)), gz=True)


def _nrrd_text(d: Path, fields: str, payload: bytes = b"") -> Path:
    return _write(d / "c1.nrrd", f"NRRD0004\n{fields}\n\n".encode() + payload)


def _nrrd_negative_sizes(d: Path) -> Path:
    return _nrrd_text(d, "type: short\ndimension: 3\nsizes: -3 4 4\nencoding: raw", b"\0" * 128)


def _nrrd_absurd_sizes(d: Path) -> Path:
    return _nrrd_text(d, "type: float\ndimension: 3\nsizes: 100000 100000 100000\nencoding: raw", b"\0" * 128)


def _nrrd_block(d: Path) -> Path:
    return _nrrd_text(d, "type: block\nblock size: 4\ndimension: 3\nsizes: 4 4 4\nencoding: raw", b"\0" * 256)


def _nrrd_gzip_bomb(d: Path) -> Path:
    # 64 voxels declared, 64 MiB inside ~64 KiB of gzip: pynrrd would inflate all of it before comparing.
    bomb = gzip.compress(b"\0" * 64 * 1024**2, compresslevel=9, mtime=0)
    return _nrrd_text(d, "type: uchar\ndimension: 3\nsizes: 4 4 4\nencoding: gzip", bomb)


def _nrrd_detached_outside(d: Path) -> Path:
    (d.parent.parent / "outside.raw").write_bytes(b"\0" * 64)
    return _nrrd_text(d, "type: uchar\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: ../../outside.raw")


VOLUMES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "nifti negative dim[1]": (_negative_dim, "zero or negative dimension"),
    "nifti 2**15 cubed (64 TiB), gz": (_terabyte_dims, "limit 2 GiB"),
    "nifti datatype 2048": (_datatype_2048, "data code 2048"),
    "nifti complex64": (_complex, "unsupported voxel type complex64"),
    "nifti RGB24": (_rgb, "unsupported voxel type"),
    "nifti.gz truncated mid-stream": (_truncated_gzip, "truncated or corrupt gzip"),
    "gzip magic then garbage": (_garbage_gzip, "truncated or corrupt gzip"),
    "zero-byte file": (_zero_bytes, "empty file"),
    "nifti extension of 1 GiB": (_extension_bomb, "does not fit before the data"),
    "nifti 768 MiB claimed, 1 KiB given": (_gigabyte_claim, "gzip bytes can hold"),
    "nifti NaN zooms and sform": (_nan_zooms, "singular or not finite"),
    "nifti 2D": (_image_2d, "expected a 3D volume"),
    "nifti 5D": (_image_5d, "expected a 3D volume"),
    "nrrd sizes -3": (_nrrd_negative_sizes, "zero or negative dimension"),
    "nrrd absurd sizes": (_nrrd_absurd_sizes, "GiB"),
    "nrrd type block": (_nrrd_block, "unsupported NRRD type 'block'"),
    "nrrd gzip bomb": (_nrrd_gzip_bomb, "compressed data holds more"),
    "nrrd data file ../../outside.raw": (_nrrd_detached_outside, "points outside the folder"),
}


# ------------------------------------------------------------------------------------------------ corpus


@dataclass(frozen=True)
class Hostile:
    """One corpus case: ``build(src, out) -> (argv, names)``; the message must hold ``needle`` and every name."""

    driver: str  # "cli" (lasegseg.cli.main) or "sweep" (sweeps/fewshot.py's main)
    build: Callable[[Path, Path], tuple[list[str], list[str]]]
    needle: str


def _generic(
    src: Path, image: Callable[[Path], Path] | None = None, label: np.ndarray | None = None, label_affine=AFFINE
) -> Path:
    """A one-case generic dataset; ``image`` writes the (bad) image, otherwise a good one is written."""
    ds = src / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "labels").mkdir()
    if image is None:
        nib.save(nib.Nifti1Image(_image(), AFFINE), ds / "images" / "c1.nii.gz")
    else:
        image(ds / "images")
    nib.save(nib.Nifti1Image(_label() if label is None else label, label_affine), ds / "labels" / "c1.nii.gz")
    return ds


def _check_volume(make: Callable[[Path], Path]):
    def build(src: Path, out: Path):
        ds = _generic(src, image=make)
        bad = next((ds / "images").iterdir())
        return ["check", str(ds)], [f"images/{bad.name}"]

    return build


def _check_label(label: np.ndarray, affine: np.ndarray = AFFINE):
    def build(src: Path, out: Path):
        ds = _generic(src, label=label, label_affine=affine)
        return ["check", str(ds)], ["labels/c1.nii.gz"]

    return build


def _outside_volume(src: Path) -> Path:
    """A perfectly good volume outside the dataset: the bait a traversal would read."""
    path = src.parent / "outside.nii.gz"
    nib.save(nib.Nifti1Image(_image(), AFFINE), path)
    return path


def _msd(src: Path, image_entry: str) -> Path:
    ds = src / "ds"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(_label(), AFFINE), ds / "labelsTr" / "c1.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({"training": [{"image": image_entry, "label": "labelsTr/c1.nii.gz"}]}))
    return ds


def _msd_relative_traversal(src: Path, out: Path):
    _outside_volume(src)
    return ["check", str(_msd(src, "../../outside.nii.gz"))], ["training[0]", "../../outside.nii.gz"]


def _msd_absolute(src: Path, out: Path):
    bait = _outside_volume(src)
    return ["check", str(_msd(src, str(bait)))], ["training[0]", str(bait)]


def _msd_deep_json(src: Path, out: Path):
    ds = _msd(src, "imagesTr/c1.nii.gz")
    (ds / "dataset.json").write_text("[" * 100_000 + "]" * 100_000)
    return ["check", str(ds)], ["dataset.json"]


def _generic_symlink_outside(src: Path, out: Path):
    ds = _generic(src)
    link = ds / "images" / "c1.nii.gz"
    link.unlink()
    link.symlink_to(_outside_volume(src))
    return ["check", str(ds)], ["images/c1.nii.gz"]


def _case_folder_symlink_up(src: Path, out: Path):
    # lascarqs: train_2 is a link to "../elsewhere", a complete case outside the dataset folder.
    ds, elsewhere = src / "ds", src / "elsewhere"
    for folder in (ds / "train_1", elsewhere):
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(_image(), AFFINE), folder / "enhanced.nii.gz")
        nib.save(nib.Nifti1Image(_label(), AFFINE), folder / "atriumSegImgMO.nii.gz")
    (ds / "train_2").symlink_to(Path("..") / "elsewhere", target_is_directory=True)
    return ["check", str(ds)], ["train_2/enhanced.nii.gz"]


def _sweep(text: str | bytes):
    def build(src: Path, out: Path):
        path = src / "bad.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["--config", str(path), "--dry-run", "--storage-path", str(out)], ["bad.yaml"]

    return build


def _sweep_key(text: str, key: str):
    def build(src: Path, out: Path):
        argv, _ = _sweep(text)(src, out)
        return argv, [key]

    return build


_LAUGHS = "\n".join(
    ["l0: &l0 [ha, ha, ha, ha, ha, ha, ha, ha, ha]"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
)
_HUGE_GRID = "name: huge\ngrid:\n" + "".join(
    f"  {key}: [{', '.join(str(v) for v in range(1, 40))}]\n" for key in ("train.epochs", "train.batch_size", "seed")
)


def _predict(make: Callable[[Path], Path]):
    def build(src: Path, out: Path, model: Path):
        src.mkdir(exist_ok=True)
        bad = make(src)
        return ["predict", str(model), str(bad), "--out", str(out / "mask.nii.gz"), "--quiet"], [bad.name]

    return build


def _train_three_classes(src: Path, out: Path):
    ds = _generic(src, label=_label(values=(1, 2)))
    argv = ["train", str(ds), "--out", str(out / "run"), "--backbone", "tiny", "--decoder", "linear"]
    return argv + ["--mode", "frozen", "--image-size", "28", "--epochs", "1", "--quiet"], ["labels/c1.nii.gz"]


CORPUS: dict[str, Hostile] = {
    **{name: Hostile("cli", _check_volume(make), needle) for name, (make, needle) in VOLUMES.items()},
    "nifti inf and NaN voxels": Hostile("cli", _check_volume(_inf_voxels), "2 NaN/inf voxel"),
    "label with 3 classes": Hostile("cli", _check_label(_label(values=(1, 2))), "label is not binary"),
    "label of another shape": Hostile("cli", _check_label(_label((8, 8, 5))), "differs from c1.nii.gz shape"),
    "label with other spacing": Hostile(
        "cli", _check_label(_label(), np.diag([1.5, 1.5, 2.0, 1.0])), "voxel-to-world matrix differs"
    ),
    "msd entry ../../outside.nii.gz": Hostile("cli", _msd_relative_traversal, "points outside the dataset folder"),
    "msd entry absolute path": Hostile("cli", _msd_absolute, "points outside the dataset folder"),
    "msd dataset.json nested 1e5 deep": Hostile("cli", _msd_deep_json, "nested too deeply"),
    "generic image symlinked outside": Hostile("cli", _generic_symlink_outside, "resolves outside the dataset folder"),
    "case folder symlinked to ../": Hostile("cli", _case_folder_symlink_up, "resolves outside the dataset folder"),
    "sweep unknown key": Hostile("sweep", _sweep_key("name: a\nbogus: 1\n", "'bogus'"), "unknown sweep key"),
    "sweep wrong type": Hostile("sweep", _sweep_key("name: a\nseeds: zero\n", "'seeds'"), "list of integers"),
    "sweep wrong value type in grid": Hostile(
        "sweep", _sweep_key("name: a\ngrid: {train.epochs: [ten]}\n", "train.epochs"), "train.epochs"
    ),
    "sweep huge grid": Hostile("sweep", _sweep(_HUGE_GRID), f"more than the limit of {MAX_TRIALS}"),
    "sweep billion laughs": Hostile("sweep", _sweep(_LAUGHS + "\nname: a\nseeds: *l9\n"), "alias bomb"),
    "sweep recursive alias": Hostile("sweep", _sweep("name: a\nseeds: &s [1, *s]\n"), "alias refers to itself"),
    "sweep [[[...]]] 1e5 deep": Hostile("sweep", _sweep("name: a\nseeds: " + "[" * 10**5 + "]" * 10**5), "too deeply"),
    "sweep not a mapping": Hostile("sweep", _sweep("- name: a\n- seeds: [0]\n"), "must be a YAML mapping"),
    "sweep binary garbage": Hostile("sweep", _sweep(np.random.default_rng(2).bytes(2048)), "not a text (UTF-8)"),
    "sweep name ../../escape": Hostile("sweep", _sweep_key("name: ../../escape\n", "'name'"), "plain non-empty name"),
    "train on a 3-class label": Hostile("cli", _train_three_classes, "label is not binary"),
}
PREDICT: dict[str, tuple[Callable, str]] = {
    "predict truncated .nii.gz": (_predict(_truncated_gzip), "truncated or corrupt gzip"),
    "predict 5D volume": (_predict(_image_5d), "expected a 3D volume"),
    "predict nrrd gzip bomb": (_predict(_nrrd_gzip_bomb), "compressed data holds more"),
}


# ------------------------------------------------------------------------------------------------ harness


def _tree(root: Path, *skip: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``root`` except ``skip``: files with (size, mtime), folders and links as present."""
    seen: dict[str, tuple[int, int] | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [n for n in dirnames if here / n not in skip]
        for name in dirnames + filenames:
            st_ = (here / name).lstat()
            seen[str(here / name)] = (st_.st_size, st_.st_mtime_ns) if name in filenames else None
    return seen


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """``(src, out)``: inputs go to src, the command may write only to out (and the cache); cwd is elsewhere."""
    src, out, cwd = tmp_path / "src", tmp_path / "out", tmp_path / "cwd"
    for folder in (src, out, cwd):
        folder.mkdir()
    monkeypatch.chdir(cwd)
    # The slice cache and the tiny backbone's files are the one sanctioned place outside --out.
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path / "cache"))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield src, out
    # runner.main configures logging on the root logger; keep later tests' logging as it was.
    root.handlers[:] = handlers
    root.setLevel(level)


def _assert_clean(rc: int, err: str, out_text: str, needle: str, names: list[str]) -> None:
    assert rc != 0
    assert "Traceback" not in err + out_text
    problem = [line for line in err.splitlines() if needle in line]
    assert len(problem) >= 1, err
    assert any(all(name in line for name in names) for line in problem), err


def _run_case(driver: str, argv: list[str], capsys) -> tuple[int, str, str]:
    main = cli.main if driver == "cli" else runner.main
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("name", list(CORPUS), ids=list(CORPUS))
def test_hostile_input_gives_one_clear_line(name, sandbox, capsys):
    src, out = sandbox
    case = CORPUS[name]
    argv, names = case.build(src, out)
    before = _tree(src.parent.parent, out, src.parent / "cache")
    rc, stdout, err = _run_case(case.driver, argv, capsys)
    assert _tree(src.parent.parent, out, src.parent / "cache") == before
    _assert_clean(rc, err, stdout, case.needle, names)
    if case.driver == "sweep" or argv[0] == "train":
        # Refused before anything starts: one line, and no output written even inside --out / --storage-path.
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err
        assert not list(out.iterdir())
    else:
        # check: one line per problem, each starting with the file relative to the dataset, then the count.
        *problems, summary = err.splitlines()
        assert summary == f"{len(problems)} problem(s) in {argv[1]}", err


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """An untrained tiny segmenter saved as a model folder, as ``lasegseg train`` leaves it."""
    import torch

    from lasegseg.config import Config
    from lasegseg.models.segmenter import build_segmenter
    from lasegseg.train.checkpoint import save_model

    torch.manual_seed(0)
    flat = {"model.backbone": "tiny", "model.decoder": "linear", "model.mode": "frozen", "data.image_size": 28}
    cfg = Config().replace(**flat, **{"data.path": "/data/phantom"})
    return save_model(build_segmenter(cfg.model), cfg, tmp_path_factory.mktemp("hostile-model") / "model")


@pytest.mark.parametrize("name", list(PREDICT), ids=list(PREDICT))
def test_predict_refuses_hostile_volume(name, model_folder, sandbox, capsys):
    src, out = sandbox
    build, needle = PREDICT[name]
    argv, names = build(src, out, model_folder)
    before = _tree(src.parent.parent, out, src.parent / "cache")
    rc, stdout, err = _run_case("cli", argv, capsys)
    assert _tree(src.parent.parent, out, src.parent / "cache") == before
    _assert_clean(rc, err, stdout, needle, names)
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    # Nothing half-written: no mask, no volumes table, no temporary file.
    assert not list(out.iterdir())


def test_corpus_is_large_enough():
    assert len(CORPUS) + len(PREDICT) >= 24


# ------------------------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("name", list(VOLUMES), ids=list(VOLUMES))
def test_reading_a_hostile_volume_allocates_little(name, tmp_path):
    make, needle = VOLUMES[name]
    (tmp_path / "a" / "b").mkdir(parents=True)
    path = make(tmp_path / "a" / "b")
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            read_volume(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith(str(path)) and needle in str(info.value)
    assert peak < PEAK_BYTES, f"{peak / 1024**2:.1f} MiB traced"


def _capped(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``cmd`` with its address space capped at CAP_BYTES, so any attempt at a huge allocation fails."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CAP_BYTES, CAP_BYTES))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=cwd, env=env, preexec_fn=cap, capture_output=True, text=True, timeout=120)


def test_check_cli_over_every_hostile_volume_under_a_memory_cap(tmp_path):
    # One generic dataset holding every bad volume of the corpus, each with a good label: one real `lasegseg check`.
    ds = tmp_path / "ds"
    (ds / "labels").mkdir(parents=True)
    names = []
    for i, (make, _) in enumerate(VOLUMES.values()):
        folder = tmp_path / "tmp" / str(i) / "deeper"
        folder.mkdir(parents=True)
        made = make(folder)
        name = f"case{i:02d}{made.name[2:]}"
        (ds / "images").mkdir(exist_ok=True)
        made.rename(ds / "images" / name)
        nib.save(nib.Nifti1Image(_label(), AFFINE), ds / "labels" / f"case{i:02d}.nii.gz")
        names.append(name)
    (tmp_path / "cwd").mkdir()
    before = _tree(tmp_path)
    proc = _capped([sys.executable, "-m", "lasegseg.cli", "check", str(ds)], tmp_path / "cwd")
    assert _tree(tmp_path) == before
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == f"{len(VOLUMES)} problem(s) in {ds}", proc.stderr
    for name, (_, needle) in zip(names, VOLUMES.values(), strict=True):
        assert any(line.startswith(f"images/{name}: ") and needle in line for line in lines), (name, proc.stderr)


def test_sweep_script_refuses_an_alias_bomb_under_a_memory_cap(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(_LAUGHS + "\nname: bomb\nbase: {train.epochs: *l9}\n")
    (tmp_path / "cwd").mkdir()
    before = _tree(tmp_path)
    proc = _capped(
        [sys.executable, str(REPO / "sweeps" / "fewshot.py"), "--config", str(config), "--dry-run"], tmp_path / "cwd"
    )
    assert _tree(tmp_path) == before
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"fewshot.py: error: {config}: YAML expands to more than 100000 values (alias bomb?)"
    assert proc.stdout == ""


def test_predict_cli_refuses_a_gigabyte_claim_in_a_subprocess(tmp_path, model_folder):
    bad = _gigabyte_claim(tmp_path)
    (tmp_path / "out").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "lasegseg.cli", "predict", str(model_folder), str(bad), "--out", str(tmp_path / "out")],
        cwd=tmp_path / "out", capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lasegseg predict: error: {bad}: truncated or corrupt gzip"), lines
    assert not list((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------------------ property test

_FLOATS = st.sampled_from([0.0, -1.0, 1.0, 2.5, 1e-30, 1e30, float("nan"), float("inf"), float("-inf")]) | st.floats(
    width=32
)
_DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 999, -4]
_OFFSETS = st.sampled_from([0.0, 352.0, 353.0, 368.0, 544.0, -16.0, 1e9, 2.0**40, float("nan"), float("inf")])


@st.composite
def nifti_files(draw) -> tuple[bytes, bool, bool]:
    """(file bytes, gzip?, NIfTI-2?) with every header field drawn, extensions and a short payload."""
    two = draw(st.booleans())
    hdr = nib.Nifti2Header() if two else nib.Nifti1Header()
    top = 2**40 if two else 2**15 - 1
    dim_values = st.sampled_from([-(2**15), -4, -1, 0, 1, 2, 3, 4, 5, 8, top]) | st.integers(-2, 12)
    hdr["dim"] = [draw(st.integers(-2, 9))] + draw(st.lists(dim_values, min_size=7, max_size=7))
    hdr["datatype"] = draw(st.sampled_from(_DATATYPES))
    hdr["bitpix"] = draw(st.sampled_from([0, 8, 16, 32, 64, 128, 256, -8]))
    hdr["pixdim"] = draw(st.lists(_FLOATS, min_size=8, max_size=8))
    offsets = _OFFSETS.filter(np.isfinite).map(int) if two else _OFFSETS
    hdr["vox_offset"] = draw(offsets | st.integers(0, 4096))
    hdr["scl_slope"], hdr["scl_inter"] = draw(_FLOATS), draw(_FLOATS)
    hdr["qform_code"], hdr["sform_code"] = draw(st.integers(-3, 6)), draw(st.integers(-3, 6))
    for field in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"):
        hdr[field] = draw(_FLOATS)
    for field in ("srow_x", "srow_y", "srow_z"):
        hdr[field] = draw(st.lists(_FLOATS, min_size=4, max_size=4))
    extensions = b"\0\0\0\0"
    if draw(st.booleans()):
        esize = draw(st.sampled_from([-16, 0, 8, 16, 32, 2**20, 2**30, 2**31 - 1]))
        extensions = b"\1\0\0\0" + struct.pack("<ii", esize, 6) + b"\0" * 8
    payload = draw(st.binary(max_size=2048))
    return hdr.binaryblock + extensions + payload, draw(st.booleans()), two


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    ds = tmp_path_factory.mktemp("fuzz") / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "labels").mkdir()
    nib.save(nib.Nifti1Image(_label((3, 4, 5)), np.eye(4)), ds / "labels" / "c1.nii.gz")
    return ds


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=nifti_files())
def test_any_nifti_header_reads_or_fails_with_a_data_error(drawn, fuzz_dir):
    blob, gz, two = drawn
    for old in (fuzz_dir / "images").iterdir():
        old.unlink()
    path = _write(fuzz_dir / "images" / ("c1.nii.gz" if gz else "c1.nii"), blob, gz=gz)
    tracemalloc.start()
    try:
        try:
            volume = read_volume(path)
        except DataError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc), str(exc)
        else:
            assert volume.data.ndim == 3 and volume.data.dtype == np.float32
            assert np.all(np.isfinite(volume.affine))
        good, problems = validate_dataset(fuzz_dir)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"{peak / 1024**2:.1f} MiB traced"
    assert len(good) + len(problems) >= 1
    for line in problems:
        assert "\n" not in line and line.startswith(("images/c1.nii", "labels/c1.nii.gz")), line


_NRRD_FIELDS = {
    "type": st.sampled_from(["uchar", "short", "float", "double", "block", "int64", "complex", ""]),
    "dimension": st.integers(-1, 5).map(str),
    "sizes": st.lists(st.sampled_from(["-3", "0", "1", "2", "4", "7", "100000", "x", "1e3"]), max_size=5).map(" ".join),
    "encoding": st.sampled_from(["raw", "gzip", "bzip2", "ascii", "hex", "zip"]),
    "endian": st.sampled_from(["little", "big", "middle"]),
    "space": st.sampled_from(["left-posterior-superior", "RAS", "scanner-xyz", "3D-left-handed", "nowhere"]),
    "space directions": st.sampled_from(["(1,0,0) (0,1,0) (0,0,1)", "(nan,0,0) (0,1,0) (0,0,1)", "none (0,1,0)"]),
    "spacings": st.sampled_from(["1 1 1", "0 0 0", "nan 1 inf", "-1 2"]),
    "byte skip": st.sampled_from(["-2", "-1", "0", "16", "99999999999"]),
    "line skip": st.sampled_from(["-1", "0", "3", "99999999999"]),
    "data file": st.sampled_from(["c1.raw", "../outside.raw", "/dev/zero", "LIST", "c%03d.raw 1 3 1"]),
}


_SMALL_BOMB = gzip.compress(b"\0" * 2**22, mtime=0)


@st.composite
def nrrd_files(draw) -> bytes:
    """An NRRD header with a drawn subset of fields (values legal, odd or hostile) and a short payload."""
    names = draw(st.lists(st.sampled_from(sorted(_NRRD_FIELDS)), unique=True, min_size=2, max_size=len(_NRRD_FIELDS)))
    lines = [f"{name}: {draw(_NRRD_FIELDS[name])}" for name in names]
    payload = draw(st.binary(max_size=512) | st.just(_SMALL_BOMB))
    return ("NRRD0004\n" + "\n".join(lines) + "\n\n").encode() + payload


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=nrrd_files())
def test_any_nrrd_header_reads_or_fails_with_a_data_error(blob, fuzz_dir):
    for old in (fuzz_dir / "images").iterdir():
        old.unlink()
    (fuzz_dir / "images" / "c1.raw").write_bytes(b"\0" * 64)
    path = _write(fuzz_dir / "images" / "c1.nrrd", blob)
    tracemalloc.start()
    try:
        try:
            volume = read_volume(path)
        except DataError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc), str(exc)
        else:
            assert volume.data.ndim == 3 and np.all(np.isfinite(volume.affine))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"{peak / 1024**2:.1f} MiB traced"
