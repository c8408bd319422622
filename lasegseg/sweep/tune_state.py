"""Tune's experiment state, kept small: a finished trial keeps only what a resume and the sweep's end read.

Tune rewrites its experiment state (every trial's entry) and syncs it to the sweep's storage every few seconds for
the whole sweep. Per trial it keeps, besides the config, per-metric running statistics of everything the trial ever
reported (``metric_analysis``, and the last 5 and 10 values of each in hex-encoded pickles, ``metric_n_steps``),
the last result, and its checkpoint record with that result again. A study of ~1,400 trials then rewrites megabytes
many times an hour. Once a trial has ended, its scheduler (ASHA) and searcher have read its results, so
:class:`CompactFinished` drops the statistics and keeps a few keys of its last result (the ResultGrid's and the
one-line report's) and no checkpoint record; every metric is in the trial's MLflow run.
"""

from __future__ import annotations

import time

from ray import tune

from lasegseg import metric_table
from lasegseg.sweep.study_table import METRIC

STATE_LOG_ENV = "LASEGSEG_TUNE_STATE_LOG"
# What a finished trial's last result keeps in Tune's state.
KEPT = ("training_iteration", "mlflow_run_id")


def kept_keys() -> tuple[str, ...]:
    return (METRIC, metric_table.primary().test_mean, *KEPT)


def compact(trial) -> None:
    """Drop a finished trial's per-metric statistics and checkpoint record, and trim its last result."""
    meta = trial.run_metadata
    keep = kept_keys()
    meta.metric_analysis = {}
    meta.metric_n_steps = {}
    meta.last_result = {k: v for k, v in meta.last_result.items() if k in keep}
    manager = meta.checkpoint_manager
    if manager is not None and hasattr(manager, "_checkpoint_results"):
        # Its record of the last checkpoint (the finished-run marker; the training state is gone): a finished trial
        # is never restored, and the marker stays in storage for a driver killed before this point.
        manager._checkpoint_results = []
        manager._latest_checkpoint_result = None
    meta.invalidate_cache()
    trial.invalidate_json_state()


class CompactFinished(tune.Callback):
    """:func:`compact` each trial as it ends. Registered after the callbacks that read its last result (the one-line
    report, the timings). Tune caches each trial's entry and refreshes it only when it marks the trial changed, as it
    does right after these callbacks when it sets the trial's final status: a trial compacted later would keep its
    old entry."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        compact(trial)


def periodic_state_saves() -> None:
    """Tune saves its experiment state on its own period only (every 10 s or 19× the last save's cost, whichever is
    longer: at most ~5 % of the driver's time), not also each time a trial checkpoints.

    With ``CheckpointConfig(num_to_keep=1)`` Tune forces a save of the *whole* state (every trial's entry) and an
    upload each time any trial registers a checkpoint, so that the state never names a checkpoint it already
    deleted: with trials that checkpoint a few times each, that is a few saves per trial, each the size of the whole
    study, i.e. quadratic in the trial count (a 1,400-trial study rewrote megabytes thousands of times). A state
    that names a deleted checkpoint after a crash is what the sweep's resume already handles: such trials restart in
    their own MLflow runs, and a finished one finds its run finished and is not trained again
    (:func:`lasegseg.sweep.tune_runner._fit`). Applies to this driver process only.
    """
    # deferred: heavy (Tune's controller internals): only the sweep's driver
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    def on_trial_checkpoint(self, trial) -> None:
        return None

    _ExperimentCheckpointManager.on_trial_checkpoint = on_trial_checkpoint


def trace_state_saves(path: str) -> None:
    """Record every save of Tune's experiment state (``time, seconds the driver spent, forced``) as CSV lines in
    ``path``: what the scale benchmark reads (``$LASEGSEG_TUNE_STATE_LOG``). The save is Tune's own; this wraps it.
    The upload to storage runs on Tune's syncer thread and is waited for only by a forced save."""
    # deferred: heavy (Tune's controller internals): only a traced sweep
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    original = _ExperimentCheckpointManager.sync_up_experiment_state
    if getattr(original, "_lasegseg_traced", False):
        return

    def traced(self, save_fn, force=False, wait=False):
        forced = bool(force or self._should_force_sync_up)
        before = self._last_save_time
        t0 = time.monotonic()
        original(self, save_fn, force=force, wait=wait)
        if self._last_save_time != before:  # not skipped by the snapshot period
            with open(path, "a") as fh:
                fh.write(f"{time.time():.3f},{time.monotonic() - t0:.4f},{int(forced)}\n")

    traced._lasegseg_traced = True
    _ExperimentCheckpointManager.sync_up_experiment_state = traced
