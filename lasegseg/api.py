"""Python API for notebooks: ``lasegseg.load_model(src)`` → a :class:`Predictor`.

``src`` is an export folder (``lasegseg export``), a run's ``model/`` folder, a run folder holding ``model/``, or a
registered model URI ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``. Every model is read from safetensors and
rebuilt from its ``config.json`` after its SHA-256 is checked; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lasegseg.data.orientation import from_canonical, to_canonical
from lasegseg.data.preprocess import Preprocessing
from lasegseg.errors import DataError, ModelError
from lasegseg.export.predict import predict_file, segment_canonical
from lasegseg.paths import tracking_uri as resolve_tracking_uri
from lasegseg.train.checkpoint import CONFIG
from lasegseg.train.checkpoint import load_model as load_checkpoint
from lasegseg.train.trial_data import pick_device

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def _ensemble(models: list):
    """One module averaging the members' foreground probabilities.

    It returns log-probabilities, so the softmax that inference applies recovers the averaged probabilities.
    """

    class Ensemble(torch.nn.Module):
        def __init__(self, members: list[torch.nn.Module]) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList(members)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)
            return torch.log(probs.clamp_min(1e-12))

    return Ensemble(models)


class Predictor:
    """A loaded LA segmenter.

    Args:
        model: the torch module (one segmenter, or an ensemble averaging its members' probabilities).
        config: the trial's :class:`~lasegseg.config.Config` (preprocessing included).
        meta: the model folder's ``config.json``.
        device: where inference runs.
        source: what it was loaded from (for messages).
    """

    def __init__(self, model, config, meta: dict[str, Any], device, source: str) -> None:
        self.model = model
        self.config = config
        self.meta = meta
        self.device = device
        self.source = source

    def __repr__(self) -> str:
        m = self.config.model
        return f"Predictor({m.backbone}·{m.decoder}·{m.mode}, image_size={self.config.data.image_size}, {self.source})"

    def predict_volume(
        self,
        array: np.ndarray,
        spacing: tuple[float, float, float] | None = None,
        affine: np.ndarray | None = None,
        *,
        largest_cc: bool = False,
        tta: bool = False,
        batch_size: int = 16,
    ) -> np.ndarray:
        """Boolean LA mask with the shape of ``array``.

        Args:
            array: a 3D image. Without ``affine`` it must already be in canonical RAS+ order (axis 0 → right,
                1 → anterior, 2 → superior, so axial slices are ``array[:, :, k]``); with ``affine`` (voxel → RAS+
                world, as nibabel gives it) it may be in any axis order and the mask comes back in that order.
            spacing: voxel size in mm; the mask does not depend on it (slices are resized to the trained size).
                It is checked and, with no ``affine``, used with the canonical order to describe the grid.
            affine: optional 4x4 voxel → RAS+ matrix of ``array``.
            largest_cc: keep only the largest connected component.
            tta: average with a left-right flipped prediction.
            batch_size: slices per forward pass.
        """
        array = np.asarray(array)
        if array.ndim != 3:
            raise DataError(f"input is not a 3D volume: shape {array.shape}")
        if min(array.shape) < 1:
            raise DataError(f"input volume is empty: shape {array.shape}")
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise DataError("input volume must be numeric with no NaN or infinite voxels")
        if spacing is not None and (len(tuple(spacing)) != 3 or min(float(s) for s in spacing) <= 0):
            raise DataError(f"spacing must be three positive numbers in mm, got {spacing!r}")
        if affine is None:
            affine = np.diag([*(spacing or (1.0, 1.0, 1.0)), 1.0])
        affine = np.asarray(affine, dtype=float)
        if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise DataError(f"affine must be a finite, invertible 4x4 matrix, got shape {affine.shape}")
        data_c, _, ornt = to_canonical(array.astype(np.float32, copy=False), affine)
        mask_c = segment_canonical(
            self.model, self.config, data_c, device=self.device, batch_size=batch_size, largest_cc=largest_cc,
            flip_tta=tta,
        )  # fmt: skip
        return from_canonical(mask_c, ornt).astype(bool)

    def predict_file(
        self, in_path: str | os.PathLike, out_path: str | os.PathLike, *, largest_cc: bool = False, tta: bool = False,
        batch_size: int = 16,
    ) -> dict[str, Any]:  # fmt: skip
        """Segment one NIfTI/NRRD file into ``out_path`` (input's affine/header); returns its LA volume in mL."""
        return predict_file(
            self.model, self.config, Path(in_path), Path(out_path), device=self.device, batch_size=batch_size,
            largest_cc=largest_cc, flip_tta=tta,
        )  # fmt: skip


def _members(folder: Path) -> list[Path]:
    """An export folder made with ``--ensemble`` lists its members in metrics.json; any other folder is one model."""
    from lasegseg.export.export import METRICS_FILE  # deferred: heavy (the export module loads MLflow)

    path = folder / METRICS_FILE
    if not path.is_file():
        return [folder]
    try:
        members = json.loads(path.read_text()).get("ensemble") or []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    out = []
    for rel in members:
        member = (folder / str(rel)).resolve()
        if folder.resolve() not in member.parents:
            raise ModelError(f"{path}: ensemble member '{rel}' lies outside the export folder")
        out.append(member)
    return out or [folder]


def _model_folder(src: Path) -> Path:
    if not (src / CONFIG).is_file() and (src / "model" / CONFIG).is_file():
        return src / "model"  # a run folder
    return src


def _load_folder(folder: Path, device, source: str) -> Predictor:
    folder = _model_folder(Path(folder))
    members = _members(folder) if folder.is_dir() else [folder]
    loaded = [load_checkpoint(m, map_location=device) for m in members]
    models = [m.to(device) for m, _, _ in loaded]
    model, config, meta = loaded[0]
    if len(models) > 1:
        # Members see one preprocessed input, so they must all have been trained on the same one.
        distinct = list(dict.fromkeys(Preprocessing.from_config(c) for _, c, _ in loaded))
        if len(distinct) > 1:
            raise ModelError(f"{folder}: ensemble members differ in preprocessing ({' vs '.join(map(str, distinct))})")
        model = _ensemble(models).eval()
    return Predictor(model.to(device), config, meta, device, source)


def resolve_registered(uri: str, tracking_uri: str | None, dst: Path) -> Path:
    """Download the model folder a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI points at into ``dst``."""
    # deferred: heavy (MLflow, ~1 s: only for models:/ URIs)
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from lasegseg.tracking.client import check_reachable
    from lasegseg.tracking.client import client as tracking_client

    match = _MODELS_URI.match(uri)
    if match is None:
        raise ModelError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    tracking_uri = resolve_tracking_uri(tracking_uri, context=f"{uri}: ")

    check_reachable(tracking_uri, timeout=5.0, must_exist=True)
    name, alias, version = match["name"], match["alias"], match["version"]
    client = tracking_client(tracking_uri, registry=True)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ModelError(f"{uri}: no registered model '{name}' at {tracking_uri}") from None
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        what = f"alias '{alias}'" if alias else f"version {version}"
        raise ModelError(f"{uri}: registered model '{name}' has no {what} at {tracking_uri}") from None
    try:
        return Path(download_artifacts(artifact_uri=mv.source, dst_path=str(dst), tracking_uri=tracking_uri))
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a missing artifact
        raise ModelError(f"{uri}: cannot download version {mv.version} from {mv.source} ({exc})") from None


def load_model(src: str | os.PathLike, *, device: str | None = None, tracking_uri: str | None = None) -> Predictor:
    """Load a model for prediction from a folder or a ``models:/`` URI (see the module docstring).

    Args:
        src: export folder, model folder, run folder, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
        device: ``cpu``, ``cuda`` … (default: cuda when available).
        tracking_uri: MLflow store for ``models:/`` URIs (default: ``$MLFLOW_TRACKING_URI``).

    Raises:
        ModelError: missing, tampered or non-safetensors files, unknown registered model/alias/version.
    """
    dev = pick_device(device)
    text = str(src)
    if text.startswith("models:/"):
        with tempfile.TemporaryDirectory(prefix="lasegseg-model-") as tmp:
            folder = resolve_registered(text, tracking_uri, Path(tmp))
            return _load_folder(folder, dev, text)
    path = Path(src)
    if not path.exists():
        raise ModelError(f"{path}: no such model folder")
    return _load_folder(path, dev, text)
