"""One trial, end to end: fit → validate every epoch on whole volumes → best checkpoint → test metrics.

The loop over epochs and what it carries between them (the best weights, the history, the training state it saves
by :class:`~lasegseg.train.checkpoint.CheckpointPolicy`). Its parts live beside it: the data and features a trial
reads in :mod:`~lasegseg.train.trial_data`, the training step in :mod:`~lasegseg.train.fit`, the scoring in
:mod:`~lasegseg.train.evaluation`, the files it leaves in :mod:`~lasegseg.train.outputs`.

Pure compute: no ray, no mlflow. A sweep drives it through ``on_epoch`` (report + checkpoint) and
``resume_from`` (continue from a training-state folder written by a previous attempt).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lasegseg import metric_table
from lasegseg.config import Config, run_name
from lasegseg.models.segmenter import build_segmenter, load_checkpoint_state, state_for_checkpoint
from lasegseg.train import checkpoint as ckpt
from lasegseg.train.evaluation import evaluate, validation_stride
from lasegseg.train.features import FeatureCache
from lasegseg.train.fit import build_optimizer, compiled_forward, train_one_epoch
from lasegseg.train.losses import build_loss
from lasegseg.train.metrics import summarize, validation_scores
from lasegseg.train.outputs import pseudonymize_results, write_outputs
from lasegseg.train.trial_data import TrialData, backbone_stub, pick_device, prepare_data, trial_features

EpochCallback = Callable[[int, dict[str, float], "Path | None"], None]


def _best(name: str) -> str:
    """The training state's key of the best epoch's value of ``name`` (``best_val_dice``)."""
    return f"best_{name}"


@dataclass
class _Progress:
    """What an epoch loop carries from epoch to epoch and into a checkpoint (``scalars`` in the training state)."""

    state: dict[str, Any]
    best_weights: dict[str, torch.Tensor] | None = None

    @classmethod
    def start(cls, resume_from: Path | None, model, optimizer, scheduler) -> _Progress:
        """A fresh start, or the state a previous attempt saved (weights, optimizer, schedule step, RNG)."""
        state = {"epoch": 0, "step": 0, _best(metric_table.primary().val): -1.0, "best_epoch": -1, "history": []}
        if resume_from is None:
            return cls(state)
        state, best = ckpt.load_train_state(Path(resume_from), model, optimizer)
        # The optimizer's groups came back with the learning rate of the next step; the schedule resumes there too.
        scheduler.last_epoch = state["step"]
        return cls(state, best)

    def record(self, epoch: int, metrics: dict[str, float], model) -> None:
        """Count the epoch; keep a CPU copy of the weights when the primary validation metric (Dice) improved."""
        s, key = self.state, metric_table.primary().val
        if key in metrics and metrics[key] > s[_best(key)]:
            s["best_epoch"] = epoch
            s.update({_best(name): metrics[name] for name in metric_table.selection_metrics()})
            self.best_weights = {k: v.detach().cpu().clone() for k, v in state_for_checkpoint(model).items()}
        s["epoch"] = epoch + 1
        s["history"].append({"epoch": epoch, **metrics})


@dataclass
class _Fit:
    """A trial's training set-up: the model and what trains it, on the data and device chosen."""

    cfg: Config
    model: Any
    data: TrialData
    device: torch.device
    features: FeatureCache | None
    forward: Callable | None
    optimizer: Any
    scheduler: Any
    loss_fn: Any

    def epoch(self, epoch: int, progress: _Progress, before_step: Callable[[], None] | None) -> dict[str, float]:
        """Train one epoch (its order and augmentation draws are functions of (seed, epoch)), validate if due."""
        cfg, bs = self.cfg, self.cfg.train.batch_size
        t0 = time.perf_counter()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(self.data.train_rows)
        generator = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, epoch, 1]).integers(2**62)))
        loss, lr = train_one_epoch(
            self.model, self.optimizer, self.loss_fn, self.data.cache.images, self.data.cache.labels, order,
            batch_size=bs, device=self.device, amp=cfg.train.amp, scheduler=self.scheduler, features=self.features,
            forward=self.forward, augment=cfg.train.augment, generator=generator, before_step=before_step,
        )  # fmt: skip
        progress.state["step"] += math.ceil(len(order) / bs)
        metrics: dict[str, float] = {"train_loss": loss, "lr": lr}
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            t_val = time.perf_counter()
            val = self.evaluate(self.data.split.val, stride=self.val_stride)
            metrics.update(validation_scores(val))
            metrics["val_seconds"] = time.perf_counter() - t_val
        metrics["epoch_seconds"] = time.perf_counter() - t0
        return metrics

    def evaluate(self, case_ids: Sequence[str], full: bool = False, stride: int = 1) -> list[dict[str, Any]]:
        return evaluate(
            self.model, self.data.cache, case_ids, device=self.device, amp=self.cfg.train.amp,
            batch_size=self.cfg.train.batch_size, full=full, features=self.features,
            nsd_tolerance_mm=self.cfg.eval.nsd_tolerance_mm, stride=stride,
        )  # fmt: skip

    @property
    def val_stride(self) -> int:
        """Every how many slices per-epoch validation reads each volume (``train.val_budget``)."""
        cache, val = self.data.cache, self.data.split.val
        return validation_stride(self.cfg.train.val_budget, len(cache.rows_for(list(val))), len(self.data.train_rows))


