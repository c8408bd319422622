"""Ray Tune stages: optional learning-rate screening (Optuna TPE + ASHA) and the seeded few-shot grid."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from lasegseg.fsio import atomic_write
from lasegseg.sweep.spec import SweepSpec, cell_key
from lasegseg.sweep.storage import Storage, parse_storage

TIMINGS_FILE = "trial_timings.csv"
SCREENING_FILE = "screening.json"
TIMING_FIELDS = (
    "trial_id", "run_name", "tune_started_at", "scheduled_at", "started_at", "first_step_at", "fixed_cost_s",
    "worker_pid", "worker_started_at", "worker_prewarmed", "node_ip", "node_id", "device", "slice_cache_built",
    "features_built", "backbone_loaded", "tracking_start_s", "end_cost_s", "fit_s", "checkpoint_s",
)  # fmt: skip
"""``fixed_cost_s``: Tune scheduling the trial → its first optimizer step. ``tracking_start_s``: opening its MLflow
run (part of the fixed cost). ``end_cost_s``: its test patients scored → Tune recording it complete (model, files,
overlays, MLflow artifacts and final metrics, the last report). The two last are the trial's bookkeeping."""


def _trainable(ctx: dict[str, Any], res):
    from ray import tune

    from lasegseg.sweep.trainable import run_tune_trial

    trainable = tune.with_parameters(run_tune_trial, ctx=ctx)
    if res.gpus_per_trial <= 0 or res.frozen_gpus_per_trial in (None, res.gpus_per_trial):
        return tune.with_resources(trainable, res.for_trial({}))

    # Frozen-backbone trials ask for a GPU share (resources.frozen_gpus_per_trial), so several train on one GPU.
    def per_trial(config: dict[str, Any]):
        request = res.for_trial(config["trial"])
        return tune.PlacementGroupFactory([{"CPU": request["cpu"], "GPU": request["gpu"]}])

    return tune.with_resources(trainable, per_trial)


def _trial_name(trial) -> str:
    from lasegseg.config import from_flat, merge_trial, run_name

    return f"{run_name(from_flat(merge_trial(trial.config), validate=False))}·{trial.trial_id}"


