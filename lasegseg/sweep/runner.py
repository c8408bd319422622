"""The sweep driver: check everything, build the cache once, run the trials on Ray Tune, aggregate.

``python sweeps/fewshot.py`` starts a local Ray; under ``ray job submit`` (RAY_ADDRESS set) it joins the cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from lasegseg.environ import scoped_environ
from lasegseg.errors import ConfigError, DataError, LasegsegError

log = logging.getLogger("lasegseg.sweep")
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "sweeps" / "configs" / "demo.yaml"
STATE_FILE = "sweep_state.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fewshot.py",
        description="Run a few-shot / hyperparameter sweep of DINOv2 LA segmenters on Ray Tune, tracked in MLflow.",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="sweep YAML (default: sweeps/configs/demo.yaml)")
    p.add_argument("--data", default=None, help="dataset folder (default: data.path of the YAML, else a phantom)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the sweep's name)")
    p.add_argument("--storage-path", default=None, help="sweep output root, local path or URI (default: ./runs)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep: only unfinished trials run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as the cluster fits)")
    p.add_argument("--cpus-per-trial", type=float, default=None)
    p.add_argument("--gpus-per-trial", type=float, default=None, help="fractions allowed, e.g. 0.25")
    p.add_argument(
        "--frozen-gpus-per-trial", type=float, default=None, metavar="SHARE",
        help="GPU share of a frozen-backbone trial in (0, 1], e.g. 0.25 packs 4 on one GPU (default: --gpus-per-trial)",
    )  # fmt: skip
    p.add_argument("--max-failures", type=int, default=None, help="retries of a failing trial from its checkpoint")
    p.add_argument("--dry-run", action="store_true", help="check the sweep and list its trials, run nothing")
    p.add_argument(
        "--pseudonymize", action="store_true",
        help="log salted-hash aliases instead of patient ids taken from file names (key kept in the sweep folder)",
    )  # fmt: skip
    return p


def _sweep_dir(storage: str, name: str) -> Path:
    return (Path(storage).expanduser() / name).resolve()


def _resolve_data(args, spec, sweep_dir: Path) -> str:
    """The dataset folder: --data, else the YAML's data.path, else a seeded phantom made for the demo."""
    path = args.data or spec.base.get("data.path") or ""
    if path:
        if not Path(path).is_dir():
            raise DataError(f"{path}: dataset folder does not exist")
        return str(Path(path).resolve())
    from lasegseg.data.phantom import write_phantom

    phantom = sweep_dir / "phantom"
    if not (phantom / "dataset.json").is_file():
        print(f"no --data given: writing a 12-case phantom to {phantom}")
        write_phantom(phantom, cases=12, seed=0, layout="msd")
    return str(phantom)


def _check_pool(spec, trials: list[dict[str, Any]], cache) -> None:
    """Refuse few-shot sizes larger than the training pool before any trial starts."""
    from lasegseg.data.splits import split_patients

    for flat in trials:
        split = split_patients(
            cache.cases, flat["data.split_seed"], flat["data.val_fraction"], flat["data.test_fraction"]
        )
        if flat["data.patients"] > len(split.train):
            raise ConfigError(
                f"config key 'data.patients' asks for {flat['data.patients']} patients but the training pool "
                f"has {len(split.train)}"
            )


def _pseudonym_salt(sweep_dir: Path, case_ids: list[str]) -> bytes:
    """The sweep's salt (created once, kept private in the sweep folder) and the local alias → id key."""
    from lasegseg.data.pseudonym import KEY_FILE, Pseudonymizer, load_or_create_salt

    salt = load_or_create_salt(sweep_dir)
    key = Pseudonymizer(salt).write_key(sweep_dir / KEY_FILE, case_ids)
    print(f"pseudonymised: MLflow sees aliases only; the key stays local in {key}")
    return salt


def _local_cpus(res) -> int | None:
    """CPUs for the sweep's own local cluster: what ``max_concurrent`` trials use, at most this machine's.

    Ray starts (and lasegseg warms) one worker per CPU with the cluster; a one-at-a-time sweep on a large machine
    needs one, not a warm process per core. None (every core) when ``max_concurrent`` is 0 (as many as fit).
    """
    if not res.max_concurrent or res.cpus_per_trial <= 0:
        return None
    return max(1, min(os.cpu_count() or 1, math.ceil(res.max_concurrent * res.cpus_per_trial)))


