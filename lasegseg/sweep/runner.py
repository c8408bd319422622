"""The sweep driver: check everything, build the cache once, run the trials on Ray Tune, aggregate.

``python sweeps/fewshot.py`` (or ``lasegseg sweep``) starts a local Ray; under ``ray job submit`` (RAY_ADDRESS set)
it joins the cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lasegseg import options, process
from lasegseg.errors import ConfigError, DataError, LasegsegError
from lasegseg.paths import DEFAULT_STORAGE, STORAGE_ENV, cache_root, stable_storage_root

log = logging.getLogger("lasegseg.sweep")
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "sweeps" / "configs" / "demo.yaml"
STATE_FILE = "sweep_state.json"
# A local sweep's record of which feature cache serves each frozen backbone (caches.publish_features).
FEATURE_INDEX = ".feature_index"
_RESOURCE_FLAGS = ("cpus_per_trial", "gpus_per_trial", "max_concurrent", "max_failures")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's flags, shared by ``sweeps/fewshot.py`` and ``lasegseg sweep``."""
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="sweep YAML (default: sweeps/configs/demo.yaml)")
    p.add_argument("--data", default=None, help="dataset folder (default: data.path of the YAML, else a phantom)")
    options.add_tracking(p, help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite in the sweep folder)")
    options.add_experiment(p, required=False, help="MLflow experiment name (default: the sweep's name)")
    p.add_argument("--storage-path", default=None, help="sweep output root, local path or URI (default: ./runs)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep: only unfinished trials run")
    options.add_set(p, help="override a config key, repeatable")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as the cluster fits)")
    p.add_argument("--cpus-per-trial", type=float, default=None)
    p.add_argument("--gpus-per-trial", type=float, default=None, help="fractions allowed, e.g. 0.25")
    p.add_argument(
        "--frozen-gpus-per-trial", type=float, default=None, metavar="SHARE",
        help="GPU share of a frozen-backbone trial in (0, 1], e.g. 0.25 packs 4 on one GPU (default: --gpus-per-trial)",
    )  # fmt: skip
    p.add_argument("--max-failures", type=int, default=None, help="retries of a failing trial from its checkpoint")
    p.add_argument("--dry-run", action="store_true", help="check the sweep and list its trials, run nothing")
    options.add_pseudonymize(
        p, help="log salted-hash aliases instead of patient ids taken from file names (key kept in the sweep folder)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fewshot.py",
        description="Run a few-shot / hyperparameter sweep of DINOv2 LA segmenters on Ray Tune, tracked in MLflow.",
    )
    add_arguments(p)
    return p


@dataclass
class SweepPlan:
    """What a sweep will run, checked before anything starts.

    Args:
        spec: the parsed sweep file, with the command line's resource flags applied.
        name: the sweep's (and MLflow experiment's) name.
        root: where the sweep's results live (``<storage>/<name>``): a local folder, ``s3://`` or ``gs://``.
        sweep_dir: the sweep's local folder: ``root`` itself when local, else a local working copy.
        trials: every trial's flat config.
        overrides: the ``--set`` values.
    """

    spec: Any
    name: str
    root: Any
    sweep_dir: Path
    trials: list[dict[str, Any]]
    overrides: dict[str, Any]


def plan_sweep(args: argparse.Namespace) -> SweepPlan:
    """Parse the sweep file and flags, find the data and expand the trials; nothing is started."""
    from lasegseg.config import parse_overrides
    from lasegseg.sweep.spec import load_spec

    overrides = parse_overrides(args.set)
    args.config = str(Path(args.config).resolve())  # Ray may change the working folder once it is joined
    spec = load_spec(args.config, overrides=overrides)
    _apply_resource_flags(args, spec.resources)
    name = args.experiment or spec.name
    root = _storage_root(args.storage_path).join(name)
    sweep_dir = Path(root.path) if not root.remote else cache_root() / "sweeps" / name
    spec.base["data.path"] = _resolve_data(args, spec, sweep_dir)
    return SweepPlan(spec, name, root, sweep_dir, spec.trials(), overrides)