def _dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _progress_callback():
    """One line per finished or failed trial instead of Tune's wide tables."""
    from ray import tune

    class Lines(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            if "test_dice_mean" in r:
                print(
                    f"  done   {trial.trial_id}  {_trial_name(trial).rsplit('·', 1)[0]}: val Dice "
                    f"{r.get('val_dice', float('nan')):.3f}, test Dice {r['test_dice_mean']:.3f} "
                    f"({r.get('time_total_s', 0):.0f} s)",
                    flush=True,
                )
            else:
                print(f"  ended  {trial.trial_id}  {_trial_name(trial).rsplit('·', 1)[0]} (stopped early)", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"  FAILED {trial.trial_id}  {_trial_name(trial).rsplit('·', 1)[0]}: see {trial.path}", flush=True)

    return Lines()


def _timings_callback(sweep_dir: Path):
    """Writes ``<sweep_dir>/trial_timings.csv``: per trial attempt, when Tune started it (driver wall clock), when
    the trainable was entered and when it reached its first optimizer step (from its first report).

    ``fixed_cost_s = first_step_at - scheduled_at`` is what a trial costs before it trains: scheduling, worker
    start, imports, data attach, model build. ``worker_pid``, ``worker_started_at`` (process start, wall clock)
    and ``worker_prewarmed`` tell a trial on a warm worker from one that paid a process start: a worker started
    before ``tune_started_at`` (this Tune run's start) was not started for the trial. Rows of earlier runs of the
    sweep (``--resume``) are kept.
    """
    from ray import tune

    path = Path(sweep_dir) / TIMINGS_FILE

    class Timings(tune.Callback):
        def __init__(self) -> None:
            self.scheduled: dict[str, float] = {}
            self.tune_started_at = time.time()
            self.rows: list[dict[str, Any]] = []
            if path.is_file():
                with open(path, newline="") as fh:
                    self.rows = list(csv.DictReader(fh))

        def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
            self.tune_started_at = time.time()  # before Tune asks Ray for any trial's resources or worker

        def on_trial_start(self, iteration, trials, trial, **info):
            self.scheduled[trial.trial_id] = time.time()

        def on_trial_restore(self, iteration, trials, trial, **info):
            self.scheduled[trial.trial_id] = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "first_step_at" not in result or trial.trial_id not in self.scheduled:
                return
            scheduled = self.scheduled.pop(trial.trial_id)
            first = float(result["first_step_at"])
            self.rows.append({
                "trial_id": trial.trial_id, "run_name": _trial_name(trial).rsplit("·", 1)[0],
                "tune_started_at": f"{self.tune_started_at:.3f}",
                "scheduled_at": f"{scheduled:.3f}", "started_at": f"{float(result['trial_started_at']):.3f}",
                "first_step_at": f"{first:.3f}", "fixed_cost_s": f"{first - scheduled:.3f}" if first else "",
                "worker_pid": result.get("worker_pid", ""),
                "worker_started_at": f"{float(result.get('worker_started_at') or 0):.3f}",
                "worker_prewarmed": str(bool(result.get("worker_prewarmed", False))).lower(),
                "node_ip": result.get("node_ip", ""), "node_id": result.get("node_id", ""),
                "device": result.get("device", ""),
                "slice_cache_built": str(bool(result.get("slice_cache_built", False))).lower(),
                "features_built": str(bool(result.get("features_built", False))).lower(),
                "backbone_loaded": str(bool(result.get("backbone_loaded", True))).lower(),
                "tracking_start_s": f"{float(result.get('tracking_start_s', 0.0)):.3f}",
            })  # fmt: skip
            atomic_write(path, _csv_text(self.rows))

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            scored = float(last.get("scored_at") or 0.0)
            row = next((r for r in reversed(self.rows) if r["trial_id"] == trial.trial_id), None)
            if row is None or not scored:
                return
            row["end_cost_s"] = f"{time.time() - scored:.3f}"
            # This attempt's epochs (training + validation) and the part of it its training-state saves took.
            row["fit_s"] = f"{float(last.get('fit_s') or 0.0):.3f}"
            row["checkpoint_s"] = f"{float(last.get('checkpoint_s') or 0.0):.3f}"
            atomic_write(path, _csv_text(self.rows))

    return Timings()


def _csv_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=TIMING_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _storage(ctx: dict[str, Any], sweep_dir: Path) -> Storage:
    """The sweep's storage root (``<storage>/<name>``): the local sweep folder unless the driver named another."""
    return ctx.get("storage") or parse_storage(str(sweep_dir))


def _run_config(name: str, root: Storage, sweep_dir: Path, res):
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=root.join("tune").tune_path(),
        storage_filesystem=root.filesystem(),
        failure_config=tune.FailureConfig(max_failures=res.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[_progress_callback(), _timings_callback(sweep_dir)],
        verbose=0,
    )


_LOST_CHECKPOINT = "does not exist on storage anymore"


def _fit(tuner_factory, restore: Storage, resume: bool, trainable):
    """Run a stage, or continue it from its storage on ``--resume``.

    Tune deletes a trial's previous checkpoint as it registers the next, but writes its experiment state only every
    few seconds, so a driver killed in between leaves a state that names a deleted checkpoint and Tune cannot
    restore that trial. Such trials start again from scratch under new trial ids, in the MLflow runs they had
    (found by their config), whose epochs already logged are not logged again; the other trials resume from their
    checkpoints.
    """
    from ray import tune

    path, fs = restore.tune_path(), restore.filesystem()
    if not (resume and tune.Tuner.can_restore(path, storage_filesystem=fs)):
        return tuner_factory().fit()
    grid = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs).fit()
    if any(r.error is not None and _LOST_CHECKPOINT in str(r.error) for r in grid):
        print("  trials whose last checkpoint Tune had already deleted start again from scratch", flush=True)
        grid = tune.Tuner.restore(path, trainable, restart_errored=True, storage_filesystem=fs).fit()
    return grid


