"""Export a sweep's best cell (chosen on validation) with a model card, and register it in MLflow.

Selection (:mod:`lasegseg.results.selection`) never looks at test metrics: cells are ranked by the mean over seeds of
a validation metric, and within the best cell the seed run with the best value of that metric is exported (or every
seed, with ``ensemble=True``). The registered model version points at the run's own
``model/`` artifact (safetensors + config.json); nothing is pickled and loading rebuilds the model from its config.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException

from lasegseg.data.preprocess import Preprocessing
from lasegseg.errors import LasegsegError, first_line
from lasegseg.fsio import atomic_dir, commit_dir, write_json_atomic
from lasegseg.results.selection import Selection, card_metrics, nan_to_none, select_best
from lasegseg.results.trials import download_artifact
from lasegseg.tracking.client import client as tracking_client
from lasegseg.train.checkpoint import CONFIG, WEIGHTS, read_model_config, sha256_file

CHAMPION = "champion"
METRICS_FILE = "metrics.json"
MODEL_CARD = "MODEL_CARD.md"
MEMBERS = "members"


# --------------------------------------------------------------------------------------------------- export


def _copy_model(src: Path, dst: Path, run_id: str) -> dict[str, Any]:
    """Copy a run's ``model/`` folder unchanged (so its hash stays valid) after checking the hash."""
    meta = read_model_config(src)
    if not (src / WEIGHTS).is_file():
        raise LasegsegError(f"run {run_id}: artifact model/{WEIGHTS} is missing")
    if sha256_file(src / WEIGHTS) != meta.get("weights_sha256"):
        raise LasegsegError(f"run {run_id}: artifact model/{WEIGHTS} does not match its SHA-256 in {CONFIG}")
    dst.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, CONFIG):
        shutil.copy2(src / name, dst / name)
    return meta


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    obj = nan_to_none(obj)
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def export_best(
    tracking_uri: str,
    experiment: str,
    out: str | Path,
    *,
    metric: str = "val_dice",
    parent_run_id: str | None = None,
    register: str | None = None,
    ensemble: bool = False,
) -> dict[str, Any]:
    """Select on validation, then write ``out`` (atomically) and optionally register the chosen run.

    ``out`` holds ``model.safetensors`` and ``config.json`` (the chosen run's, byte for byte), ``metrics.json``
    (the cell's mean/std over seeds, run ids, experiment, tracking URI, selection metric) and ``MODEL_CARD.md``.
    With ``ensemble``, every seed's model is also copied to ``members/<run name>/`` and listed in metrics.json;
    :func:`lasegseg.api.load_model` then averages the members' probabilities.

    Returns:
        the metrics.json payload, plus ``registered`` (``{"name", "version", "alias"}``) when registered.
    """
    start = time.perf_counter()
    selection = select_best(tracking_uri, experiment, metric, parent_run_id)
    out = Path(out)
    tmp = atomic_dir(out)
    try:
        with tempfile.TemporaryDirectory(prefix="lasegseg-export-") as dl:
            best = selection.best_run_id
            model_dir = download_artifact(tracking_uri, best, "model", Path(dl) / best)
            meta = _copy_model(model_dir, tmp, best)
            run_metrics = json.loads(download_artifact(tracking_uri, best, METRICS_FILE, Path(dl) / best).read_text())
            members = []
            if ensemble:
                for row in selection.trials.itertuples(index=False):
                    member_dir = download_artifact(tracking_uri, row.run_id, "model", Path(dl) / row.run_id)
                    rel = f"{MEMBERS}/{_safe_name(row.run_name, row.run_id)}"
                    _copy_model(member_dir, tmp / rel, row.run_id)
                    members.append(rel)
        payload = _metrics_payload(selection, tracking_uri, experiment, run_metrics, members)
        payload["registered_name"] = register
        write_json_atomic(tmp / METRICS_FILE, _json_safe(payload))
        (tmp / MODEL_CARD).write_text(model_card(selection, meta["config"], payload), encoding="utf-8")
        commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if register:
        payload["registered"] = register_run(tracking_uri, register, selection)
    payload["export_seconds"] = time.perf_counter() - start
    return payload


