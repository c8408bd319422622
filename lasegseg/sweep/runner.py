"""The sweep driver: check everything, build the caches once, run the trials on Ray Tune, aggregate.

``python sweeps/fewshot.py`` (or ``lasegseg sweep``) starts a local Ray; under ``ray job submit`` (RAY_ADDRESS set)
it joins the cluster. Heavy imports happen in the order the sweep's start-up was measured in: torch after the plan
is checked, MLflow's store on a thread while Ray starts, Tune once the caches are built, and the summary's pandas,
scipy and matplotlib on a low-priority thread while the trials run.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from lasegseg import process
from lasegseg.data.pseudonym import KEY_FILE, Pseudonymizer, load_or_create_salt
from lasegseg.errors import ConfigError
from lasegseg.paths import CACHE_ENV, default_tracking_uri
from lasegseg.paths import tracking_uri as resolve_tracking_uri
from lasegseg.sweep.caches import build_node_caches, loads_backbone, open_slice_caches
from lasegseg.sweep.cluster import alive_nodes, autoscaler_node_types, check_fits, check_tracking, init_ray, local_cpus
from lasegseg.sweep.context import TrialContext
from lasegseg.sweep.flags import build_parser
from lasegseg.sweep.plan import SweepPlan, check_pool, plan_sweep, print_trials, screen_note
from lasegseg.sweep.state import FEATURE_INDEX, load_state, save_state
from lasegseg.sweep.study_table import StudyTable
from lasegseg.sweep.worker import PREWARM_ENV, WARM_BACKBONE_CODE_ENV
from lasegseg.tracking.client import check_reachable, client, tracking_env
from lasegseg.tracking.store import ensure_experiment, seed_sqlite_store, start_parent
from lasegseg.train.feature_plan import slot_readers

log = logging.getLogger("lasegseg.sweep")
STAND_IN_TAG = "lasegseg.stand_in_backbones"


def main(argv: list[str] | None = None, prog: str = "fewshot.py") -> int:
    """``sweeps/fewshot.py``: parse the flags and run the sweep; returns the exit status."""
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
    plan = plan_sweep(args)
    print(f"sweep '{plan.name}': {len(plan.trials)} trials{screen_note(plan.spec)}; results: {plan.root.uri}")
    if args.dry_run:
        return print_trials(plan)
    # torch before pyarrow's S3 client: loaded the other way round, libtorch finds no static TLS left and dies.
    import torch  # noqa: F401  # deferred: heavy (torch, ~2.5 s): --dry-run needs none

    plan.root.check()
    tracking_uri = resolve_tracking_uri(args.tracking_uri, default_tracking_uri(plan.sweep_dir))
    check_reachable(tracking_uri)
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    state = load_state(plan, args.resume)
    local = not os.environ.get("RAY_ADDRESS")
    # What an earlier run's trials recorded may name features of weights that changed since: each run starts over.
    shutil.rmtree(plan.sweep_dir / FEATURE_INDEX, ignore_errors=True)
    warming = _warm_tracking(tracking_uri)
    _start_ray(plan, tracking_uri)
    _check_cluster(plan, tracking_uri)
    # Decode once, driver side (once per image size), for the case list; trials memory-map their node's copy
    # instead of reading NIfTI.
    caches = open_slice_caches(plan.trials)
    cases = next(iter(caches.values())).cases  # every cache holds the same cases
    check_pool(plan.trials, cases)
    # Frozen backbones: one pass over every slice per node, by a task with the trials' accelerator share.
    feature_paths = build_node_caches(plan.trials, plan.spec.resources, joined=not local)
    # A resumed sweep keeps the choice of its first run: one sweep never mixes real ids and aliases.
    pseudonymize = bool(args.pseudonymize or (args.resume and state.get("pseudonymize")))
    salt = _pseudonym_salt(plan.sweep_dir, cases) if pseudonymize else None
    warming.join()
    table = _study_table(plan, state, args.resume)
    state = {**_open_parent_run(args, plan, tracking_uri, state, pseudonymize), "study": table.digest()}
    save_state(plan, state)
    ctx = TrialContext(
        state["tracking_uri"], state["experiment_id"], state["parent_run_id"], table=table,
        threads=max(1, int(plan.spec.resources.cpus_per_trial)),
        cache_paths={k: str(c.path) for k, c in caches.items()}, feature_paths=feature_paths,
        feature_readers=slot_readers(plan.trials), feature_index=str(plan.sweep_dir / FEATURE_INDEX) if local else "",
        pseudonym_salt=salt.decode("utf-8") if salt is not None else "",
        case_ids=tuple(cases) if salt is not None else (),
    )  # fmt: skip
    _warm_finish()
    from lasegseg.sweep.tune_runner import run_stages  # deferred: start-up (ray.tune, ~2 s, once Ray is up)

    outcome = run_stages(plan.spec, ctx, plan.root, plan.sweep_dir, resume=args.resume)
    # Ray stops in its own exit handler. Not on a thread beside the aggregation: objects the main thread still holds
    # then reach a core worker that is shutting down, and Ray ends the process with status 1.
    from lasegseg.sweep.finish import finish  # deferred: start-up (pandas, scipy, matplotlib; see _warm_finish)

    return finish(plan, state, outcome["failed"], outcome["failed_cells"])


def _study_table(plan: SweepPlan, state: dict[str, Any], resume: bool) -> StudyTable:
    """The study's trials; on ``--resume``, refused unless they are the ones the first run had (a Tune trial names
    its config by its row: a changed sweep file would make a row mean another trial)."""
    table = StudyTable.of(plan.spec)
    if resume and state.get("study") not in (None, table.digest()):
        raise ConfigError(
            f"{plan.spec.source or 'the sweep file'}: its trials changed since the sweep started; --resume continues "
            "the same study only (start a new one under another --experiment name)"
        )
    return table


def _pseudonym_salt(sweep_dir: Path, case_ids: list[str]) -> bytes:
    """The sweep's salt (created once, kept private in the sweep folder) and the local alias → id key."""
    salt = load_or_create_salt(sweep_dir)
    key = Pseudonymizer(salt).write_key(sweep_dir / KEY_FILE, case_ids)
    print(f"pseudonymised: MLflow sees aliases only; the key stays local in {key}")
    return salt


