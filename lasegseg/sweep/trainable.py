"""The Ray Tune function trainable: one lasegseg trial inside a Ray worker, tracked in its own MLflow run.

Its workers import this module as they warm up (:mod:`lasegseg.sweep.worker`); the driver imports it to hand
:func:`run_tune_trial` to Tune, which pickles the function by reference.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from ray import tune

from lasegseg import metric_table
from lasegseg.config import Config, from_flat, run_name
from lasegseg.data.cache import open_cache
from lasegseg.data.cache_read import SliceCache
from lasegseg.errors import DataError
from lasegseg.fsio import atomic_write, pid_alive
from lasegseg.paths import cache_root
from lasegseg.sweep.caches import preprocessing_key, publish_features, published_features
from lasegseg.sweep.context import Stage, TrialContext
from lasegseg.sweep.study_table import METRIC, ROW
from lasegseg.sweep.timings import TIMING
from lasegseg.sweep.worker import placement, worker_info
from lasegseg.tracking.buffer import pending_path
from lasegseg.tracking.tracker import TrialTracker
from lasegseg.train.feature_plan import feature_slot
from lasegseg.train.features import FeatureCache
from lasegseg.train.trial_data import prepare_data

RUN_FILE = "mlflow_run.json"
SCRATCH_PREFIX = "lasegseg-trial-"


def _remove_orphaned_scratch() -> None:
    """Scratch folders of trial processes that were killed (SIGKILL skips every ``finally``)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = folder.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _open_shared_cache(ctx: TrialContext, cfg: Config, key: str, stats: dict[str, Any]):
    """The slice cache of this trial's preprocessing (``key``) in this node's own cache folder: the driver's,
    memory-mapped, when this node shares its folder (one machine), else the node's own copy, built there once under
    the cache's lock (``stats["built"]``)."""
    path = ctx.cache_paths.get(key)
    if path and Path(path).is_dir() and Path(path).resolve().is_relative_to(cache_root(cfg.data.cache_dir).resolve()):
        # The driver verified the content hashes when it built or opened the cache; a size check suffices here.
        return SliceCache.open(Path(path), verify="size")
    return open_cache(cfg, stats)


def _open_shared_features(ctx: TrialContext, slot: str, node_id: str) -> FeatureCache | None:
    """The features of ``slot`` that this node's cache task (or a local sweep's driver or earlier trial) built,
    memory-mapped; None when there are none."""
    path = ctx.feature_path(node_id, slot) or published_features(ctx.feature_index, slot)
    if not path or not Path(path).is_dir():
        return None
    try:
        # Verified (hashed) when they were built or opened on this node; sizes and shapes are enough here.
        return FeatureCache.open(path, verify="size")
    except DataError:
        return None  # run_trial rebuilds what it needs


def _quiet_checkpoint_logs() -> None:
    # Tune logs every per-epoch checkpoint at INFO, which the driver echoes: one line per epoch per trial.
    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _tracker(ctx: TrialContext, cfg: Config, stage: Stage) -> TrialTracker:
    """This trial's MLflow tracker, keyed by the Tune trial id so that a retry finds its run again; its params are
    the config's flat view."""
    trial_id = tune.get_context().get_trial_id()
    return TrialTracker(
        ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, trial_id, run_name(cfg), cfg.to_flat(),
        stage=stage, buffer_path=pending_path(ctx.experiment_id, trial_id),
    )  # fmt: skip


def _restored(work: Path) -> tuple[Path | None, str | None]:
    """The folder of Tune's last checkpoint of this trial (a retry or a resumed sweep) and the MLflow run it names."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None, None
    folder = Path(checkpoint.to_directory(str(work / "restored")))
    run_file = folder / RUN_FILE
    return folder, json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None


def _epoch_reporter(tracker, run_id: str, first_report: dict[str, Any], timings: dict[str, Any]):
    """``on_epoch`` for :func:`run_trial`: MLflow metrics, then a Tune report with the training state."""

    def on_epoch(epoch: int, metrics: dict[str, float], saved: Path | None) -> None:
        if saved is not None:
            atomic_write(saved / RUN_FILE, json.dumps({"run_id": run_id}))
        tracker.log_epoch(epoch, metrics)
        # Tune gets what its scheduler and a resume need (and the epoch, which its result log then shows); every
        # metric is in MLflow.
        report = {**_scheduled(metrics), "epoch": epoch}
        if not timings.get("reported"):
            # The driver's trial_timings.csv: entry and first optimizer step of this attempt, wall clock.
            report[TIMING] = json.dumps({**first_report, "first_step_at": timings.get("first_step_at", 0.0),
                                         "features_built": bool(timings.get("features_built")),
                                         "backbone_loaded": bool(timings.get("backbone_loaded", True))})  # fmt: skip
            timings["reported"] = True
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(saved)) if saved else None)

    return on_epoch


def _report_final(results: dict[str, Any], run_id: str, work: Path) -> None:
    """The last report: test metrics, and a checkpoint that holds only the MLflow run id.

    A finished trial needs no training state, so Tune (num_to_keep=1) drops the last epoch's weights and optimizer
    moments (hundreds of MB per trial with a fine-tuned ViT-S, GBs with ViT-g), and a restore of this trial finds
    its finished run instead.
    """
    marker = work / "finished"
    marker.mkdir()
    atomic_write(marker / RUN_FILE, json.dumps({"run_id": run_id}))
    spent = {k: float(results.get(k) or 0.0) for k in ("scored_at", "checkpoint_s", "fit_s")}
    tune.report(
        {**_final(results), "done": True, "mlflow_run_id": run_id, TIMING: json.dumps(spent)},
        checkpoint=tune.Checkpoint.from_directory(str(marker)),
    )


def _scheduled(metrics: dict[str, Any]) -> dict[str, float]:
    """The validation score ASHA and the screen's choice read, when the epoch has one."""
    value = metrics.get(METRIC)
    return {METRIC: float(value)} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