def _storage_root(flag: str | None):
    """``--storage-path``, else ``$LASEGSEG_STORAGE``, else ``./runs``; under ``ray job submit`` a relative folder is
    taken under ``~/lasegseg`` instead, since the job runs in a temporary copy of the working dir that Ray deletes."""
    from lasegseg.sweep.cluster import in_job_working_dir
    from lasegseg.sweep.storage import parse_storage

    text = flag or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    root = parse_storage(text)
    if not root.remote and in_job_working_dir() and not Path(text).expanduser().is_absolute():
        root = parse_storage(str(stable_storage_root().parent / text))
    return root


def _apply_resource_flags(args: argparse.Namespace, res) -> None:
    from lasegseg.sweep.spec import gpu_share

    for flag in _RESOURCE_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            if value < 0:
                raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
            setattr(res, flag, value)
    if args.frozen_gpus_per_trial is not None:
        res.frozen_gpus_per_trial = gpu_share(args.frozen_gpus_per_trial, "--frozen-gpus-per-trial")


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


def _print_trials(plan: SweepPlan) -> int:
    from lasegseg.config import from_flat, run_name

    for flat in plan.trials:
        gpus = plan.spec.resources.for_trial(flat)["gpu"]
        print("  " + run_name(from_flat(flat)) + (f"  [{gpus:g} GPU]" if gpus else ""))
    return 0


def _check_pool(trials: list[dict[str, Any]], cache) -> None:
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


def _load_state(plan: SweepPlan, resume: bool) -> dict[str, Any]:
    """The sweep's own state file (parent run, tracking URI, pseudonymisation) from an earlier run, if any."""
    if plan.root.remote:
        _pull_files(plan)
    path = plan.sweep_dir / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    if resume and not state:
        raise LasegsegError(f"{plan.root.uri}: nothing to resume (no earlier sweep named '{plan.name}' there)")
    if not resume and state.get("status") == "running":
        print(f"note: an earlier run of '{plan.name}' did not finish; starting a new sweep (--resume continues it)")
    return state


def _save_state(plan: SweepPlan, state: dict[str, Any]) -> None:
    from lasegseg.fsio import write_json_atomic

    write_json_atomic(plan.sweep_dir / STATE_FILE, state)
    if plan.root.remote:
        plan.root.write_bytes(STATE_FILE, (plan.sweep_dir / STATE_FILE).read_bytes())


def _pull_files(plan: SweepPlan) -> None:
    """An object-store sweep's own files (state, screening, timings) into the local working folder, for --resume."""
    from lasegseg.fsio import atomic_write
    from lasegseg.sweep.tune_runner import SCREENING_FILE, TIMINGS_FILE

    for name in (STATE_FILE, SCREENING_FILE, TIMINGS_FILE):
        data = plan.root.read_bytes(name)
        if data is not None:
            atomic_write(plan.sweep_dir / name, data)


def _push_files(plan: SweepPlan) -> None:
    """The sweep's own files and summary to its object-store root; the pseudonym key and salt never leave."""
    if not plan.root.remote:
        return
    private = {".pseudonym_salt", "pseudonyms.csv", "mlflow.db"}
    for path in sorted(plan.sweep_dir.iterdir()):
        if path.is_file() and path.name not in private and not path.name.startswith(("mlflow.db", ".")):
            plan.root.write_bytes(path.name, path.read_bytes())


def _pseudonym_salt(sweep_dir: Path, case_ids: list[str]) -> bytes:
    """The sweep's salt (created once, kept private in the sweep folder) and the local alias → id key."""
    from lasegseg.data.pseudonym import KEY_FILE, Pseudonymizer, load_or_create_salt

    salt = load_or_create_salt(sweep_dir)
    key = Pseudonymizer(salt).write_key(sweep_dir / KEY_FILE, case_ids)
    print(f"pseudonymised: MLflow sees aliases only; the key stays local in {key}")
    return salt


