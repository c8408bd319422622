"""The rehearsal's study: ``sweeps/configs/paper.yaml`` derived by code, never copied, so it cannot drift.

Per trial, only sizes change (image size, epochs, batch size, the screen's epochs and grace period); for an N below
the full grid, the grid is cut to a prefix of each axis (backbones, decoders, modes, few-shot entries, seeds; the
baselines kept or dropped). Everything else (the cells' order, the screen's search, trial count per cell and
scheduler, the few-shot entries, the seeds, the resources) is the paper's. :func:`derive` returns the derived
study and one line per change, which the bench prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT

PAPER = ROOT / "sweeps" / "configs" / "paper.yaml"
# 112 px: the smallest size both patch sizes divide (DINOv2's 14, DINOv3's 16); the paper's 448 is one too.
IMAGE_SIZE = 112
EPOCHS = 2
SCREEN_EPOCHS = 2
GRACE_PERIOD = 1
BATCH_SIZE = 8
# ~20 cases: data.patients 10 with the paper's val (0.1) and test (0.2) fractions leaves 14 to train on.
PHANTOM_CASES = 20
PHANTOM_SHAPE = (48, 48, 12)
# Per-trial sizes, as flat config keys of ``base``.
SHRUNK = {"data.image_size": IMAGE_SIZE, "train.epochs": EPOCHS, "train.batch_size": BATCH_SIZE}


@dataclass(frozen=True)
class Cut:
    """A prefix of each axis of the paper's grid (None keeps the axis whole).

    Args:
        backbones, decoders, modes: how many of the grid's ``model.backbone``, ``model.decoder``, ``model.mode``.
        fewshot: how many of the ``fewshot`` entries; seeds: how many seeds; baselines: keep the baseline cells.
    """

    backbones: int | None = None
    decoders: int | None = None
    modes: int | None = None
    fewshot: int | None = None
    seeds: int | None = None
    baselines: bool = True


# The rehearsal's sizes: N ≈ 16 (one cell), ≈ 128 (every mode of one backbone and decoder, and the UNet baseline)
# and the full grid.
SIZES: dict[str, Cut] = {
    "16": Cut(backbones=1, decoders=1, modes=1, fewshot=4, seeds=2, baselines=False),
    "128": Cut(backbones=1, decoders=1, modes=3, fewshot=8, seeds=3, baselines=True),
    "full": Cut(),
}
GRID_AXES = (("backbones", "model.backbone"), ("decoders", "model.decoder"), ("modes", "model.mode"))


def paper_spec() -> dict[str, Any]:
    """The paper's sweep file, as YAML data."""
    return yaml.safe_load(PAPER.read_text())


def trial_count(spec: dict[str, Any]) -> int:
    """Trials of a sweep file as the driver counts them: screening (cells × trials) plus the seeded grid.

    Cells are the grid's product plus the baselines; the grid crosses every cell with the few-shot entries and seeds.
    """
    cells = 1
    for values in spec.get("grid", {}).values():
        cells *= len(values)
    cells += len(spec.get("baselines", []))
    grid = cells * max(1, len(spec.get("fewshot", []))) * len(spec.get("seeds", [0]))
    screen = spec.get("screen")
    return grid + (cells * int(screen.get("trials", 8)) if screen else 0)


def derive(spec: dict[str, Any], cut: Cut) -> tuple[dict[str, Any], list[str]]:
    """The rehearsal's study from the paper's ``spec``: per-trial sizes shrunk, the grid cut by ``cut``.

    Returns:
        ``(derived spec, changes)``: a new dict (``spec`` is untouched) and one readable line per change.
    """
    out = yaml.safe_load(yaml.safe_dump(spec))  # a deep copy of plain YAML data
    changes: list[str] = []
    base = out.setdefault("base", {})
    for key, value in SHRUNK.items():
        changes.append(f"base.{key}: {base.get(key)!r} -> {value!r}")
        base[key] = value
    screen = out.get("screen")
    if screen is not None:
        old_set = dict(screen.get("set") or {})
        screen["set"] = {**old_set, "train.epochs": SCREEN_EPOCHS}
        changes.append(f"screen.set.train.epochs: {old_set.get('train.epochs')!r} -> {SCREEN_EPOCHS!r}")
        changes.append(f"screen.grace_period: {screen.get('grace_period')!r} -> {GRACE_PERIOD!r}")
        screen["grace_period"] = GRACE_PERIOD
    for field, key in GRID_AXES:
        keep = getattr(cut, field)
        values = out.get("grid", {}).get(key)
        if keep is not None and values is not None and keep < len(values):
            out["grid"][key] = values[:keep]
            changes.append(f"grid.{key}: {values} -> {values[:keep]}")
    for field, key in (("fewshot", "fewshot"), ("seeds", "seeds")):
        keep, values = getattr(cut, field), out.get(key)
        if keep is not None and values and keep < len(values):
            out[key] = values[:keep]
            changes.append(f"{key}: {len(values)} entries -> the first {keep} ({_short(values[:keep])})")
    if not cut.baselines and out.get("baselines"):
        changes.append(f"baselines: {_short(out['baselines'])} -> none")
        out.pop("baselines")
    return out, changes


def _short(values: list[Any]) -> str:
    return ", ".join(str(v) if not isinstance(v, dict) else ",".join(f"{k}={x}" for k, x in v.items()) for v in values)


def write_study(folder: Path, size: str) -> tuple[Path, int, list[str]]:
    """Write the derived study of ``size`` (a key of :data:`SIZES`) as ``folder/paper-<size>.yaml``.

    Returns:
        ``(path, trials, changes)``.
    """
    spec, changes = derive(paper_spec(), SIZES[size])
    path = Path(folder) / f"paper-{size}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# sweeps/configs/paper.yaml derived by bench/scale_study.py ({size}); changes:\n"
    path.write_text(header + "".join(f"#   {c}\n" for c in changes) + yaml.safe_dump(spec, sort_keys=False))
    return path, trial_count(spec), changes


def write_phantom_data(folder: Path) -> Path:
    """The rehearsal's seeded phantom (:data:`PHANTOM_CASES` cases of :data:`PHANTOM_SHAPE` voxels), made once."""
    # deferred: heavy (lasegseg.data imports numpy/nibabel; bench/run.py --help stays instant)
    from lasegseg.data.phantom import write_phantom

    folder = Path(folder)
    if not (folder / "dataset.json").is_file():
        write_phantom(folder, cases=PHANTOM_CASES, seed=0, layout="msd", shape=PHANTOM_SHAPE)
    return folder
