"""A fake sweep in a sqlite MLflow store, written as the sweep writes it (the model folder is in tests/conftest.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lasegseg.config import Config, config_hash, run_name

IMAGE_SIZE = 28


def tiny_config(**flat) -> Config:
    base = {"model.backbone": "tiny", "model.decoder": "linear", "model.mode": "frozen", "data.image_size": IMAGE_SIZE}
    return Config().replace(**{**base, **flat})


def log_trial(client, exp_id: str, parent_id: str, cfg: Config, metrics: dict, model_dir: Path | None = None) -> str:
    """One FINISHED child run: tags, params = flat config, final metrics, optionally model/ and metrics.json."""
    from mlflow.entities import Metric, Param

    flat = cfg.to_flat()
    tags = {"lasegseg.role": "trial", "mlflow.parentRunId": parent_id, "lasegseg.cell": config_hash(flat, ("seed",))}
    run = client.create_run(exp_id, run_name=run_name(cfg), tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        params=[Param(k, str(v)) for k, v in flat.items()],
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
    )
    if model_dir is not None:
        client.log_artifacts(run_id, str(model_dir), artifact_path="model")
        payload = {"split": {"train": ["a", "b"], "val": ["c"], "test": ["d"]}, "n_train_patients": 2}
        path = Path(model_dir).parent / f"run-{run_id}" / "metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps(payload))
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id


EXPERIMENT = "fake-sweep"
# (decoder, patients) → per-seed (val_dice, val_iou, test_dice). Cell A is best on validation, B best on test,
# C has the single best validation seed but a worse mean; D is best by val IoU.
CELLS = {
    ("linear", 2): [(0.80, 0.60, 0.50), (0.84, 0.62, 0.52)],  # A
    ("linear", 4): [(0.70, 0.55, 0.90), (0.72, 0.56, 0.92)],  # B
    ("conv", 2): [(0.95, 0.50, 0.60), (0.40, 0.50, 0.61)],  # C
    ("conv", 4): [(0.78, 0.80, 0.70), (0.79, 0.81, 0.71)],  # D
}


def fake_sweep(root: Path, model_dir: Path | None = None) -> dict:
    """A sweep of the four :data:`CELLS` × two seeds in a sqlite store under ``root`` (each run with ``model_dir`` as
    its model artifact when given), an experiment without trials and one whose trial logged no validation metric."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp_id, run_name="sweep", tags={"lasegseg.role": "sweep"}).info.run_id
    runs = {}
    for (decoder, patients), seeds in CELLS.items():
        for seed, (val, iou, test) in enumerate(seeds):
            cfg = tiny_config(**{"model.decoder": decoder, "data.patients": patients, "seed": seed})
            metrics = {"best_val_dice": val, "best_val_iou": iou, "test_dice_mean": test, "test_iou_mean": test - 0.1}
            runs[(decoder, patients, seed)] = log_trial(client, exp_id, parent, cfg, metrics, model_dir)
    for name in ("empty", "no-val"):
        other = client.create_experiment(name, artifact_location=(root / name).as_uri())
        other_parent = client.create_run(other, tags={"lasegseg.role": "sweep"}).info.run_id
        if name == "no-val":
            log_trial(client, other, other_parent, tiny_config(), {"test_dice_mean": 0.9})
    return {"uri": uri, "runs": runs, "root": root}