def _warm_tracking(tracking_uri: str):
    """MLflow's store imports (~1 s) and a new local store's copy, on a thread while Ray starts (mostly waiting).

    Only these: transformers' backbone modules (~2.4 s, which the driver needs to build its local cluster's frozen
    features) on this thread as well made Ray's start and its workers' warm-up, which share the same cores, slower
    by more than they saved (first optimizer step 11 s → 16-18 s on 2 cores)."""
    import threading

    def work() -> None:
        try:
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

            from lasegseg.tracking import store

            store.seed_sqlite_store(tracking_uri)
        except Exception:  # noqa: BLE001 - only a head start: the main thread does it again and reports
            pass

    thread = threading.Thread(target=work, name="warm-tracking", daemon=True)
    thread.start()
    return thread


def _warm_finish() -> None:
    """The summary's and comparison's one-time costs (scipy.stats, matplotlib's fonts, pandas' parquet writer:
    ~2 s) paid on a lowest-priority thread while the trials run, on two made-up cells, so that the sweep's tail
    after its last trial is the aggregation itself. Only a head start: failures are ignored."""
    import tempfile
    import threading

    def work() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: a thread is its own task
        except (AttributeError, OSError):
            pass
        try:
            import numpy as np
            import pandas as pd

            from lasegseg.config import Config
            from lasegseg.results.aggregate import summarize, write_summary
            from lasegseg.results.compare import compare_cells

            base = Config().to_flat()
            trials = pd.DataFrame([
                {**base, "data.patients": n, "seed": seed, "test_dice_mean": 0.5 + 0.1 * seed, "test_iou_mean": 0.4,
                 "test_nsd_mean": 0.5, "val_dice": 0.5 + 0.05 * n, "test_hd95_mean": 5.0}
                for n in (1, 2) for seed in (0, 1)
            ])  # fmt: skip
            summary = summarize(trials)
            with tempfile.TemporaryDirectory(prefix="lasegseg-warm-") as tmp:
                write_summary(summary, trials, tmp)
            matrix = pd.DataFrame(np.linspace(0.4, 0.9, 16).reshape(8, 2), columns=list(summary["cell"]))
            compare_cells(matrix, summary, summary["cell"].iloc[0], metric="dice", resamples=100)
        except Exception:  # noqa: BLE001 - only a head start: the aggregation does it again and reports
            log.debug("warming the summary up failed", exc_info=True)

    threading.Thread(target=work, name="warm-finish", daemon=True).start()


def _start_ray(plan: SweepPlan, tracking_uri: str) -> None:
    """Ray first: the workers it starts import torch & co. while this process builds features and the store."""
    from lasegseg.paths import CACHE_ENV
    from lasegseg.sweep.caches import loads_backbone
    from lasegseg.sweep.cluster import init_ray, local_cpus
    from lasegseg.sweep.worker import PREWARM_ENV, WARM_BACKBONE_CODE_ENV
    from lasegseg.tracking import client

    env = client.tracking_env(tracking_uri)
    if not os.environ.get("RAY_ADDRESS"):  # the private local cluster shares this machine's cache folder
        env[CACHE_ENV] = os.environ.get(CACHE_ENV, "")
    first = next((t for t in plan.trials if loads_backbone(t)), None)
    if first is not None:
        env[PREWARM_ENV] = f"{first['model.backbone']}|{first.get('model.registers', False)}"
    else:  # every trial decodes cached features or has no backbone: workers need no transformers
        env[WARM_BACKBONE_CODE_ENV] = "0"
    init_ray({k: v for k, v in env.items() if v}, local_cpus(plan.spec.resources))


