"""The study on Ray Tune: every cell's learning-rate screen side by side, and each cell's seeded grid as soon as its
own screen ends, in one Tune run (see :mod:`lasegseg.sweep.search` for the order and :mod:`lasegseg.sweep.scheduler`
for the early stopping).

A Tune trial's config is ``{"i": row, "optim.lr": rate}``: the row of the study's table
(:mod:`lasegseg.sweep.study_table`), which every worker is handed once, holds its flat config. That keeps Tune's
experiment state, rewritten and synced to storage for the whole sweep, small; the trainable makes the row a
:class:`~lasegseg.config.Config` on arrival.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray import tune

from lasegseg.sweep.context import TrialContext
from lasegseg.sweep.scheduler import StudyScheduler
from lasegseg.sweep.search import StudySearcher
from lasegseg.sweep.spec import Resources, SweepSpec, cell_key
from lasegseg.sweep.state import load_screening, save_screening
from lasegseg.sweep.storage import Storage
from lasegseg.sweep.study_table import METRIC, ROW, StudyTable
from lasegseg.sweep.timings import Timings
from lasegseg.sweep.trainable import run_tune_trial
from lasegseg.sweep.tune_state import STATE_LOG_ENV, CompactFinished, periodic_state_saves, trace_state_saves
from lasegseg.tracking.client import client

_LOST_CHECKPOINT = "does not exist on storage anymore"


def _trainable(ctx: TrialContext, res: Resources):
    """``run_tune_trial`` with the sweep's context, asking Tune for each trial's resources."""
    trainable = tune.with_parameters(run_tune_trial, ctx=ctx)
    if res.gpus_per_trial <= 0 or res.frozen_gpus_per_trial in (None, res.gpus_per_trial):
        return tune.with_resources(trainable, res.for_trial({}))
    table = ctx.table

    # Frozen-backbone trials ask for a GPU share (resources.frozen_gpus_per_trial), so several train on one GPU.
    def per_trial(config: dict[str, Any]):
        request = res.for_trial(table.flat(config))
        return tune.PlacementGroupFactory([{"CPU": request["cpu"], "GPU": request["gpu"]}])

    return tune.with_resources(trainable, per_trial)


def _trial_name(trial) -> str:
    """Tune's name of a trial: its row of the study's table and its trial id. A module function, not a closure over
    the table: Tune pickles the name creator into every trial's entry of its experiment state (8 KB per trial with
    the table inside)."""
    return f"row{trial.config.get(ROW, '?')}·{trial.trial_id}"


def _dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


class _Lines(tune.Callback):
    """One line per finished or failed trial instead of Tune's wide tables."""

    def __init__(self, table: StudyTable) -> None:
        self.table = table

    def on_trial_complete(self, iteration, trials, trial, **info):
        r, name = trial.last_result or {}, self.table.name(trial.config)
        if "test_dice_mean" in r:
            print(
                f"  done   {trial.trial_id}  {name}: val Dice {r.get(METRIC, float('nan')):.3f}, "
                f"test Dice {r['test_dice_mean']:.3f} ({r.get('time_total_s', 0):.0f} s)",
                flush=True,
            )
        else:
            print(f"  ended  {trial.trial_id}  {name} (stopped early)", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"  FAILED {trial.trial_id}  {self.table.name(trial.config)}: see {trial.path}", flush=True)


def _run_config(name: str, root: Storage, sweep_dir: Path, res: Resources, table: StudyTable) -> tune.RunConfig:
    return tune.RunConfig(
        name=name,
        storage_path=root.join("tune").tune_path(),
        storage_filesystem=root.filesystem(),
        failure_config=tune.FailureConfig(max_failures=res.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[_Lines(table), Timings(sweep_dir, table), CompactFinished()],
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


def run_stages(
    spec: SweepSpec, ctx: TrialContext, root: Storage, sweep_dir: Path, resume: bool = False
) -> dict[str, Any]:
    """Run the study (screen, if asked, and the seeded grid) as one Tune run; returns what failed.

    Args:
        spec: the sweep.
        ctx: what every trial is handed besides its config; its ``table`` is the study's trials.
        root: the sweep's storage root (``<storage>/<name>``), where Tune keeps its state and checkpoints.
        sweep_dir: the sweep's local folder (its own files).
        resume: continue the study from its storage.

    Returns:
        ``{"failed": names of failed trials, "failed_cells": names of cells whose screen failed, "n": trials run}``.
    """
    table, res = ctx.table, spec.resources
    trainable = _trainable(ctx, res)
    chosen = load_screening(sweep_dir) if resume else {}

    def on_cell(cell: int, rate: float | None) -> None:
        name = table.cell_name(cell)
        if rate is None:
            print(f"  FAILED cell {name}: every screening trial failed; its grid trials will not run", flush=True)
            return
        print(f"  screened {name}: lr {rate:.3g}; its grid trials start", flush=True)
        chosen[json.dumps(cell_key(table.rows[cell]))] = rate
        save_screening(sweep_dir, chosen)
        client(ctx.tracking_uri).log_param(ctx.parent_run_id, f"screen.lr.{name}", f"{rate:.3g}")

    searcher = StudySearcher(table, spec.screen, on_cell)
    max_t = (table.rows[0]["train.epochs"] + 1) if table.cells else 1

    def factory():
        return tune.Tuner(
            trainable,
            param_space={},
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=-1, search_alg=searcher,
                scheduler=StudyScheduler(table, spec.screen, max_t),
                max_concurrent_trials=res.max_concurrent or None, trial_name_creator=_trial_name,
                trial_dirname_creator=_dirname, reuse_actors=True,
            ),
            run_config=_run_config("study", root, sweep_dir, res, table),
        )  # fmt: skip

    periodic_state_saves()
    # Tune's per-trial result logs (result.json, progress.csv, TensorBoard events: 5 files a trial) sit in the folder
    # its state saves upload whole each time, so a 1,400-trial study re-uploaded ~7,000 files every save; every
    # per-epoch metric is in the trial's MLflow run. TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0 turns them back on.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if os.environ.get(STATE_LOG_ENV):
        trace_state_saves(os.environ[STATE_LOG_ENV])
    grid = _fit(factory, root.join("tune", "study"), resume, trainable)
    failed = [_result_name(r, table) for r in grid if r.error is not None]
    cells = [table.cell_name(c) for c in _failed_cells(grid, table)]
    return {"failed": failed, "failed_cells": cells, "n": len(grid)}


def _failed_cells(grid, table: StudyTable) -> list[int]:
    """Screening cells none of whose trials finished without error (their grid never ran)."""
    ok: set[int] = set()
    seen: set[int] = set()
    for r in grid:
        row = int((r.config or {}).get(ROW, -1))
        if 0 <= row < table.cells:
            seen.add(row)
            if r.error is None:
                ok.add(row)
    return sorted(seen - ok)


def _result_name(result, table: StudyTable) -> str:
    try:
        return table.name(result.config)
    except Exception:  # noqa: BLE001 - only used for a message
        return str(result.path)
