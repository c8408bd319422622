"""Ray Tune stages: optional learning-rate screening (Optuna TPE + ASHA) and the seeded few-shot grid.

The trials' flat configs are Tune's param space: ``{"trial": flat config}``, plus ``"optim.lr"`` when Optuna samples
the rate. That is the one place a trial's config is flat on its way to the trainable, which makes it a
:class:`~lasegseg.config.Config` on arrival.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from lasegseg.config import from_flat, run_name
from lasegseg.sweep.context import Stage, TrialContext
from lasegseg.sweep.spec import Resources, SweepSpec, cell_key
from lasegseg.sweep.state import load_screening, save_screening
from lasegseg.sweep.storage import Storage
from lasegseg.sweep.timings import Timings, trial_run_name
from lasegseg.sweep.trainable import run_tune_trial
from lasegseg.tracking.client import client

_LOST_CHECKPOINT = "does not exist on storage anymore"


def _trainable(ctx: TrialContext, res: Resources):
    """``run_tune_trial`` with the sweep's context, asking Tune for each trial's resources."""
    trainable = tune.with_parameters(run_tune_trial, ctx=ctx)
    if res.gpus_per_trial <= 0 or res.frozen_gpus_per_trial in (None, res.gpus_per_trial):
        return tune.with_resources(trainable, res.for_trial({}))

    # Frozen-backbone trials ask for a GPU share (resources.frozen_gpus_per_trial), so several train on one GPU.
    def per_trial(config: dict[str, Any]):
        request = res.for_trial(config["trial"])
        return tune.PlacementGroupFactory([{"CPU": request["cpu"], "GPU": request["gpu"]}])

    return tune.with_resources(trainable, per_trial)


def _trial_name(trial) -> str:
    return f"{trial_run_name(trial)}·{trial.trial_id}"


def _dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


class _Lines(tune.Callback):
    """One line per finished or failed trial instead of Tune's wide tables."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        if "test_dice_mean" in r:
            print(
                f"  done   {trial.trial_id}  {trial_run_name(trial)}: val Dice {r.get('val_dice', float('nan')):.3f}, "
                f"test Dice {r['test_dice_mean']:.3f} ({r.get('time_total_s', 0):.0f} s)",
                flush=True,
            )
        else:
            print(f"  ended  {trial.trial_id}  {trial_run_name(trial)} (stopped early)", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"  FAILED {trial.trial_id}  {trial_run_name(trial)}: see {trial.path}", flush=True)


def _run_config(name: str, root: Storage, sweep_dir: Path, res: Resources) -> tune.RunConfig:
    return tune.RunConfig(
        name=name,
        storage_path=root.join("tune").tune_path(),
        storage_filesystem=root.filesystem(),
        failure_config=tune.FailureConfig(max_failures=res.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[_Lines(), Timings(sweep_dir)],
        verbose=0,
    )


def _fit(tuner_factory, restore: Storage, resume: bool, trainable):
    """Run a stage, or continue it from its storage on ``--resume``.

    Tune deletes a trial's previous checkpoint as it registers the next, but writes its experiment state only every
    few seconds, so a driver killed in between leaves a state that names a deleted checkpoint and Tune cannot
    restore that trial. Such trials start again from scratch under new trial ids, in the MLflow runs they had
    (found by their config), whose epochs already logged are not logged again; the other trials resume from their
    checkpoints.
    """
    path, fs = restore.tune_path(), restore.filesystem()
    if not (resume and tune.Tuner.can_restore(path, storage_filesystem=fs)):
        return tuner_factory().fit()
    grid = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs).fit()
    if any(r.error is not None and _LOST_CHECKPOINT in str(r.error) for r in grid):
        print("  trials whose last checkpoint Tune had already deleted start again from scratch", flush=True)
        grid = tune.Tuner.restore(path, trainable, restart_errored=True, storage_filesystem=fs).fit()
    return grid


def _screening_tuner(spec: SweepSpec, base: dict[str, Any], trainable, name: str, root: Storage, sweep_dir: Path):
    """The Tuner of one cell's screening: Optuna TPE over ``optim.lr``, stopped early by ASHA if asked."""
    from ray.tune.search.optuna import OptunaSearch  # deferred: heavy (optuna, ~0.2 s): only a sweep that screens

    screen, res = spec.screen, spec.resources
    scheduler = (
        ASHAScheduler(time_attr="training_iteration", max_t=base["train.epochs"] + 1, grace_period=screen.grace_period)
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


def screen_learning_rates(
    spec: SweepSpec, ctx: TrialContext, root: Storage, sweep_dir: Path, resume: bool
) -> dict[tuple, float]:
    """One Optuna TPE search over ``optim.lr`` per (backbone, decoder, mode) cell; returns the best rates.

    The rate chosen for each cell is recorded as soon as its search ends, so a resumed sweep skips the cells done.
    """
    chosen = load_screening(sweep_dir)
    out: dict[tuple, float] = {}
    for i, base in enumerate(spec.screening_cells()):
        key = cell_key(base)
        if json.dumps(key) in chosen:
            out[key] = chosen[json.dumps(key)]
            continue
        trainable = _trainable(ctx.for_stage("screen"), spec.resources)
        name = f"screen_{i}_{'_'.join(str(k) for k in key if k is not False)}".replace("/", "-")

        def factory(base=base, trainable=trainable, name=name):
            return _screening_tuner(spec, base, trainable, name, root, sweep_dir)

        grid = _fit(factory, root.join("tune", name), resume, trainable)
        best = grid.get_best_result(metric="val_dice", mode="max", scope="all")
        if best is None or best.config is None:
            raise RuntimeError(f"screening of cell {key} produced no result")
        out[key] = float(best.config["optim.lr"])
        chosen[json.dumps(key)] = out[key]
        save_screening(sweep_dir, chosen)
    return out


def run_stages(
    spec: SweepSpec, ctx: TrialContext, root: Storage, sweep_dir: Path, resume: bool = False
) -> dict[str, Any]:
    """Screen (if asked), then run the full seeded grid without early stopping; returns failed trial names.

    Args:
        spec: the sweep.
        ctx: what every trial is handed besides its config.
        root: the sweep's storage root (``<storage>/<name>``), where Tune keeps its state and checkpoints.
        sweep_dir: the sweep's local folder (its own files).
        resume: continue each stage from its storage.
    """
    lr_by_cell = screen_learning_rates(spec, ctx, root, sweep_dir, resume) if spec.screen else None
    if lr_by_cell:
        c = client(ctx.tracking_uri)
        for key, lr in lr_by_cell.items():
            c.log_param(ctx.parent_run_id, f"screen.lr.{'/'.join(map(str, key))}", f"{lr:.3g}")
    trials = spec.trials(lr_by_cell=lr_by_cell)
    res = spec.resources
    stage: Stage = "trial"
    trainable = _trainable(ctx.for_stage(stage), res)

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
    try:
        return run_name(from_flat(result.config["trial"], validate=False))
    except Exception:  # noqa: BLE001 - only used for a message
        return str(result.path)