def _open_parent_run(args, plan: SweepPlan, tracking_uri: str, state: dict[str, Any], pseudonymize: bool) -> dict:
    """The sweep's MLflow experiment and parent run (the earlier one on ``--resume``); returns the new state."""
    from lasegseg.tracking import client, store

    local = not tracking_uri.startswith(("http://", "https://"))
    artifact_root = (plan.sweep_dir / "mlartifacts").as_uri() if local else None
    experiment_id = store.ensure_experiment(tracking_uri, plan.name, artifact_location=artifact_root)
    if args.resume:
        parent_run_id = state["parent_run_id"]
        client.client(tracking_uri).update_run(parent_run_id, status="RUNNING")
    else:
        params = {"sweep.config": args.config, "sweep.trials": len(plan.trials),
                  "data.path": plan.spec.base["data.path"], "sweep.pseudonymize": pseudonymize,
                  **{f"sweep.set.{k}": v for k, v in plan.overrides.items()}}  # fmt: skip
        parent_run_id = store.start_parent(
            tracking_uri, experiment_id, plan.name, params=params, tags={"lasegseg.sweep_dir": plan.root.uri}
        )
        client.client(tracking_uri).log_artifact(parent_run_id, args.config)
    return {"status": "running", "parent_run_id": parent_run_id, "experiment_id": experiment_id,
            "tracking_uri": tracking_uri, "name": plan.name, "pseudonymize": pseudonymize}  # fmt: skip