def _set_up(cfg: Config, data: TrialData, device: torch.device, timings: dict[str, Any]) -> _Fit:
    """Seed, build the model on ``device``, choose features or backbone, and the optimizer with its schedule."""
    torch.manual_seed(cfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    stub = backbone_stub(cfg, data, device)
    model = build_segmenter(cfg.model, backbone=stub).to(device)
    timings["backbone_loaded"] = stub is None and model.backbone is not None
    built: dict[str, Any] = {}
    features = trial_features(cfg, model, data, device, built)
    timings["feature_cache"] = features is not None
    timings["features_path"] = str(features.path) if features is not None else ""
    timings["features_built"] = bool(built.get("built"))
    steps_per_epoch = max(1, math.ceil(len(data.train_rows) / cfg.train.batch_size))
    optimizer, scheduler = build_optimizer(cfg, model, steps_per_epoch)
    forward = compiled_forward(cfg, model, features)
    return _Fit(cfg, model, data, device, features, forward, optimizer, scheduler, build_loss(cfg.train.loss))


def _test(fit: _Fit, progress: _Progress) -> dict[str, Any]:
    """Test metrics of the best epoch's weights, with the trial's summary fields."""
    if progress.best_weights is not None:
        load_checkpoint_state(fit.model, {k: v.to(fit.device) for k, v in progress.best_weights.items()})
    state, cache, split, train_rows = progress.state, fit.data.cache, fit.data.split, fit.data.train_rows
    best = {name: state.get(_best(name), math.nan) for name in metric_table.selection_metrics()}
    val_s, stride = 0.0, fit.val_stride
    if stride > 1 and state["best_epoch"] >= 0:
        # The epochs were compared on every k-th slice; the one chosen is scored on every slice.
        t_val = time.perf_counter()
        best = validation_scores(fit.evaluate(split.val))
        val_s = time.perf_counter() - t_val
    test_rows = fit.evaluate(split.test, full=True)
    for row in test_rows:
        row["split"] = "test"
    return {
        "run_name": run_name(fit.cfg),
        **best,
        "val_slice_stride": stride,
        "val_full_seconds": val_s,
        "best_epoch": state["best_epoch"],
        **summarize(test_rows, "test"),
        "n_train_patients": int(np.unique(cache.case_codes[train_rows]).size),
        "n_train_slices": len(train_rows),
        "split": {"train": list(split.train), "val": list(split.val), "test": list(split.test)},
        "per_patient": test_rows,
        "history": state["history"],
        "feature_cache": fit.features is not None,
    }


def run_trial(
    cfg: Config,
    out_dir: Path | None = None,
    *,
    data: TrialData | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    timings: dict[str, Any] | None = None,
    alias: Callable[[str], str] | None = None,
    durable_checkpoints: bool = True,
) -> dict[str, Any]:
    """Train one model and return its metrics (also written to ``out_dir``).

    Args:
        cfg: the trial config (validated).
        out_dir: where ``model/``, ``metrics.json`` and ``per_patient.csv`` go (written once, at the end).
        data: pre-opened cache + split (a sweep shares one cache between trials).
        device: torch device; default CUDA when available.
        progress: show a progress bar over epochs.
        on_epoch: called after every epoch with (epoch, metrics, training-state folder or None); the folder is
            given on the epochs the :class:`~lasegseg.train.checkpoint.CheckpointPolicy` saved on.
        checkpoint_dir: write the resumable training state here when the policy says so.
        resume_from: a training-state folder to continue from.
        timings: filled with ``first_step_at`` (``time.time()`` right before this attempt's first optimizer step),
            ``scored_at`` (once the test patients are scored), ``feature_cache`` (bool), ``checkpoints`` (saves this
            attempt) and ``checkpoint_s`` (their time, hand-over included), for a sweep's fixed-cost
            and bookkeeping accounting.
        alias: maps case ids to the names written to ``out_dir`` and returned (``--pseudonymize``).
        durable_checkpoints: fsync each training-state commit; off where the folder is a scratch copy that another
            component persists (a sweep trial's, which Tune copies to its storage after every epoch).
    """
    device = pick_device(device)
    timings = {} if timings is None else timings
    fit = _set_up(cfg, data or prepare_data(cfg), device, timings)
    state = _Progress.start(resume_from, fit.model, fit.optimizer, fit.scheduler)
    bar = _progress_bar(cfg, state.state["epoch"]) if progress else None

    def before_step() -> None:
        timings.setdefault("first_step_at", time.time())

    policy = ckpt.CheckpointPolicy.of(cfg)
    fit.model.train()
    for epoch in range(state.state["epoch"], cfg.train.epochs):
        metrics = fit.epoch(epoch, state, before_step if "first_step_at" not in timings else None)
        state.record(epoch, metrics, fit.model)
        saved, t_save = None, time.perf_counter()
        if checkpoint_dir is not None and policy.due(epoch, t_save):
            saved = ckpt.save_train_state(
                Path(checkpoint_dir), fit.model, fit.optimizer, state.state, state.best_weights,
                durable=durable_checkpoints,
            )  # fmt: skip
        if bar is not None:
            bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", val_dice=f"{metrics.get('val_dice', math.nan):.3f}")
            bar.update(1)
        if on_epoch is not None:
            on_epoch(epoch, metrics, saved)
        if saved is not None:
            policy.record(t_save, time.perf_counter())  # the save and its hand-over (Tune's copy) together
    timings["checkpoints"], timings["checkpoint_s"] = policy.saves, policy.spent_s
    if bar is not None:
        bar.close()
    results = _test(fit, state)
    timings["scored_at"] = time.time()  # what follows is bookkeeping: files, overlays, tracking
    if out_dir is not None:
        write_outputs(
            Path(out_dir), fit.model, cfg, results, cache=fit.data.cache, device=device, alias=alias,
            features=fit.features,
        )  # fmt: skip
    return pseudonymize_results(results, alias)


def _progress_bar(cfg: Config, initial: int):
    return tqdm(total=cfg.train.epochs, initial=initial, desc=run_name(cfg), unit="ep", leave=True)