def _init_ray(env: dict[str, str], cpus: float | None) -> None:
    """Join the cluster under ``RAY_ADDRESS``, else start a private local one whose workers start warm.

    On an existing cluster the variables travel in the job's ``runtime_env`` and its setup hook warms each trial's
    worker. The local cluster gets them from this process's environment instead, with ``RAY_preload_python_modules``
    so the workers Ray starts with it (one per CPU) import torch, transformers and the trial code while this
    driver is still building caches: Tune then places its first trials on those processes, whereas a job-level
    ``runtime_env`` would make Ray start new, cold ones for them.
    """
    # Per-epoch checkpoints of short trials trip Tune's "snapshotting too often" warning; it is expected here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        hook = "lasegseg.sweep.tune_runner.prewarm_worker"
        ray.init(runtime_env={"env_vars": env, "worker_process_setup_hook": hook}, log_to_driver=True)
        return
    from lasegseg.sweep.tune_runner import PRELOAD_MODULE

    # Ray's processes inherit the environment they are started with; this process's own is restored after.
    package_root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    preload = ",".join(m for m in (os.environ.get("RAY_preload_python_modules", ""), PRELOAD_MODULE) if m)
    # Ray keeps as many idle workers as CPUs are *unreserved*: once Tune's placement group holds a trial's CPUs,
    # the warm worker waiting for that trial would be stopped as surplus and a cold one started. A fixed limit
    # (the cluster's CPUs) keeps it.
    soft_limit = os.environ.get("RAY_num_workers_soft_limit") or str(int(cpus) if cpus else os.cpu_count() or 1)
    started_with = {**env, "RAY_preload_python_modules": preload, "RAY_num_workers_soft_limit": soft_limit,
                    "PYTHONPATH": pythonpath}  # fmt: skip
    with scoped_environ(started_with):
        # A private local cluster: dashboard off (nothing listens for browsers), token auth as Ray sets it up.
        ray.init(
            include_dashboard=False, num_cpus=int(cpus) if cpus else None,
            log_to_driver=True, configure_logging=True, logging_level=logging.WARNING,
        )  # fmt: skip
    _trial_actors_on_started_workers()


def _trial_actors_on_started_workers() -> None:
    """Let Tune's trial actors take the workers the local cluster started (warm) instead of new processes.

    Ray hands an actor only to a worker started for the same runtime environment, and Tune gives each trainable
    actor ``{"env_vars": DEFAULT_ENV_VARS + a few propagated ones}``, whose one default, ``PL_DISABLE_FORK``, is
    for PyTorch Lightning (not used here). With it dropped the environment is empty like that of the workers Ray
    started with the cluster, and the first trials skip a cold process start (~7 s of imports on 2 cores). If a
    later Ray moves this table, trials simply start cold again; ``worker_prewarmed`` in trial_timings.csv and
    the sweep tests show which happened.
    """
    try:
        from ray.tune.execution import class_cache

        class_cache.DEFAULT_ENV_VARS.pop("PL_DISABLE_FORK", None)
    except (ImportError, AttributeError):  # pragma: no cover - depends on Ray's internals
        pass