def _finish(plan: SweepPlan, state: dict[str, Any], failed: list[str]) -> int:
    """Aggregate over seeds, close the parent run and say where everything is; 0 when every trial finished."""
    from lasegseg.results.aggregate import aggregate
    from lasegseg.results.tables import format_table
    from lasegseg.results.trials import load_trials
    from lasegseg.tracking import client

    uri, parent = state["tracking_uri"], state["parent_run_id"]
    try:
        trials = load_trials(uri, plan.name, parent)  # once, for the summary and the comparison
        summary = aggregate(uri, plan.name, plan.sweep_dir, parent_run_id=parent, trials=trials)
        print(format_table(summary))
    except LasegsegError as exc:
        print(f"aggregation: {exc}", file=sys.stderr)
        summary = None
    if summary is not None:
        _compare(uri, plan.name, plan.sweep_dir, parent, trials)
    client.client(uri).set_terminated(parent, "FINISHED" if summary is not None else "FAILED")
    _save_state(plan, {**state, "status": "finished"})
    _push_files(plan)
    shown = client.display_uri(uri)
    print(f"results: {plan.root.uri}  (MLflow: {shown}, experiment '{plan.name}', parent run {parent})")
    print(ui_hint(shown, state["experiment_id"]))
    if summary is not None:
        print(f"study report (one HTML page): lasegseg report --experiment {plan.name} --tracking-uri {shown}")
    if failed:
        print(f"{len(failed)} trial(s) failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0 if summary is not None else 1


def _compare(uri: str, experiment: str, out_dir: Path, parent: str, trials=None) -> None:
    """Per-patient Dice of every cell against the best (on validation), into the sweep folder and parent run.

    An extra on top of the summary: any failure is one line on stderr and never fails the sweep or keeps the
    parent run from being closed.
    """
    from lasegseg.errors import first_line
    from lasegseg.results.compare import compare
    from lasegseg.results.comparison_tables import format_table

    try:
        comparison, notes = compare(uri, experiment, out_dir, parent_run_id=parent, trials=trials)
        print(format_table(comparison, notes))
    except LasegsegError as exc:
        print(f"comparison: {exc}", file=sys.stderr)
    except Exception as exc:  # a bug here must not cost the finished sweep its FINISHED parent run
        log.debug("comparison failed", exc_info=True)
        print(f"comparison: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)


def ui_hint(tracking_uri: str, experiment_id: str) -> str:
    """How to open this sweep in the MLflow UI, in the model-training view (not the GenAI one)."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI: {tracking_uri.rstrip('/')}/{page}"
    return f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}  then open http://127.0.0.1:5000/{page}"


def main(argv: list[str] | None = None, prog: str = "fewshot.py") -> int:
    args = build_parser().parse_args(argv)
    return run_cli(args, prog)


def run_cli(args: argparse.Namespace, prog: str) -> int:
    """:func:`run` with one-line errors and exit codes, as both command lines report them."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return process.run_command(lambda: run(args), prog, interrupted="interrupted; continue with --resume")


def run(args: argparse.Namespace) -> int:
    """Check the sweep, its storage, tracking store and cluster, build the caches on the nodes, run the stages on
    Ray Tune and aggregate the results. Returns 0 when every trial finished and the summary was written, else 1.
    """
    from lasegseg.paths import default_tracking_uri
    from lasegseg.paths import tracking_uri as resolve_tracking_uri
    from lasegseg.sweep.caches import build_node_caches, open_slice_caches
    from lasegseg.sweep.tune_runner import run_stages
    from lasegseg.tracking import client
    from lasegseg.train.feature_plan import slot_readers

    plan = plan_sweep(args)
    print(f"sweep '{plan.name}': {len(plan.trials)} trials{_screen_note(plan.spec)}; results: {plan.root.uri}")
    if args.dry_run:
        return _print_trials(plan)
    # torch before pyarrow's S3 client: loaded the other way round, libtorch finds no static TLS left and dies.
    import torch  # noqa: F401

    plan.root.check()
    tracking_uri = resolve_tracking_uri(args.tracking_uri, default_tracking_uri(plan.sweep_dir))
    client.check_reachable(tracking_uri)
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    state = _load_state(plan, args.resume)
    local = not os.environ.get("RAY_ADDRESS")
    # What an earlier run's trials recorded may name features of weights that changed since: each run starts over.
    shutil.rmtree(plan.sweep_dir / FEATURE_INDEX, ignore_errors=True)
    warming = _warm_tracking(tracking_uri)
    _start_ray(plan, tracking_uri)
    _check_cluster(plan, tracking_uri)
    # Decode once, driver side (once per image size), for the case list; trials memory-map their node's copy
    # instead of reading NIfTI.
    caches = open_slice_caches(plan.trials)
    cache = next(iter(caches.values()))  # every cache holds the same cases
    _check_pool(plan.trials, cache)
    # Frozen backbones: one pass over every slice per node, by a task with the trials' accelerator share.
    feature_paths = build_node_caches(plan.trials, plan.spec.resources, joined=not local)
    # A resumed sweep keeps the choice of its first run: one sweep never mixes real ids and aliases.
    pseudonymize = bool(args.pseudonymize or (args.resume and state.get("pseudonymize")))
    salt = _pseudonym_salt(plan.sweep_dir, cache.cases) if pseudonymize else None
    warming.join()
    state = _open_parent_run(args, plan, tracking_uri, state, pseudonymize)
    _save_state(plan, state)
    ctx = {**{k: state[k] for k in ("tracking_uri", "experiment_id", "parent_run_id")},
           "cache_paths": {k: str(c.path) for k, c in caches.items()},
           "threads": max(1, int(plan.spec.resources.cpus_per_trial)), "feature_paths": feature_paths,
           "feature_readers": slot_readers(plan.trials),
           "feature_index": str(plan.sweep_dir / FEATURE_INDEX) if local else "",
           "storage": plan.root}  # fmt: skip
    if salt is not None:
        ctx |= {"pseudonym_salt": salt.decode("utf-8"), "case_ids": list(cache.cases)}
    _warm_finish()
    outcome = run_stages(plan.spec, ctx, plan.sweep_dir, resume=args.resume)
    # Ray stops in its own exit handler. Not on a thread beside the aggregation: objects the main thread still holds
    # then reach a core worker that is shutting down, and Ray ends the process with status 1.
    return _finish(plan, state, outcome["failed"])


def _check_cluster(plan: SweepPlan, tracking_uri: str) -> None:
    """Refuse, before any trial, what would hang or break across nodes: requests no node can meet, a file-based
    tracking store on several nodes; warn when a local storage folder must be shared."""
    from lasegseg.sweep.cluster import alive_nodes, autoscaler_node_types, check_fits, check_tracking

    nodes, types = alive_nodes(), autoscaler_node_types()
    requests = {tuple(sorted(plan.spec.resources.for_trial(t).items())) for t in plan.trials}
    check_fits([dict(r) for r in requests], nodes, types)
    check_tracking(tracking_uri, nodes, types)
    if (len(nodes) > 1 or types) and not plan.root.remote:
        print(
            f"note: {plan.root.uri} is a local folder; across nodes it must be the same shared folder (NFS) on "
            "every node, or use --storage-path s3://… / gs://…"
        )


def _screen_note(spec) -> str:
    return f" after screening {len(spec.screening_cells())} cells" if spec.screen else ""
