"""A fake sweep written to a sqlite MLflow store exactly as the sweep writes it, shared by the results tests."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pandas as pd
import pytest

from lasegseg.config import Config, config_hash, run_name
from lasegseg.results.trials import load_trials

DECODERS = ("linear", "multiscale")
MODES = ("frozen", "finetune")
PATIENTS = (2, 0)
SEEDS = (0, 1, 2)
N_TRAIN = 12
EXPERIMENT = "fewshot"


def log_trial(client, exp_id, parent_id, cfg, metrics, status="FINISHED", start_time=None, drop=()):
    """Log a trial run as the sweep does; ``drop``: config keys the run does not log (a run from an older version)."""
    from mlflow.entities import Metric, Param

    flat = {k: v for k, v in cfg.to_flat().items() if k not in drop}
    run = client.create_run(
        exp_id,
        run_name=run_name(cfg),
        start_time=start_time,
        tags={
            "lasegseg.role": "trial",
            "mlflow.parentRunId": parent_id,
            "lasegseg.cell": config_hash(flat, exclude=("seed",)),
        },
    )
    now = int(time.time() * 1000)
    history = [Metric(k, 0.1 * (e + 1), now, e) for e in range(3) for k in ("train_loss", "val_dice", "val_iou")]
    final = [Metric(k, v, now, 3) for k, v in metrics.items()]
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in flat.items()], metrics=history + final)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="package")
def store(tmp_path_factory):
    """Two sweeps (parents) in one experiment, a FAILED trial, and an experiment without trials.

    The older sweep's trials predate ``eval.nsd_tolerance_mm`` and NSD: they log neither.
    """
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    kind = {"mlflow.experimentKind": "custom_model_development"}
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri(), tags=kind)
    t0 = int(time.time() * 1000)
    old_parent = client.create_run(exp_id, run_name="old", start_time=t0 - 60_000, tags={"lasegseg.role": "sweep"})
    parent = client.create_run(exp_id, run_name="sweep", start_time=t0, tags={"lasegseg.role": "sweep"})
    parent_id = parent.info.run_id

    rng = np.random.default_rng(0)
    known: dict[tuple, dict[str, list[float]]] = {}
    base = Config().replace(**{"data.path": "/data/msd", "model.backbone": "dinov2-small", "optim.lr": 3e-4})
    for dec, mode, patients in itertools.product(DECODERS, MODES, PATIENTS):
        cell = known.setdefault((dec, mode, patients), {"dice": [], "iou": [], "nsd": [], "val": []})
        for seed in SEEDS:
            dice, iou, val = rng.uniform(0.6, 0.9), rng.uniform(0.4, 0.8), rng.uniform(0.5, 0.95)
            nsd = rng.uniform(0.5, 0.9)
            cell["dice"].append(dice)
            cell["iou"].append(iou)
            cell["nsd"].append(nsd)
            cell["val"].append(val)
            cfg = base.replace(**{"model.decoder": dec, "model.mode": mode, "data.patients": patients, "seed": seed})
            metrics = {
                "test_dice_mean": dice,
                "test_dice_std": 0.05,
                "test_iou_mean": iou,
                "test_iou_std": 0.04,
                "test_nsd_mean": nsd,
                "test_nsd_std": 0.03,
                "test_hd95_mean": 5.0 + seed,
                "test_hd95_n_undefined": seed,
                "val_dice": val,
                "val_iou": val - 0.1,
                "n_train_patients": N_TRAIN,
            }
            log_trial(client, exp_id, parent_id, cfg, metrics)
    failed = base.replace(**{"model.decoder": "linear", "model.mode": "frozen", "data.patients": 2, "seed": 3})
    log_trial(client, exp_id, parent_id, failed, {"test_dice_mean": 0.0, "val_dice": 0.99}, status="FAILED")
    for seed in (0, 1):
        other = base.replace(**{"model.decoder": "conv", "seed": seed})
        metrics = {"test_dice_mean": 0.5, "val_dice": 0.5, "test_hd95_mean": 4.0}
        log_trial(client, exp_id, old_parent.info.run_id, other, metrics, drop=("eval.nsd_tolerance_mm",))

    client.create_experiment("empty", artifact_location=(root / "empty").as_uri(), tags=kind)
    empty_id = client.get_experiment_by_name("empty").experiment_id
    client.create_run(empty_id, tags={"lasegseg.role": "sweep"})
    return {"uri": uri, "parent": parent_id, "old_parent": old_parent.info.run_id, "known": known, "root": root}


@pytest.fixture(scope="package")
def trials(store):
    return load_trials(store["uri"], EXPERIMENT, store["parent"])


def two_cell_trials() -> pd.DataFrame:
    """Trial rows of two cells (linear, conv) × two seeds, as :func:`load_trials` returns them."""
    base = Config().to_flat()
    rows = []
    for decoder, shift in (("linear", 0.0), ("conv", 0.05)):
        for seed in (0, 1):
            dice = 0.7 + shift + 0.01 * seed
            rows.append({**base, "model.decoder": decoder, "seed": seed, "test_dice_mean": dice,
                         "test_iou_mean": dice - 0.1, "val_dice": dice, "test_hd95_mean": 4.0})  # fmt: skip
    return pd.DataFrame(rows)


PATIENTS_EXPERIMENT = "cmp"
N_PATIENTS = 8
PATIENT_SEEDS = (0, 1)
# (decoder, backbone): val Dice, per-patient test Dice offset. "multiscale" has the best test Dice but not the
# best validation Dice: the reference must still be "linear".
PATIENT_CELLS = {
    ("linear", "tiny"): (0.90, 0.00),
    ("multiscale", "tiny"): (0.85, 0.08),
    ("conv", "tiny"): (0.80, -0.05),
    ("unet", "none"): (0.70, -0.10),
}


def _log_patient_trial(
    client, exp_id, parent_id, cfg, metrics, per_patient: pd.DataFrame | None, tmp, status="FINISHED"
):
    from mlflow.entities import Metric, Param

    flat = cfg.to_flat()
    tags = {"lasegseg.role": "trial", "mlflow.parentRunId": parent_id, "lasegseg.cell": config_hash(flat, ("seed",))}
    run = client.create_run(exp_id, run_name=run_name(cfg), tags=tags)
    now = int(time.time() * 1000)
    final = [Metric(k, v, now, 0) for k, v in metrics.items()]
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in flat.items()], metrics=final)
    if per_patient is not None:
        path = tmp / run.info.run_id / "per_patient.csv"
        path.parent.mkdir(parents=True)
        per_patient.to_csv(path, index=False)
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="package")
def patients_store(tmp_path_factory):
    """One sweep of 4 cells × 2 seeds on 8 test patients, a run without per_patient.csv and a FAILED run."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    kind = {"mlflow.experimentKind": "custom_model_development"}
    exp_id = client.create_experiment(PATIENTS_EXPERIMENT, artifact_location=(root / "artifacts").as_uri(), tags=kind)
    parent = client.create_run(exp_id, run_name="sweep", tags={"lasegseg.role": "sweep"}).info.run_id
    rng = np.random.default_rng(0)
    base_dice = rng.uniform(0.6, 0.85, N_PATIENTS)
    cases = [f"la_{i:03d}" for i in range(N_PATIENTS)]
    truth: dict[str, dict] = {}
    base = Config().replace(**{"data.path": "/data/msd", "data.patients": 2})
    for (decoder, backbone), (val, offset) in PATIENT_CELLS.items():
        cfg0 = base.replace(**{"model.decoder": decoder, "model.backbone": backbone})
        cell = config_hash(cfg0.to_flat(), exclude=("seed",))
        per_seed = []
        for seed in PATIENT_SEEDS:
            dice = np.clip(base_dice + offset + rng.normal(0, 0.01, N_PATIENTS), 0, 1)
            per_seed.append(dice)
            table = pd.DataFrame(
                {"case_id": cases, "split": "test", "dice": dice, "iou": dice / (2 - dice), "hd95": 10 * (1 - dice),
                 "slice_dice": dice}
            )  # fmt: skip
            # A validation row must never enter the test comparison.
            table = pd.concat([table, pd.DataFrame([{"case_id": "la_val", "split": "val", "dice": 0.0}])])
            metrics = {"test_dice_mean": float(dice.mean()), "val_dice": val + 0.001 * seed}
            _log_patient_trial(client, exp_id, parent, cfg0.replace(seed=seed), metrics, table, root / "src")
        truth[cell] = {"decoder": decoder, "dice": np.mean(per_seed, axis=0), "val": val}
    # Finished but without its file (skipped with a warning), and a failed trial (never read).
    linear = base.replace(**{"model.decoder": "linear", "model.backbone": "tiny", "seed": 2})
    _log_patient_trial(client, exp_id, parent, linear, {"val_dice": 0.9}, None, root / "src")
    _log_patient_trial(client, exp_id, parent, linear.replace(seed=3), {"val_dice": 0.9}, None, root / "src", "FAILED")
    return {"uri": uri, "parent": parent, "truth": truth, "client": client}