def best_run_card(tracking_uri: str, experiment: str, selection: Selection, dst: Path) -> str:
    """The model card :func:`export_best` would write for ``selection``, read from the best run's ``metrics.json``
    and ``model/config.json`` only (not its weights).

    Args:
        tracking_uri: the MLflow URI.
        experiment: the sweep's experiment.
        selection: :func:`select_best`.
        dst: a scratch folder for the two downloads.
    """
    best = selection.best_run_id
    config_file = download_artifact(tracking_uri, best, f"model/{CONFIG}", Path(dst) / best)
    meta = read_model_config(config_file.parent)
    run_metrics = json.loads(download_artifact(tracking_uri, best, METRICS_FILE, Path(dst) / best).read_text())
    payload = _metrics_payload(selection, tracking_uri, experiment, run_metrics, [])
    return model_card(selection, meta["config"], payload)


def _safe_name(run_name: Any, run_id: str) -> str:
    text = str(run_name or run_id)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("._") or run_id


def _metrics_payload(
    selection: Selection, tracking_uri: str, experiment: str, run_metrics: dict[str, Any], members: list[str]
) -> dict[str, Any]:
    best = selection.trials.iloc[0]
    split = run_metrics.get("split", {})
    return {
        "experiment": experiment,
        "tracking_uri": tracking_uri,
        "selection_metric": selection.metric,
        "selection": f"best cell by mean {selection.metric} over seeds, then the seed with the best {selection.metric}",
        "cell": selection.cell["cell"],
        "n": int(selection.cell["n"]),
        "seeds": selection.cell.get("seeds", ""),
        "run_id": selection.best_run_id,
        "run_name": best.get("run_name"),
        "run_ids": selection.run_ids,
        "ensemble": members,
        "cell_metrics": selection.stats,
        "run_metrics": {m: best.get(m) for m in card_metrics()},
        "n_train_patients": run_metrics.get("n_train_patients"),
        "split_sizes": {k: len(v) for k, v in split.items()},
        "split": split,
    }


def _pm(stat: dict[str, float], fmt: str = ".3f") -> str:
    mean, std = stat.get("mean"), stat.get("std")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return format(mean, fmt)
    return f"{mean:{fmt}} ± {std:{fmt}}"


def _fewshot_words(config: dict[str, Any]) -> str:
    patients, fraction = config.get("data.patients", 0), config.get("data.fraction", 1.0)
    if patients:
        return f"{patients} training patients"
    if fraction < 1:
        return f"{fraction:g} of the training slices"
    return "all training patients"


def _model_words(config: dict[str, Any]) -> str:
    backbone = str(config.get("model.backbone", ""))
    if backbone == "none":
        return "a UNet segmenter (no foundation-model backbone)"
    name = backbone.lower()
    family = "DINOv3" if "dinov3" in name else "DINOv2" if "dinov2" in name or name == "tiny" else "ViT-backbone"
    return f"{family} segmenters"


