"""The Ray Tune function trainable: one lasegseg trial inside a Ray worker, tracked in its own MLflow run."""

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

from lasegseg.fsio import pid_alive
from lasegseg.sweep.worker import placement, worker_info

RUN_FILE = "mlflow_run.json"
SCRATCH_PREFIX = "lasegseg-trial-"


def _remove_orphaned_scratch() -> None:
    """Scratch folders of trial processes that were killed (SIGKILL skips every ``finally``)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = folder.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _open_shared_cache(ctx: dict[str, Any], cfg, stats: dict[str, Any]):
    """The slice cache of this trial's preprocessing in this node's own cache folder: the driver's, memory-mapped,
    when this node shares its folder (one machine), else the node's own copy, built there once under the cache's
    lock (``stats["built"]``)."""
    from lasegseg.data.cache import open_cache
    from lasegseg.data.cache_read import SliceCache
    from lasegseg.paths import cache_root
    from lasegseg.sweep.caches import preprocessing_key

    path = (ctx.get("cache_paths") or {}).get(preprocessing_key(cfg.to_flat()))
    if path and Path(path).is_dir() and Path(path).resolve().is_relative_to(cache_root(cfg.data.cache_dir).resolve()):
        # The driver verified the content hashes when it built or opened the cache; a size check suffices here.
        return SliceCache.open(Path(path), verify="size")
    return open_cache(cfg, stats)


def _open_shared_features(ctx: dict[str, Any], flat: dict[str, Any], node_id: str):
    """The features this node's cache task (or a local sweep's driver or earlier trial) built for this trial,
    memory-mapped; None when there are none."""
    from lasegseg.errors import DataError
    from lasegseg.sweep.caches import published_features
    from lasegseg.train.feature_plan import feature_slot
    from lasegseg.train.features import FeatureCache

    path = (ctx.get("feature_paths") or {}).get(node_id, {}).get(feature_slot(flat))
    path = path or published_features(ctx.get("feature_index"), flat)
    if not path or not Path(path).is_dir():
        return None
    try:
        # Verified (hashed) when they were built or opened on this node; sizes and shapes are enough here.
        return FeatureCache.open(path, verify="size")
    except DataError:
        return None  # run_trial rebuilds what it needs


def _feature_readers(ctx: dict[str, Any], flat: dict[str, Any]) -> tuple[str, ...]:
    """The decoders of the sweep's trials that read this trial's features (all their levels are built together)."""
    from lasegseg.train.feature_plan import feature_slot

    return tuple((ctx.get("feature_readers") or {}).get(feature_slot(flat), ()))


def _quiet_checkpoint_logs() -> None:
    # Tune logs every per-epoch checkpoint at INFO, which the driver echoes: one line per epoch per trial.
    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _alias(ctx: dict[str, Any]):
    """The sweep's pseudonymiser (``--pseudonymize``), else None."""
    if not ctx.get("pseudonym_salt"):
        return None
    from lasegseg.data.pseudonym import Pseudonymizer

    return Pseudonymizer(ctx["pseudonym_salt"].encode("utf-8"), ctx.get("case_ids", ()))


def _tracker(ctx: dict[str, Any], cfg):
    """This trial's MLflow tracker, keyed by the Tune trial id so that a retry finds its run again."""
    from ray import tune

    from lasegseg.config import run_name
    from lasegseg.tracking.buffer import pending_path
    from lasegseg.tracking.tracker import TrialTracker

    trial_id = tune.get_context().get_trial_id()
    return TrialTracker(
        ctx["tracking_uri"], ctx["experiment_id"], ctx["parent_run_id"], trial_id, run_name(cfg), cfg.to_flat(),
        stage=ctx.get("stage", "trial"), buffer_path=pending_path(ctx["experiment_id"], trial_id),
    )  # fmt: skip