def screen_learning_rates(spec: SweepSpec, ctx: dict[str, Any], sweep_dir: Path, resume: bool) -> dict[tuple, float]:
    """One Optuna TPE search over ``optim.lr`` per (backbone, decoder, mode) cell; returns the best rates."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    screen, res, root = spec.screen, spec.resources, _storage(ctx, sweep_dir)
    chosen_path = sweep_dir / SCREENING_FILE
    chosen: dict[str, float] = json.loads(chosen_path.read_text()) if chosen_path.is_file() else {}
    out: dict[tuple, float] = {}
    for i, base in enumerate(spec.screening_cells()):
        key = cell_key(base)
        if json.dumps(key) in chosen:
            out[key] = chosen[json.dumps(key)]
            continue
        trainable = _trainable({**ctx, "stage": "screen"}, res)
        name = f"screen_{i}_{'_'.join(str(k) for k in key if k is not False)}".replace("/", "-")
        epochs = base["train.epochs"]

        def factory(base=base, trainable=trainable, name=name, epochs=epochs):
            scheduler = (
                ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1, grace_period=screen.grace_period)
                if screen.scheduler == "asha"
                else FIFOScheduler()
            )
            return tune.Tuner(
                trainable,
                param_space={"trial": base, "optim.lr": tune.loguniform(screen.low, screen.high)},
                tune_config=tune.TuneConfig(
                    metric="val_dice", mode="max", num_samples=screen.trials,
                    search_alg=OptunaSearch(seed=base["seed"]), scheduler=scheduler,
                    max_concurrent_trials=res.max_concurrent or None, trial_name_creator=_trial_name,
                    trial_dirname_creator=_dirname,
                ),
                run_config=_run_config(name, root, sweep_dir, res),
            )  # fmt: skip

        grid = _fit(factory, root.join("tune", name), resume, trainable)
        best = grid.get_best_result(metric="val_dice", mode="max", scope="all")
        if best is None or best.config is None:
            raise RuntimeError(f"screening of cell {key} produced no result")
        out[key] = float(best.config["optim.lr"])
        chosen[json.dumps(key)] = out[key]
        chosen_path.write_text(json.dumps(chosen, indent=2))
    return out


def run_stages(spec: SweepSpec, ctx: dict[str, Any], sweep_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Screen (if asked), then run the full seeded grid without early stopping; returns failed trial names."""
    from ray import tune

    lr_by_cell = screen_learning_rates(spec, ctx, sweep_dir, resume) if spec.screen else None
    if lr_by_cell:
        from lasegseg.tracking.client import client

        c = client(ctx["tracking_uri"])
        for key, lr in lr_by_cell.items():
            c.log_param(ctx["parent_run_id"], f"screen.lr.{'/'.join(map(str, key))}", f"{lr:.3g}")
    trials = spec.trials(lr_by_cell=lr_by_cell)
    res, root = spec.resources, _storage(ctx, sweep_dir)
    trainable = _trainable({**ctx, "stage": "trial"}, res)

    def factory():
        return tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=res.max_concurrent or None, trial_name_creator=_trial_name,
                trial_dirname_creator=_dirname, reuse_actors=True,
            ),
            run_config=_run_config("grid", root, sweep_dir, res),
        )  # fmt: skip

    grid = _fit(factory, root.join("tune", "grid"), resume, trainable)
    failed = [_result_name(r) for r in grid if r.error is not None]
    return {"failed": failed, "n": len(grid)}


def _result_name(result) -> str:
    from lasegseg.config import from_flat, run_name

    try:
        return run_name(from_flat(result.config["trial"], validate=False))
    except Exception:  # noqa: BLE001 - only used for a message
        return str(result.path)