def _warm_tracking(tracking_uri: str) -> threading.Thread:
    """MLflow's store imports (~1 s) and a new local store's copy, on a thread while Ray starts (mostly waiting).

    Only these: transformers' backbone modules (~2.4 s, which the driver needs to build its local cluster's frozen
    features) on this thread as well made Ray's start and its workers' warm-up, which share the same cores, slower
    by more than they saved (first optimizer step 11 s → 16-18 s on 2 cores)."""

    def work() -> None:
        try:
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  # deferred: start-up (mlflow, on this thread)

            seed_sqlite_store(tracking_uri)
        except Exception:  # noqa: BLE001 - only a head start: the main thread does it again and reports
            pass

    thread = threading.Thread(target=work, name="warm-tracking", daemon=True)
    thread.start()
    return thread


def _warm_finish() -> None:
    """The summary's and comparison's one-time costs (scipy.stats, matplotlib's fonts, pandas' parquet writer:
    ~2 s) paid on a lowest-priority thread while the trials run, so that the sweep's tail after its last trial is the
    aggregation itself (see :func:`lasegseg.sweep.finish.warm_up`). Only a head start: failures are ignored."""

    def work() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: a thread is its own task
        except (AttributeError, OSError):
            pass
        try:
            from lasegseg.sweep import finish  # deferred: start-up (pandas, scipy, matplotlib, at low priority)

            finish.warm_up()
        except Exception:  # noqa: BLE001 - only a head start: the aggregation does it again and reports
            log.debug("warming the summary up failed", exc_info=True)

    threading.Thread(target=work, name="warm-finish", daemon=True).start()