def _final(results: dict[str, Any]) -> dict[str, float]:
    """A finished trial's report to Tune: its validation score (the screen's choice) and its test Dice (one line
    per finished trial on the driver); every other metric is in its MLflow run."""
    test = metric_table.primary().test_mean
    out = _scheduled(results)
    if isinstance(results.get(test), (int, float)):
        out[test] = float(results[test])
    return out


def _train(
    cfg: Config, ctx: TrialContext, tracker: TrialTracker, run_id: str, work: Path, resume_dir: Path | None,
    first_report: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Fit, validate and test the trial (resuming from ``resume_dir``) on this node's caches and the device Ray
    assigned; returns run_trial's results."""
    # The driver imports this module only to hand run_tune_trial to Tune: train.trial's pandas and scipy stay off it.
    from lasegseg.train.trial import run_trial  # deferred: start-up

    if resume_dir is not None:
        tracker.log_history(json.loads((resume_dir / "state.json").read_text())["scalars"].get("history", []))
    timings: dict[str, Any] = {}
    built: dict[str, Any] = {}
    # The driver keyed the sweep's caches on its trials' flat configs (Tune's param space): the same keys here.
    flat = cfg.to_flat()
    slot = feature_slot(flat)
    cache = _open_shared_cache(ctx, cfg, preprocessing_key(flat), built)
    first_report["slice_cache_built"] = bool(built.get("built"))
    data = prepare_data(cfg, cache=cache)
    data.features = _open_shared_features(ctx, slot, first_report["node_id"])
    # The decoders of the sweep's trials that read these features (all their levels are built together).
    data.feature_readers = tuple(ctx.feature_readers.get(slot, ()))
    data.device_share = first_report.get("gpu_share") or 1.0  # packed frozen trials share one card
    # Scratch, not Tune's trial folder: these files go to MLflow's artifact store, and Tune would copy them to its
    # storage as well (a fine-tuned ViT-g's weights twice).
    out = work / "result"
    results = run_trial(
        cfg, out, data=data, device=first_report["device"],
        on_epoch=_epoch_reporter(tracker, run_id, first_report, timings), checkpoint_dir=work / "state",
        resume_from=resume_dir, timings=timings, alias=ctx.alias(),
        durable_checkpoints=False,  # scratch: Tune copies it to its storage
    )  # fmt: skip
    if ctx.feature_index and timings.get("features_path") and timings.get("backbone_loaded"):
        # The first frozen trial of a local sweep found or built these with its backbone: later ones need none.
        publish_features(ctx.feature_index, slot, timings["features_path"])
    tracker.finish(results, artifact_dir=out)
    fit_s = sum(h.get("epoch_seconds", 0.0) for h in results.get("history", []))
    return {**results, "scored_at": timings.get("scored_at", 0.0), "checkpoint_s": timings.get("checkpoint_s", 0.0),
            "fit_s": fit_s}  # fmt: skip


def run_tune_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Train one trial; report every epoch with a checkpoint; record success or failure in MLflow.

    Args:
        config: the Tune trial's config, ``{"i": row of ctx.table, "optim.lr": rate}`` (see
            :mod:`lasegseg.sweep.study_table`); it becomes the trial's :class:`~lasegseg.config.Config` here.
        ctx: the sweep's side of the trial (where it logs, the caches of its node).
    """
    # Before this trial's own work: was the process warm when the trial came? And where does it run?
    first_report = {"trial_started_at": time.time(), **worker_info(), **placement()}
    _quiet_checkpoint_logs()
    alias = ctx.alias()
    if ctx.threads:
        torch.set_num_threads(int(ctx.threads))
    tracker = None
    _remove_orphaned_scratch()
    work = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    try:
        cfg = from_flat(ctx.table.flat(config))
        t_track = time.perf_counter()
        tracker = _tracker(ctx, cfg, "screen" if ctx.table.is_screen(int(config[ROW])) else "trial")
        resume_dir, known_run = _restored(work)
        run_id = tracker.start(known_run, {f"lasegseg.{k}": first_report[k] for k in ("node_ip", "node_id", "device")})
        finished = tracker.finished_results()
        first_report["tracking_start_s"] = time.perf_counter() - t_track
        if finished is not None:
            # The trial completed before the driver died but Tune never recorded it: report, do not retrain.
            # MLflow's latest val_dice is the last epoch's; the best epoch's (what Tune saw before) is best_val_dice.
            scores = {**finished, METRIC: finished.get(f"best_{METRIC}", finished.get(METRIC))}
            tune.report({**_final(scores), "done": True, "mlflow_run_id": run_id})
            return
        if resume_dir is not None and not (resume_dir / "state.json").is_file():
            resume_dir = None  # the final marker of a run MLflow does not hold as finished: train it again
        results = _train(cfg, ctx, tracker, run_id, work, resume_dir, first_report)
        _report_final(results, run_id, work)
    except Exception as exc:
        if tracker is not None:
            message = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            # File paths in a data error name patients; a pseudonymised sweep logs their aliases instead.
            tracker.fail(alias.scrub(message) if alias is not None else message)
        raise
    finally:
        # Checkpoints were handed to Tune (copied to its storage); the scratch copies go on every exit path.
        shutil.rmtree(work, ignore_errors=True)