def ui_hint(tracking_uri: str, experiment_id: str) -> str:
    """How to open this sweep in the MLflow UI, in the model-training view (not the GenAI one)."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI: {tracking_uri.rstrip('/')}/{page}"
    return f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}  then open http://127.0.0.1:5000/{page}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except LasegsegError as exc:
        print(f"fewshot.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fewshot.py: interrupted; continue with --resume", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    from lasegseg.config import parse_overrides
    from lasegseg.sweep.spec import gpu_share, load_spec

    overrides = parse_overrides(args.set)
    spec = load_spec(args.config, overrides=overrides)
    res = spec.resources
    for flag, attr in (("cpus_per_trial", "cpus_per_trial"), ("gpus_per_trial", "gpus_per_trial"),
                       ("max_concurrent", "max_concurrent"), ("max_failures", "max_failures")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            if value < 0:
                raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
            setattr(res, attr, value)
    if args.frozen_gpus_per_trial is not None:
        res.frozen_gpus_per_trial = gpu_share(args.frozen_gpus_per_trial, "--frozen-gpus-per-trial")
    name = args.experiment or spec.name
    storage = args.storage_path or os.environ.get("LASEGSEG_STORAGE", "runs")
    sweep_dir = _sweep_dir(storage, name)
    data_path = _resolve_data(args, spec, sweep_dir)
    spec.base["data.path"] = data_path
    trials = spec.trials()
    print(
        f"sweep '{name}': {len(trials)} trials"
        + (f" after screening {len(spec.screening_cells())} cells" if spec.screen else "")
    )
    if args.dry_run:
        from lasegseg.config import from_flat, run_name

        for flat in trials:
            gpus = res.for_trial(flat)["gpu"]
            print("  " + run_name(from_flat(flat)) + (f"  [{gpus:g} GPU]" if gpus else ""))
        return 0

    from lasegseg.sweep import tracking

    tracking_uri = (
        args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_tracking_uri(sweep_dir)
    )
    tracking.check_reachable(tracking_uri)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state_path = sweep_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if args.resume and not state:
        raise LasegsegError(f"{state_path}: nothing to resume (no earlier sweep named '{name}' under {storage})")
    if not args.resume and state.get("status") == "running":
        print(f"note: an earlier run of '{name}' did not finish; starting a new sweep (use --resume to continue it)")

    # Decode once, driver side: every trial memory-maps this cache instead of reading NIfTI again.
    from lasegseg.config import from_flat
    from lasegseg.train.trial import open_cache

    cache = open_cache(from_flat(trials[0]))
    _check_pool(spec, trials, cache)
    # Ray first: the workers it starts import torch & co. while this process builds features and the MLflow store.
    from lasegseg.sweep.tune_runner import PREWARM_ENV

    env = {**tracking.tracking_env(tracking_uri), "LASEGSEG_CACHE": os.environ.get("LASEGSEG_CACHE", "")}
    first = next((t for t in trials if t.get("model.backbone", "none") != "none"), None)
    if first is not None:
        env[PREWARM_ENV] = f"{first['model.backbone']}|{first.get('model.registers', False)}"
    _init_ray({k: v for k, v in env.items() if v}, _local_cpus(res))
    # Frozen backbones: one pass over every slice now, so frozen trials only memory-map the features.
    from lasegseg.train.features import build_sweep_features

    feature_paths = build_sweep_features(trials, cache)
    # A resumed sweep keeps the choice of its first run: one sweep never mixes real ids and aliases.
    pseudonymize = bool(args.pseudonymize or (args.resume and state.get("pseudonymize")))
    salt = _pseudonym_salt(sweep_dir, cache.cases) if pseudonymize else None

    artifact_root = None if tracking_uri.startswith(("http://", "https://")) else (sweep_dir / "mlartifacts").as_uri()
    experiment_id = tracking.ensure_experiment(tracking_uri, name, artifact_location=artifact_root)
    if args.resume:
        parent_run_id = state["parent_run_id"]
        tracking.client(tracking_uri).update_run(parent_run_id, status="RUNNING")
    else:
        parent_run_id = tracking.start_parent(
            tracking_uri, experiment_id, name,
            params={"sweep.config": args.config, "sweep.trials": len(trials), "data.path": data_path,
                    "sweep.pseudonymize": pseudonymize, **{f"sweep.set.{k}": v for k, v in overrides.items()}},
            tags={"lasegseg.sweep_dir": str(sweep_dir)},
        )  # fmt: skip
        tracking.client(tracking_uri).log_artifact(parent_run_id, args.config)
    state = {"status": "running", "parent_run_id": parent_run_id, "experiment_id": experiment_id,
             "tracking_uri": tracking_uri, "name": name, "pseudonymize": pseudonymize}  # fmt: skip
    state_path.write_text(json.dumps(state, indent=2))

    from lasegseg.sweep.tune_runner import run_stages

    ctx = {
        "tracking_uri": tracking_uri, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
        "cache_path": str(cache.path), "threads": max(1, int(res.cpus_per_trial)), "feature_paths": feature_paths,
    }  # fmt: skip
    if salt is not None:
        ctx |= {"pseudonym_salt": salt.decode("utf-8"), "case_ids": list(cache.cases)}
    outcome = run_stages(spec, ctx, sweep_dir, resume=args.resume)

    from lasegseg.sweep.aggregate import aggregate, format_table

    client = tracking.client(tracking_uri)
    failed = outcome["failed"]
    try:
        summary = aggregate(tracking_uri, name, sweep_dir, parent_run_id=parent_run_id)
        print(format_table(summary))
    except LasegsegError as exc:
        print(f"aggregation: {exc}", file=sys.stderr)
        summary = None
    client.set_terminated(parent_run_id, "FINISHED" if summary is not None else "FAILED")
    state["status"] = "finished"
    state_path.write_text(json.dumps(state, indent=2))
    print(f"results: {sweep_dir}  (MLflow: {tracking_uri}, experiment '{name}', parent run {parent_run_id})")
    print(ui_hint(tracking_uri, experiment_id))
    if failed:
        print(f"{len(failed)} trial(s) failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0 if summary is not None else 1
