"""Dataset layouts on disk: detection, case listing, label rules, and loading one case in canonical orientation.

| layout | files | left atrium |
|---|---|---|
| ``lascarqs`` | ``train_N/enhanced.nii.gz`` + ``train_N/atriumSegImgMO.nii.gz`` | label > 0 |
| ``lasc2018`` | ``<patient>/lgemri.nrrd`` + ``<patient>/laendo.nrrd`` | label == 255 |
| ``msd`` | ``dataset.json`` + ``imagesTr/la_003.nii.gz`` + ``labelsTr/la_003.nii.gz`` | label == 1 |
| ``generic`` | ``images/<id>.nii.gz`` (or .nii, .nrrd) + ``labels/<id>.<any of those>`` | label > 0 |

Whatever the rule, a label must be binary: background 0 and one LA value. Every file read must lie inside the
dataset folder once symlinks are followed: a layout is never a way to read elsewhere. Per-file problems found while
listing (a missing partner, a dataset.json entry or a symlink outside the folder) are collected by
:func:`scan_cases` so validation can report them all; :func:`list_cases` raises them as one
:class:`~lasegseg.errors.DataError`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from lasegseg.data.io import SUPPORTED_EXTS, read_volume, strip_ext, volume_format
from lasegseg.data.orientation import to_canonical
from lasegseg.data.types import Case, LoadedCase
from lasegseg.data.volume_checks import VolumeError
from lasegseg.errors import DataError, first_line

# Image and label of one case must share the voxel grid; 1e-3 mm absorbs float32 header round-off.
AFFINE_ATOL = 1e-3
# dataset.json lists paths; even 10^5 cases fit in a few MB, so anything far larger is not a dataset index.
MAX_JSON_BYTES = 16 * 1024**2

Scan = tuple[list[Case], list[str]]


@dataclass(frozen=True)
class LayoutSpec:
    """One dataset layout.

    Args:
        name: registry key, the value of ``data.layout``.
        looks_for: what :func:`detect_layout` looks for, shown in error messages.
        detect: ``root → bool``: does this folder look like this layout?
        scan: ``root → (cases, problems)``; problems are one line each, starting with a path relative to root.
        label_value: the LA value (``label == value``); ``None`` means any value > 0 is LA.
    """

    name: str
    looks_for: str
    detect: Callable[[Path], bool]
    scan: Callable[[Path], Scan]
    label_value: float | None

    @property
    def label_rule(self) -> str:
        if self.label_value is None:
            return "label > 0 is LA"
        return f"label == {self.label_value:g} is LA"


def _visible(path: Path) -> bool:
    """Skip hidden files and the ``._*`` resource forks macOS leaves in archives."""
    return not path.name.startswith(".")


def _subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _escapes(root: Path, path: Path) -> bool:
    """Whether ``path``, symlinks followed, lies outside ``root`` (a symlink loop or unusable name counts too)."""
    try:
        return not path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError):
        return True


def _outside(root: Path, paths: list[Path]) -> list[str]:
    """One problem line for each of ``paths`` that resolves outside ``root``."""
    return [
        f"{p.relative_to(root).as_posix()}: resolves outside the dataset folder" for p in paths if _escapes(root, p)
    ]


def _pair_layout(image_names: tuple[str, ...], label_names: tuple[str, ...], name: str) -> Callable[[Path], Scan]:
    """Scanner for layouts with one folder per patient holding a fixed image and label file name."""

    def scan(root: Path) -> Scan:
        cases: list[Case] = []
        problems: list[str] = []
        for sub in _subdirs(root):
            image = _first_existing(sub, image_names)
            label = _first_existing(sub, label_names)
            if image is None and label is None:
                continue
            if image is None:
                problems.append(f"{sub.name}/{image_names[0]}: missing (image of case {sub.name})")
            elif label is None:
                problems.append(f"{sub.name}/{label_names[0]}: missing (label of case {sub.name})")
            elif escaped := _outside(root, [image, label]):
                problems += escaped
            else:
                cases.append(Case(sub.name, image, label, name))
        return cases, problems

    return scan


def _detect_pair(image_names: tuple[str, ...]) -> Callable[[Path], bool]:
    def detect(root: Path) -> bool:
        return any(_first_existing(sub, image_names) is not None for sub in _subdirs(root))

    return detect


_LASCARQS_IMAGE = ("enhanced.nii.gz", "enhanced.nii")
_LASCARQS_LABEL = ("atriumSegImgMO.nii.gz", "atriumSegImgMO.nii")
_LASC2018_IMAGE = ("lgemri.nrrd",)
_LASC2018_LABEL = ("laendo.nrrd",)


def _entry_path(root: Path, value: object, where: str) -> tuple[Path | None, str | None]:
    """A dataset.json path resolved inside root, or a problem line (wrong type, or ``../``/absolute traversal)."""
    if not isinstance(value, str) or not value.strip():
        return None, f"{where}: expected a relative file path, got {value!r}"
    rel = PurePosixPath(value.replace("\\", "/"))
    norm = PurePosixPath(os.path.normpath(rel))
    if rel.is_absolute() or (norm.parts and norm.parts[0] == ".."):
        return None, f"{where}: '{value}' points outside the dataset folder"
    # Then with symlinks followed: a link inside the folder must not lead reads elsewhere.
    if _escapes(root, root / norm):
        return None, f"{where}: '{value}' resolves outside the dataset folder"
    return root / norm, None


def _scan_msd(root: Path) -> Scan:
    meta = root / "dataset.json"
    try:
        if meta.stat().st_size > MAX_JSON_BYTES:
            raise DataError(f"{meta}: larger than {MAX_JSON_BYTES // 1024**2} MiB, not a dataset index")
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta}: not a readable JSON file ({first_line(exc, limit=120)})") from exc
    except RecursionError as exc:
        raise DataError(f"{meta}: not a readable JSON file (nested too deeply)") from exc
    training = doc.get("training") if isinstance(doc, dict) else None
    if not isinstance(training, list):
        raise DataError(f"{meta}: has no 'training' list of {{'image': ..., 'label': ...}} entries")
    cases: list[Case] = []
    problems: list[str] = []
    seen: set[str] = set()
    for i, entry in enumerate(training):
        where = f"dataset.json training[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected {{'image': ..., 'label': ...}}, got {type(entry).__name__}")
            continue
        image, bad_image = _entry_path(root, entry.get("image"), f"{where} image")
        label, bad_label = _entry_path(root, entry.get("label"), f"{where} label")
        problems += [p for p in (bad_image, bad_label) if p]
        if image is None or label is None or image.name.startswith("._"):
            continue
        case_id = strip_ext(image.name)
        missing = [p for p in (image, label) if not p.is_file()]
        for p in missing:
            problems.append(f"{p.relative_to(root).as_posix()}: missing (listed in dataset.json)")
        if case_id in seen:
            problems.append(f"{where}: case '{case_id}' is listed twice")
        elif not missing:
            cases.append(Case(case_id, image, label, "msd"))
        seen.add(case_id)
    return cases, problems


def _volumes(folder: Path) -> dict[str, list[Path]]:
    """Supported volume files of a folder grouped by case id (file name without extension)."""
    out: dict[str, list[Path]] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and _visible(p) and p.name.lower().endswith(SUPPORTED_EXTS):
                out.setdefault(strip_ext(p.name), []).append(p)
    return out


def _scan_generic(root: Path) -> Scan:
    images, labels = _volumes(root / "images"), _volumes(root / "labels")
    cases: list[Case] = []
    problems: list[str] = []
    for case_id, files in sorted(images.items()):
        if len(files) > 1:
            problems.append(f"images/{case_id}: several images ({', '.join(p.name for p in files)})")
            continue
        image = files[0]
        found = labels.get(case_id, [])
        if not found:
            ext = image.name[len(case_id) :]
            problems.append(f"labels/{case_id}{ext}: missing (label of images/{image.name})")
        elif len(found) > 1:
            problems.append(f"labels/{case_id}: several labels ({', '.join(p.name for p in found)})")
        elif escaped := _outside(root, [image, found[0]]):
            problems += escaped
        else:
            cases.append(Case(case_id, image, found[0], "generic"))
    for case_id in sorted(set(labels) - set(images)):
        problems += [f"labels/{p.name}: no matching image in images/" for p in labels[case_id]]
    return cases, problems


LAYOUTS: dict[str, LayoutSpec] = {
    spec.name: spec
    for spec in (
        LayoutSpec(
            "msd",
            "msd: dataset.json + imagesTr/ + labelsTr/",
            lambda root: (root / "dataset.json").is_file() and (root / "imagesTr").is_dir(),
            _scan_msd,
            1,
        ),
        LayoutSpec(
            "lasc2018",
            "lasc2018: <patient>/lgemri.nrrd + <patient>/laendo.nrrd",
            _detect_pair(_LASC2018_IMAGE),
            _pair_layout(_LASC2018_IMAGE, _LASC2018_LABEL, "lasc2018"),
            255,
        ),
        LayoutSpec(
            "lascarqs",
            "lascarqs: train_N/enhanced.nii.gz + train_N/atriumSegImgMO.nii.gz",
            _detect_pair(_LASCARQS_IMAGE),
            _pair_layout(_LASCARQS_IMAGE, _LASCARQS_LABEL, "lascarqs"),
            None,
        ),
        LayoutSpec(
            "generic",
            "generic: images/<id>.nii.gz|.nii|.nrrd + labels/<id>.<same>",
            lambda root: (root / "images").is_dir() and (root / "labels").is_dir(),
            _scan_generic,
            None,
        ),
    )
}


def get_layout(name: str) -> LayoutSpec:
    """The registered layout ``name``; :class:`DataError` listing the valid names otherwise.

    Args:
        name: a key of :data:`LAYOUTS`.
    """
    if name not in LAYOUTS:
        raise DataError(f"unknown dataset layout '{name}' (valid layouts: auto, {', '.join(LAYOUTS)})")
    return LAYOUTS[name]


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"{root}: dataset folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: dataset path is not a folder")
    try:
        empty = not any(_visible(p) for p in root.iterdir())
    except OSError as exc:
        raise DataError(f"{root}: cannot list the dataset folder ({exc.strerror or exc})") from exc
    if empty:
        raise DataError(f"{root}: dataset folder is empty")


def detect_layout(root: str | os.PathLike) -> str:
    """The name of the one layout ``root`` matches.

    Args:
        root: dataset folder.

    Raises:
        DataError: the folder is missing or empty, matches no layout (the message lists what was looked for), or
            matches several (pass the layout explicitly).
    """
    root = Path(root)
    _check_root(root)
    matches = [name for name, spec in LAYOUTS.items() if spec.detect(root)]
    if not matches:
        looked = "; ".join(spec.looks_for for spec in LAYOUTS.values())
        raise DataError(f"{root}: no known dataset layout found (looked for {looked})")
    if len(matches) > 1:
        raise DataError(f"{root}: matches several layouts ({', '.join(matches)}); set data.layout to one of them")
    return matches[0]


def scan_cases(root: str | os.PathLike, layout: str = "auto") -> Scan:
    """List the cases of a dataset without reading any volume, collecting per-file problems instead of raising.

    Args:
        root: dataset folder.
        layout: ``auto`` (detect) or a key of :data:`LAYOUTS`.

    Returns:
        ``(cases, problems)``: cases sorted by ``case_id`` (numbers in natural order); problems one line each,
        starting with the file (relative to ``root``) at fault.

    Raises:
        DataError: problems with the folder as a whole (missing, empty, unknown layout, unreadable dataset.json).
    """
    root = Path(root)
    name = detect_layout(root) if layout == "auto" else get_layout(layout).name
    if layout != "auto":
        _check_root(root)
    spec = LAYOUTS[name]
    cases, problems = spec.scan(root)
    if not cases and not problems:
        problems.append(f"no cases found in the dataset folder (expected {spec.looks_for})")
    return sorted(cases, key=lambda c: natural_key(c.case_id)), problems


def natural_key(case_id: str) -> list[str | int]:
    """Sort key putting ``train_2`` before ``train_10``.

    Args:
        case_id: a case id.
    """
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", case_id)]


def list_cases(root: str | os.PathLike, layout: str = "auto") -> list[Case]:
    """The cases of a dataset sorted by ``case_id`` (natural order), or one :class:`DataError` naming every bad file.

    Args:
        root: dataset folder.
        layout: ``auto`` (detect) or a key of :data:`LAYOUTS`.
    """
    cases, problems = scan_cases(root, layout)
    if problems:
        raise DataError(format_problems(Path(root), problems))
    return cases


def format_problems(root: Path, problems: list[str]) -> str:
    """One message for a list of problem lines: a single line, or a summary line followed by one line each.

    Args:
        root: dataset folder the (relative) problem paths refer to.
        problems: one line each.
    """
    if len(problems) == 1:
        return f"{root}: {problems[0]}"
    return f"{root}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems)


def label_to_mask(label: np.ndarray, layout: str, *, path: str | os.PathLike | None = None) -> np.ndarray:
    """Apply the layout's label rule: a bool LA mask. The label must be binary (0 and one LA value).

    Args:
        label: label array as read (any numeric dtype).
        layout: a key of :data:`LAYOUTS`.
        path: the label file, named in the error message.
    """
    spec = get_layout(layout)
    mask = label > 0 if spec.label_value is None else label == spec.label_value
    # Without sorting the whole volume (np.unique): every LA voxel must hold one value and every other voxel 0.
    la_values = label[mask]
    ok = not np.any(label[~mask] != 0) and not (la_values.size and np.any(la_values != la_values.flat[0]))
    if not ok:
        values = np.unique(label[np.isfinite(label)]) if np.issubdtype(label.dtype, np.floating) else np.unique(label)
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", …" if values.size > 6 else "")
        if np.issubdtype(label.dtype, np.floating) and not np.all(np.isfinite(label)):
            shown += ", NaN/inf"
        expected = "0 and one value > 0" if spec.label_value is None else f"0 and {spec.label_value:g}"
        reason = f"label is not binary: values {{{shown}}}, expected {expected} ({layout}: {spec.label_rule})"
        raise VolumeError(path, reason) if path is not None else DataError(reason)
    return mask


def load_case(case: Case) -> LoadedCase:
    """Read, check and canonicalise one case (RAS+, axial slices along the last axis).

    Checks: both files readable and 3D, finite intensities, same shape and voxel-to-world matrix (atol 1e-3),
    a binary label with at least one LA voxel under the layout's rule.

    Args:
        case: from :func:`list_cases`.

    Raises:
        VolumeError: a :class:`DataError` naming the file at fault.
    """
    image = read_volume(case.image_path)
    bad = int(np.count_nonzero(~np.isfinite(image.data)))
    if bad:
        raise VolumeError(case.image_path, f"contains {bad} NaN/inf voxel(s)")
    label = read_volume(case.label_path, label=True)
    if label.data.shape != image.data.shape:
        raise VolumeError(
            case.label_path, f"shape {label.data.shape} differs from {case.image_path.name} shape {image.data.shape}"
        )
    if not np.allclose(label.affine, image.affine, atol=AFFINE_ATOL, rtol=0):
        diff = float(np.max(np.abs(label.affine - image.affine)))
        raise VolumeError(case.label_path, f"voxel-to-world matrix differs from the image's (by up to {diff:.3g})")
    mask = label_to_mask(label.data, case.layout, path=case.label_path)
    if not mask.any():
        raise VolumeError(case.label_path, "label has no left-atrium voxels")
    image_c, affine_c, ornt = to_canonical(image.data, image.affine)
    mask_c, _, _ = to_canonical(mask, image.affine)
    spacing = tuple(float(s) for s in np.linalg.norm(affine_c[:3, :3], axis=0))
    meta = {
        "layout": case.layout,
        "file_shape": list(image.data.shape),
        "file_affine": image.affine.tolist(),
        "ornt": ornt.tolist(),
        "image_format": volume_format(case.image_path),
    }
    return LoadedCase(case.case_id, image_c, mask_c, affine_c, spacing, case.image_path, case.label_path, meta)
