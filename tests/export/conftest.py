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