def _start_ray(plan: SweepPlan, tracking_uri: str) -> None:
    """Ray first: the workers it starts import torch & co. while this process builds features and the store.

    The stand-in switch (``--stand-in-backbones``) goes to every worker with the rest, and the sweep says it is on.
    """
    # deferred: heavy (lasegseg.models imports torch modules; --dry-run needs none)
    from lasegseg.models.sources import STAND_IN_ENV, stand_ins_enabled

    env = tracking_env(tracking_uri)
    if not os.environ.get("RAY_ADDRESS"):  # the private local cluster shares this machine's cache folder
        env[CACHE_ENV] = os.environ.get(CACHE_ENV, "")
    if stand_ins_enabled():
        env[STAND_IN_ENV] = "1"
        print(f"backbones: tiny random stand-ins of their own family (${STAND_IN_ENV}=1), not the named models")
    first = next((t for t in plan.trials if loads_backbone(t)), None)
    if first is not None:
        env[PREWARM_ENV] = f"{first['model.backbone']}|{first.get('model.registers', False)}"
    else:  # every trial decodes cached features or has no backbone: workers need no transformers
        env[WARM_BACKBONE_CODE_ENV] = "0"
    init_ray({k: v for k, v in env.items() if v}, local_cpus(plan.spec.resources))


def _check_cluster(plan: SweepPlan, tracking_uri: str) -> None:
    """Refuse, before any trial, what would hang or break across nodes: requests no node can meet, a file-based
    tracking store on several nodes; warn when a local storage folder must be shared."""
    nodes, types = alive_nodes(), autoscaler_node_types()
    requests = {tuple(sorted(plan.spec.resources.for_trial(t).items())) for t in plan.trials}
    check_fits([dict(r) for r in requests], nodes, types)
    check_tracking(tracking_uri, nodes, types)
    if (len(nodes) > 1 or types) and not plan.root.remote:
        print(
            f"note: {plan.root.uri} is a local folder; across nodes it must be the same shared folder (NFS) on "
            "every node, or use --storage-path s3://… / gs://…"
        )


def _open_parent_run(
    args: argparse.Namespace, plan: SweepPlan, tracking_uri: str, state: dict[str, Any], pseudonymize: bool
) -> dict[str, Any]:
    """The sweep's MLflow experiment and parent run (the earlier one on ``--resume``); returns the new state."""
    local = not tracking_uri.startswith(("http://", "https://"))
    artifact_root = (plan.sweep_dir / "mlartifacts").as_uri() if local else None
    experiment_id = ensure_experiment(tracking_uri, plan.name, artifact_location=artifact_root)
    if args.resume:
        parent_run_id = state["parent_run_id"]
        client(tracking_uri).update_run(parent_run_id, status="RUNNING")
    else:
        # The parent run's params: the sweep as given; flat, like every MLflow param.
        params = {"sweep.config": args.config, "sweep.trials": len(plan.trials),
                  "data.path": plan.spec.base["data.path"], "sweep.pseudonymize": pseudonymize,
                  **{f"sweep.set.{k}": v for k, v in plan.overrides.items()}}  # fmt: skip
        # deferred: heavy (lasegseg.models imports torch modules; --dry-run needs none)
        from lasegseg.models.sources import stand_ins_enabled

        tags = {"lasegseg.sweep_dir": plan.root.uri}
        if stand_ins_enabled():  # the runs are a rehearsal on stand-ins, not results of the named backbones
            tags[STAND_IN_TAG] = "true"
        parent_run_id = start_parent(tracking_uri, experiment_id, plan.name, params=params, tags=tags)
        client(tracking_uri).log_artifact(parent_run_id, args.config)
    return {"status": "running", "parent_run_id": parent_run_id, "experiment_id": experiment_id,
            "tracking_uri": tracking_uri, "name": plan.name, "pseudonymize": pseudonymize}  # fmt: skip
