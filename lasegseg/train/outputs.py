"""What a finished trial leaves in its folder: ``model/``, ``metrics.json``, ``per_patient.csv`` and
``overlays.png``, with case ids pseudonymised where asked. Pure compute: no ray, no mlflow.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lasegseg import metric_table
from lasegseg.config import Config
from lasegseg.fsio import atomic_write, write_json_atomic
from lasegseg.train.checkpoint import save_model
from lasegseg.train.evaluation import predict_cached_slices
from lasegseg.train.features import FeatureCache
from lasegseg.train.inference import predict_slices
from lasegseg.train.metrics import metric_names
from lasegseg.train.overlay import overlay_figure, pick_slices


def pseudonymize_results(results: dict[str, Any], alias: Callable[[str], str] | None) -> dict[str, Any]:
    """``results`` with every case id (per-patient rows, split lists) replaced by ``alias(case id)``."""
    if alias is None:
        return results
    return {
        **results,
        "per_patient": [{**row, "case_id": alias(row["case_id"])} for row in results["per_patient"]],
        "split": {name: [alias(c) for c in ids] for name, ids in results["split"].items()},
    }


def write_overlays(
    model, cache, rows: list[dict[str, Any]], path: Path, *, device, amp: str, k: int = 3,
    alias: Callable[[str], str] | None = None, features: FeatureCache | None = None,
) -> Path:  # fmt: skip
    """Prediction and ground-truth contours on ``k`` slices of the test patients (as the paper's Figure 3).

    Titles name each case by ``alias(case id)`` when given (pseudonymised runs).

    Args:
        features: decode the panels from these cached backbone features (frozen mode) instead of running the
            backbone.
    """
    model.eval()
    picked, images, truths, preds, titles = [], [], [], [], []
    for row in rows[:2]:
        cid = row["case_id"]
        case_rows = cache.rows_for([cid])
        case_rows = case_rows[np.argsort(cache.slice_index[case_rows], kind="stable")]
        labels = np.moveaxis(np.asarray(cache.labels[case_rows]), 0, -1).astype(bool)
        for z in pick_slices(labels, k=k):
            picked.append(int(case_rows[z]))
            images.append(np.asarray(cache.images[case_rows[z]], dtype=np.float32))
            truths.append(labels[..., z])
            titles.append(f"{alias(cid) if alias else cid} z={z} (3D Dice {row['dice']:.3f})")
    if images:  # one batch for every panel
        if features is not None:
            probs = predict_cached_slices(
                model, features, cache, np.asarray(picked), batch_size=len(picked), device=device, amp=amp
            )
        else:
            probs = predict_slices(model, np.stack(images), batch_size=len(images), device=device, amp=amp)
        preds = list(probs >= 0.5)
    return overlay_figure(path, images, truths, preds, titles)


def write_outputs(
    out_dir: Path, model, cfg: Config, results: dict[str, Any], cache=None, device="cpu",
    alias: Callable[[str], str] | None = None, features: FeatureCache | None = None,
) -> None:  # fmt: skip
    """``model/`` (safetensors + config.json), ``metrics.json``, ``per_patient.csv`` and ``overlays.png``.

    With ``alias``, every case id in these files (and the overlay titles) is its pseudonym; ``features`` are the
    trial's cached backbone features (frozen mode), which the overlays decode from.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if cache is not None and results["per_patient"]:
        write_overlays(
            model, cache, results["per_patient"], out_dir / "overlays.png", device=device, amp=cfg.train.amp,
            alias=alias, features=features,
        )  # fmt: skip
    results = pseudonymize_results(results, alias)
    primary = metric_table.primary().val
    save_model(model, cfg, out_dir / "model", extra={primary: results[primary]})
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["case_id", "split", *metric_names()], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results["per_patient"])
    atomic_write(out_dir / "per_patient.csv", table.getvalue())
    write_json_atomic(out_dir / "metrics.json", {"config": cfg.to_flat(), **results})