def _restored(work: Path) -> tuple[Path | None, str | None]:
    """The folder of Tune's last checkpoint of this trial (a retry or a resumed sweep) and the MLflow run it names."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None, None
    folder = Path(checkpoint.to_directory(str(work / "restored")))
    run_file = folder / RUN_FILE
    return folder, json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None


def _epoch_reporter(tracker, run_id: str, first_report: dict[str, Any], timings: dict[str, Any]):
    """``on_epoch`` for :func:`run_trial`: MLflow metrics, then a Tune report with the training state."""
    from ray import tune

    def on_epoch(epoch: int, metrics: dict[str, float], saved: Path | None) -> None:
        if saved is not None:
            (saved / RUN_FILE).write_text(json.dumps({"run_id": run_id}))
        tracker.log_epoch(epoch, metrics)
        report = {**metrics, "epoch": epoch, "done": False}
        if not timings.get("reported"):
            # The driver's trial_timings.csv: entry and first optimizer step of this attempt, wall clock.
            report |= {**first_report, "first_step_at": timings.get("first_step_at", 0.0),
                       "features_built": bool(timings.get("features_built")),
                       "backbone_loaded": bool(timings.get("backbone_loaded", True))}  # fmt: skip
            timings["reported"] = True
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(saved)) if saved else None)

    return on_epoch


def _report_final(results: dict[str, Any], epochs: int, run_id: str, work: Path) -> None:
    """The last report: test metrics, and a checkpoint that holds only the MLflow run id.

    A finished trial needs no training state, so Tune (num_to_keep=1) drops the last epoch's weights and optimizer
    moments (hundreds of MB per trial with a fine-tuned ViT-S, GBs with ViT-g), and a restore of this trial finds
    its finished run instead.
    """
    from ray import tune

    final = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    marker = work / "finished"
    marker.mkdir()
    (marker / RUN_FILE).write_text(json.dumps({"run_id": run_id}))
    tune.report(
        {**final, "epoch": epochs - 1, "done": True, "mlflow_run_id": run_id},
        checkpoint=tune.Checkpoint.from_directory(str(marker)),
    )


def _train(cfg, ctx: dict[str, Any], tracker, run_id: str, work: Path, resume_dir: Path | None, first_report, alias):
    """Fit, validate and test the trial (resuming from ``resume_dir``) on this node's caches and the device Ray
    assigned; returns run_trial's results."""
    from lasegseg.train.trial import run_trial
    from lasegseg.train.trial_data import prepare_data

    if resume_dir is not None:
        tracker.log_history(json.loads((resume_dir / "state.json").read_text())["scalars"].get("history", []))
    timings: dict[str, Any] = {}
    built: dict[str, Any] = {}
    cache = _open_shared_cache(ctx, cfg, built)
    first_report["slice_cache_built"] = bool(built.get("built"))
    data = prepare_data(cfg, cache=cache)
    data.features = _open_shared_features(ctx, cfg.to_flat(), first_report["node_id"])
    data.feature_readers = _feature_readers(ctx, cfg.to_flat())
    data.device_share = first_report.get("gpu_share") or 1.0  # packed frozen trials share one card
    # Scratch, not Tune's trial folder: these files go to MLflow's artifact store, and Tune would copy them to its
    # storage as well (a fine-tuned ViT-g's weights twice).
    out = work / "result"
    results = run_trial(
        cfg, out, data=data, device=first_report["device"],
        on_epoch=_epoch_reporter(tracker, run_id, first_report, timings), checkpoint_dir=work / "state",
        resume_from=resume_dir, timings=timings, alias=alias,
        durable_checkpoints=False,  # scratch: Tune copies it to its storage
    )  # fmt: skip
    if ctx.get("feature_index") and timings.get("features_path") and timings.get("backbone_loaded"):
        from lasegseg.sweep.caches import publish_features

        # The first frozen trial of a local sweep found or built these with its backbone: later ones need none.
        publish_features(ctx["feature_index"], cfg.to_flat(), timings["features_path"])
    tracker.finish(results, artifact_dir=out)
    fit_s = sum(h.get("epoch_seconds", 0.0) for h in results.get("history", []))
    return {**results, "scored_at": timings.get("scored_at", 0.0), "checkpoint_s": timings.get("checkpoint_s", 0.0),
            "fit_s": fit_s}  # fmt: skip


def run_tune_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Train one trial; report every epoch with a checkpoint; record success or failure in MLflow.

    Args:
        config: ``{"trial": flat config}`` (grid stage) plus ``"optim.lr"`` when Optuna samples the rate.
        ctx: the sweep's context: tracking_uri, experiment_id, parent_run_id, stage, cache_paths, feature_paths,
            feature_index (a local sweep's),
            threads.
    """
    # Before this trial's own imports: was the process warm when the trial came? And where does it run?
    first_report = {"trial_started_at": time.time(), **worker_info(), **placement()}
    _quiet_checkpoint_logs()
    import torch
    from ray import tune

    from lasegseg.config import from_flat, merge_trial

    alias = _alias(ctx)
    if ctx.get("threads"):
        torch.set_num_threads(int(ctx["threads"]))
    tracker = None
    _remove_orphaned_scratch()
    work = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    try:
        cfg = from_flat(merge_trial(config))
        t_track = time.perf_counter()
        tracker = _tracker(ctx, cfg)
        resume_dir, known_run = _restored(work)
        run_id = tracker.start(known_run, {f"lasegseg.{k}": first_report[k] for k in ("node_ip", "node_id", "device")})
        finished = tracker.finished_results()
        first_report["tracking_start_s"] = time.perf_counter() - t_track
        if finished is not None:
            # The trial completed before the driver died but Tune never recorded it: report, do not retrain.
            tune.report({**finished, "epoch": cfg.train.epochs - 1, "done": True, "mlflow_run_id": run_id})
            return
        if resume_dir is not None and not (resume_dir / "state.json").is_file():
            resume_dir = None  # the final marker of a run MLflow does not hold as finished: train it again
        results = _train(cfg, ctx, tracker, run_id, work, resume_dir, first_report, alias)
        _report_final(results, cfg.train.epochs, run_id, work)
    except Exception as exc:
        if tracker is not None:
            message = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            # File paths in a data error name patients; a pseudonymised sweep logs their aliases instead.
            tracker.fail(alias.scrub(message) if alias is not None else message)
        raise
    finally:
        # Checkpoints were handed to Tune (copied to its storage); the scratch copies go on every exit path.
        shutil.rmtree(work, ignore_errors=True)