def model_card(selection: Selection, config: dict[str, Any], payload: dict[str, Any]) -> str:
    """A Markdown model card: data, splits, model, preprocessing, metrics ± std over seeds, use, limits, loading."""
    sizes = payload["split_sizes"]
    n_train = payload.get("n_train_patients")
    fewshot = _fewshot_words(config)
    path = str(config.get("data.path", ""))
    phantom = "phantom" in path.lower()
    st = payload["cell_metrics"]
    n = payload["n"]
    name = payload.get("registered_name") or "NAME"
    registers = " (with registers)" if config.get("model.registers") else ""
    prep = Preprocessing.from_flat(config)
    lines = [
        f"# LA segmenter — {config.get('model.backbone')} · {config.get('model.decoder')} · {config.get('model.mode')}",
        "",
        f"Best cell of MLflow experiment `{payload['experiment']}` ({payload['tracking_uri']}) by the mean "
        f"{selection.metric} over {n} seed(s); exported run `{payload['run_id']}` ({payload['run_name']}).",
        "",
        "## Data",
        f"- Dataset: `{path}` (layout `{config.get('data.layout')}`)" + (" — a synthetic phantom" if phantom else ""),
        f"- Patient-level split (seed {config.get('data.split_seed')}): train {sizes.get('train', '?')}, "
        f"validation {sizes.get('val', '?')}, test {sizes.get('test', '?')} patients",
        f"- Few-shot subset: {fewshot}" + (f" ({n_train} patients trained on)" if n_train is not None else ""),
        "",
        "## Model",
        f"- Backbone: `{config.get('model.backbone')}`{registers}",
        f"- Decoder: `{config.get('model.decoder')}` (width {config.get('model.decoder_width')})",
        f"- Mode: `{config.get('model.mode')}`",
        f"- Training: lr {config.get('optim.lr')}, epochs {config.get('train.epochs')}, "
        f"batch size {config.get('train.batch_size')}",
        "",
        "## Preprocessing",
        f"- Axial slices of the RAS+ canonical volume, intensities clipped at percentiles {prep.clip_low}"
        f"–{prep.clip_high} and scaled to [0, 1], resized to {prep.image_size}² px;",
        "  the mask is resampled back to the native grid and written with the input's affine/header.",
        "",
        f"## Metrics (mean ± sample std over {n} seed(s) of the cell)",
        "| metric | cell | exported run |",
        "|---|---|---|",
    ]
    for m in card_metrics():
        run_value = payload["run_metrics"].get(m)
        shown = "–" if run_value is None or pd.isna(run_value) else f"{run_value:.3f}"
        lines.append(f"| {m} | {_pm(st.get(m, {}))} | {shown} |")
    if payload["ensemble"]:
        lines += ["", f"Ensemble: {len(payload['ensemble'])} members (one per seed), probabilities averaged."]
    lines += [
        "",
        "## Intended use",
        f"Research only: studying {_model_words(config)} of the left atrium in MRI. **Not for clinical use**,",
        "diagnosis or treatment decisions.",
        "",
        "## Limits",
        f"- Trained on {n_train if n_train is not None else sizes.get('train', '?')} patients of one dataset; "
        "expect lower accuracy on other scanners, sequences and pathologies.",
        f"- Test metrics come from {sizes.get('test', '?')} patient(s); with few seeds the ± std is itself uncertain.",
    ]
    if phantom:
        lines.append("- Trained on a synthetic phantom: a pipeline demonstration, meaningless on real scans.")
    lines += [
        "",
        "## How to load it",
        "```bash",
        "lasegseg predict THIS_FOLDER scan.nii.gz --out mask.nii.gz          # or a folder of scans → --out masks/",
        f"lasegseg predict models:/{name}@{CHAMPION} scan.nii.gz --out mask.nii.gz --tracking-uri URI",
        "```",
        "```python",
        "import lasegseg",
        'model = lasegseg.load_model("THIS_FOLDER")   # verifies the SHA-256, rebuilds from config.json, no pickle',
        "mask = model.predict_volume(array, affine=affine)   # boolean mask, same shape as array",
        'model.predict_file("scan.nii.gz", "mask.nii.gz")',
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- registry


def register_run(tracking_uri: str, name: str, selection: Selection) -> dict[str, Any]:
    """Register the chosen run's ``model/`` artifact folder as a new version of ``name`` with alias ``champion``.

    The version's source is the artifact folder itself (safetensors + config.json), not an MLflow flavour, so it
    loads with :func:`lasegseg.api.load_model` without pickle. The version is tagged with the cell's metrics.
    """
    run_id = selection.best_run_id
    try:
        client = tracking_client(tracking_uri, registry=True)
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="lasegseg LA segmenter (safetensors + config.json)")
        run = client.get_run(run_id)
        tags = {
            "lasegseg.cell": str(selection.cell["cell"]),
            "lasegseg.selection_metric": selection.metric,
            "lasegseg.seeds": str(selection.cell.get("seeds", "")),
        }
        for m, stat in selection.stats.items():
            for k in ("mean", "std"):
                if stat[k] is not None and math.isfinite(stat[k]):
                    tags[f"{m}_{k}"] = f"{stat[k]:.6g}"
        version = client.create_model_version(
            name, source=run.info.artifact_uri.rstrip("/") + "/model", run_id=run_id, tags=tags
        )
        client.set_registered_model_alias(name, CHAMPION, version.version)
    except MlflowException as exc:
        raise LasegsegError(f"cannot register model '{name}' at {tracking_uri}: {first_line(exc)}") from None
    return {"name": name, "version": int(version.version), "alias": CHAMPION}
