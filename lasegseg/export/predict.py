"""Segment new volumes with a trained model: same preprocessing as training, mask back at native resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lasegseg.config import Config
from lasegseg.data.io import read_volume, write_like
from lasegseg.data.orientation import from_canonical, to_canonical
from lasegseg.data.preprocess import Preprocessing, preprocess_image
from lasegseg.errors import DataError
from lasegseg.train.inference import largest_component, predict_slices, probabilities_to_native


def preprocess_volume(image_canonical: np.ndarray, cfg: Config) -> np.ndarray:
    """Canonical (X, Y, Z) raw image → (Z, S, S) model input, exactly as the slice cache stores it."""
    return preprocess_image(image_canonical, Preprocessing.from_config(cfg))


def segment_canonical(
    model,
    cfg: Config,
    image_canonical: np.ndarray,
    *,
    device="cpu",
    batch_size: int = 16,
    largest_cc: bool = False,
    flip_tta: bool = False,
) -> np.ndarray:
    """Boolean LA mask (X, Y, Z) for a canonical-orientation image."""
    slices = preprocess_volume(image_canonical, cfg)
    probs = predict_slices(model, slices, batch_size=batch_size, device=device, amp=cfg.train.amp, flip_tta=flip_tta)
    mask = probabilities_to_native(probs, image_canonical.shape[:2]) >= 0.5
    return largest_component(mask) if largest_cc and mask.any() else mask


def output_path_for(in_path: Path, out: Path, single: bool) -> Path:
    """OUT itself for one input named like a volume; otherwise OUT/<input name> (same extension)."""
    if single and (out.name.endswith((".nii.gz", ".nii", ".nrrd"))):
        return out
    return out / in_path.name


def predict_file(
    model,
    cfg: Config,
    in_path: Path,
    out_path: Path,
    *,
    device="cpu",
    batch_size: int = 16,
    largest_cc: bool = False,
    flip_tta: bool = False,
) -> dict[str, Any]:
    """Read one volume, segment it, write the mask like the input (affine/header); returns its LA volume."""
    vol = read_volume(in_path)
    if not np.isfinite(vol.data).all():
        raise DataError(f"{in_path}: contains NaN or infinite voxels")
    data_c, _, ornt = to_canonical(vol.data, vol.affine)
    mask_c = segment_canonical(
        model, cfg, data_c, device=device, batch_size=batch_size, largest_cc=largest_cc, flip_tta=flip_tta
    )
    mask = from_canonical(mask_c.astype(np.uint8), ornt)
    write_like(out_path, mask, vol)
    voxel_ml = float(np.prod(vol.spacing)) / 1000.0
    return {"input": str(in_path), "output": str(out_path), "la_volume_ml": float(mask.sum()) * voxel_ml}
