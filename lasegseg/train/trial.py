"""One trial, end to end: fit → validate every epoch on whole volumes → best checkpoint → test metrics.

Pure compute: no ray, no mlflow. A sweep drives it through ``on_epoch`` (report + checkpoint) and
``resume_from`` (continue from a training-state folder written by a previous attempt).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lasegseg.config import Config, EvalConfig, run_name
from lasegseg.data.cache import open_cache
from lasegseg.fsio import atomic_write, write_json_atomic
from lasegseg.train import checkpoint as ckpt
from lasegseg.train.augment import augment_batch
from lasegseg.train.features import (
    FeatureCache,
    compute_precision,
    get_or_build_features,
    levels_read,
    to_device,
    uses_feature_cache,
)
from lasegseg.train.inference import autocast_context, predict_slices, probabilities_to_native
from lasegseg.train.losses import build_loss
from lasegseg.train.metrics import METRICS, case_metrics, dice_iou, summarize

logger = logging.getLogger(__name__)
EpochCallback = Callable[[int, dict[str, float], "Path | None"], None]


@dataclass
class TrialData:
    """The cached slices and the patient split a trial trains and evaluates on.

    Args:
        cache: the slice cache.
        split: the patient split.
        train_rows: this trial's few-shot training rows.
        features: frozen-backbone features over the cache (a sweep driver builds them once); used when they fit and
            hold the levels the trial's decoder reads.
        feature_readers: the decoders of every trial that reads this backbone's features (a sweep's); a trial that
            has to build them builds the levels all of them read, so that none builds again.
        device_share: the share of its GPU this trial may fill (its Ray GPU fraction when trials are packed on one
            card; 1 alone), which bounds the training features it holds there.
    """

    cache: Any
    split: Any
    train_rows: np.ndarray
    features: FeatureCache | None = None
    feature_readers: tuple[str, ...] = ()
    device_share: float = 1.0


def prepare_data(cfg: Config, cache: Any = None) -> TrialData:
    """Open (or reuse) the cache, split patients, and pick this trial's few-shot training rows."""
    from lasegseg.data.splits import select_training_rows, split_patients

    if cache is None:
        cache = open_cache(cfg)
    if cache.image_size != cfg.data.image_size:
        raise ValueError(f"cache image size {cache.image_size} != data.image_size {cfg.data.image_size}")
    split = split_patients(cache.cases, cfg.data.split_seed, cfg.data.val_fraction, cfg.data.test_fraction)
    rows = select_training_rows(cache, split, cfg.seed, patients=cfg.data.patients, fraction=cfg.data.fraction)
    return TrialData(cache=cache, split=split, train_rows=np.asarray(rows))


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at the last step."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.inference_mode()
def predict_cached_slices(
    model, features: FeatureCache, cache, rows: np.ndarray, *, batch_size: int, device, amp: str
) -> np.ndarray:
    """Foreground probabilities of cache ``rows`` decoded from cached features (as :func:`predict_slices`)."""
    device = torch.device(device)
    out = np.empty((len(rows), *cache.images.shape[1:]), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        x = to_device(torch.from_numpy(np.asarray(cache.images[idx]))[:, None], device).float()
        feats = features.batch(idx, device)
        with autocast_context(device, amp):
            prob = torch.softmax(model.decode(feats, x).float(), dim=1)[:, 1]
        out[start : start + len(idx)] = prob.float().cpu().numpy()
    return out


def predict_case(
    model, cache, case_id: str, *, device, amp: str, batch_size: int, features: FeatureCache | None = None,
    slices: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """Boolean (X, Y, Z) prediction of one cached case at its native resolution.

    Args:
        features: decode from these cached backbone features instead of running the backbone.
        slices: predict only these axial slices (indices along Z, ascending); the result has ``len(slices)``
            along Z.
    """
    rows = cache.rows_for([case_id])
    rows = rows[np.argsort(cache.slice_index[rows], kind="stable")]
    if slices is not None:
        rows = rows[slices]
    if features is not None:
        probs = predict_cached_slices(model, features, cache, rows, batch_size=batch_size, device=device, amp=amp)
    else:
        probs = predict_slices(model, cache.images[rows], batch_size=batch_size, device=device, amp=amp)
    shape = cache.native_shape(case_id)
    return probabilities_to_native(probs, (shape[0], shape[1])) >= 0.5


def strided_slices(n: int, stride: int) -> np.ndarray:
    """Every ``stride``-th of ``n`` slices, centred (the offset is half the stride), so both ends lose alike."""
    return np.arange((stride - 1) // 2 if stride <= n else n // 2, n, max(1, stride))


def validation_stride(budget: float, val_slices: int, train_slices: int) -> int:
    """The smallest k for which every k-th validation slice fits ``budget`` slices per training slice
    (``train.val_budget``; 0 or a budget that fits them all: 1)."""
    allowed = budget * train_slices
    if budget <= 0 or val_slices <= allowed:
        return 1
    return max(1, math.ceil(val_slices / max(allowed, 1.0)))


def evaluate(
    model, cache, case_ids: Sequence[str], *, device, amp: str, batch_size: int, full: bool = False,
    features: FeatureCache | None = None, nsd_tolerance_mm: float = EvalConfig.nsd_tolerance_mm, stride: int = 1,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per-patient 3D metrics at native resolution; ``full`` adds NSD, HD95 and per-slice Dice (test).

    Args:
        features: cached backbone features (frozen mode) to decode from instead of running the backbone.
        nsd_tolerance_mm: NSD's tolerance with ``full`` (``eval.nsd_tolerance_mm``); distances use each case's
            voxel spacing.
        stride: score every ``stride``-th axial slice of each volume (:func:`strided_slices`), prediction and
            reference alike: Dice and IoU over that slab set (per-epoch validation within ``train.val_budget``).
            Not with ``full``, whose surface distances need whole volumes.
    """
    if full and stride != 1:
        raise ValueError("full metrics (NSD, HD95) need every slice: stride must be 1")
    was_training = model.training
    model.eval()
    rows = []
    for cid in case_ids:
        slices = strided_slices(cache.native_shape(cid)[2], stride) if stride > 1 else None
        pred = predict_case(
            model, cache, cid, device=device, amp=amp, batch_size=batch_size, features=features, slices=slices
        )
        ref = cache.native_label(cid)
        if slices is not None:
            ref = ref[..., slices]
        if full:
            metrics = case_metrics(pred, ref, cache.spacing(cid), nsd_tolerance_mm=nsd_tolerance_mm)
            rows.append({"case_id": cid, **metrics})
        else:
            dice, iou = dice_iou(pred, ref)
            rows.append({"case_id": cid, "dice": dice, "iou": iou})
    model.train(was_training)
    return rows


def train_one_epoch(
    model, optimizer, loss_fn, images: np.ndarray, labels: np.ndarray, order: np.ndarray, *, batch_size: int,
    device: torch.device, amp: str, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    features: FeatureCache | None = None, forward: Callable | None = None, augment: str = "none",
    generator: torch.Generator | None = None, before_step: Callable[[], None] | None = None,
) -> tuple[float, float]:  # fmt: skip
    """One pass over ``order`` (row indices of the cache); returns the mean loss and the last step's learning rate.

    Rows of a batch are read sorted (sequential pages of the memory map); fp16/uint8 cross to the device (pinned,
    non-blocking on CUDA) and are widened there; the loss is accumulated on the device so no step waits for the GPU.

    Args:
        scheduler: stepped after every optimizer step (the learning-rate schedule is per step).
        features: train the decoder on these cached backbone features (frozen mode, no augmentation), read through
            their :meth:`~lasegseg.train.features.FeatureCache.batches` (held or prefetched; see ``for_training``).
        forward: the callable that maps the batch to logits (e.g. a compiled model or decoder); default ``model``,
            or ``model.decode`` with ``features``.
        augment: ``train.augment`` applied to each batch (never with ``features``).
        generator: seeds the augmentation.
        before_step: called right before every optimizer step (timings).
    """
    if features is not None and augment != "none":
        raise ValueError("cached features cannot be augmented")
    if forward is None:
        forward = model.decode if features is not None else model
    total = torch.zeros((), device=device)
    steps, lr = 0, optimizer.param_groups[-1]["lr"]
    batches = [np.sort(order[start : start + batch_size]) for start in range(0, len(order), batch_size)]
    feature_batches = features.batches(batches, device) if features is not None else [None] * len(batches)
    for idx, feats in zip(batches, feature_batches, strict=True):
        x = to_device(torch.from_numpy(np.asarray(images[idx]))[:, None], device).float()
        y = to_device(torch.from_numpy(np.asarray(labels[idx]))[:, None], device).long()
        if augment != "none":
            x, y = augment_batch(x, y, augment, generator)
        with autocast_context(device, amp):
            logits = forward(feats, x) if features is not None else forward(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        lr = optimizer.param_groups[-1]["lr"]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach()
        steps += 1
    return float(total) / max(1, steps), lr


def _trial_features(
    cfg: Config, model, data: TrialData, device: torch.device, stats: dict[str, Any] | None = None
) -> FeatureCache | None:
    """The cached features this trial trains on, read as the levels its decoder reads (``model.levels``), or None
    when it runs the backbone (see ``train.feature_cache``). Its training rows are held on ``device`` when they fit,
    else prefetched there on a thread (:meth:`~lasegseg.train.features.FeatureCache.for_training`).

    Args:
        stats: gets ``built`` True when this trial had to compute them.
    """
    if not model.frozen or not cfg.train.feature_cache:
        return None
    if cfg.train.augment != "none":
        logger.warning("feature cache off: %s augmentation changes the backbone input every epoch", cfg.train.augment)
        return None
    given = data.features
    if (
        given is not None
        and given.matches(model.backbone, data.cache)
        and given.manifest.get("precision") == compute_precision(device, cfg.train.amp)
        and given.holds(model.levels)
    ):
        return given.reader(model.levels).for_training(data.train_rows, device, share=data.device_share)
    levels = model.levels
    if data.feature_readers:
        levels = tuple(sorted({*levels, *levels_read(data.feature_readers, model.backbone.num_features_levels)}))
    features = get_or_build_features(
        model.backbone, data.cache, levels=levels, device=device, amp=cfg.train.amp,
        batch_size=max(32, cfg.train.batch_size), stats=stats,
    )  # fmt: skip
    return features.reader(model.levels).for_training(data.train_rows, device, share=data.device_share)


def _backbone_stub(cfg: Config, data: TrialData, device: torch.device):
    """A weightless stand-in for a frozen trial's backbone when the features it was given serve every pass the
    trial makes (training, validation, test, overlays), else None (the backbone is loaded).

    The features must come from this backbone's source over this slice cache, at this device's precision, with
    the levels the decoder reads, and record the backbone's shape (caches built before that was recorded load it).
    """
    from lasegseg.models.backbones import BackboneStub, backbone_source
    from lasegseg.models.decoders import decoder_levels

    given = data.features
    if given is None or not uses_feature_cache(cfg.to_flat()):
        return None
    m = given.manifest
    if any(k not in m for k in ("family", "embed_dim", "patch_size", "backbone_source", "layer_indices")):
        return None
    if (
        m["backbone_source"] != backbone_source(cfg.model.backbone, registers=cfg.model.registers)
        or m.get("slice_cache") != data.cache.key
        or m.get("precision") != compute_precision(device, cfg.train.amp)
    ):
        return None
    stub = BackboneStub(
        source=m["backbone_source"], family=m["family"], embed_dim=m["embed_dim"], patch_size=m["patch_size"],
        layer_indices=m["layer_indices"], source_fingerprint=m["backbone_fingerprint"],
    )  # fmt: skip
    return stub if given.holds(decoder_levels(cfg.model.decoder, stub.num_features_levels)) else None


def _compiled_forward(cfg: Config, model, features: FeatureCache | None) -> Callable | None:
    """``torch.compile`` of what the training step calls (the decoder on cached features, else the whole model).

    The module itself stays uncompiled, so checkpoints keep their parameter names. The batch dimension of every
    tensor argument is marked dynamic before each call, so an epoch's last, smaller batch runs the graph compiled for
    the full ones instead of compiling another (a batch of one still gets its own: dynamic sizes start at 2).
    """
    if not cfg.train.compile:
        return None
    compiled = torch.compile(model.decode if features is not None else model)

    def forward(*args):
        for arg in args:
            for tensor in arg if isinstance(arg, (list, tuple)) else (arg,):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return compiled(*args)

    return forward


def _optimizer(cfg: Config, model, steps_per_epoch: int):
    """AdamW over the segmenter's parameter groups and its per-step schedule: linear warmup, then cosine decay."""
    from lasegseg.models.segmenter import param_groups

    groups = param_groups(model, cfg.optim.lr, cfg.model.backbone_lr_mult, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    total = steps_per_epoch * cfg.train.epochs
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    o = cfg.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, o.min_lr_ratio))
    return optimizer, scheduler


@dataclass
class _Progress:
    """What an epoch loop carries from epoch to epoch and into a checkpoint (``scalars`` in the training state)."""

    state: dict[str, Any]
    best_weights: dict[str, torch.Tensor] | None = None

    @classmethod
    def start(cls, resume_from: Path | None, model, optimizer, scheduler) -> _Progress:
        """A fresh start, or the state a previous attempt saved (weights, optimizer, schedule step, RNG)."""
        state = {"epoch": 0, "step": 0, "best_val_dice": -1.0, "best_epoch": -1, "history": []}
        if resume_from is None:
            return cls(state)
        state, best = ckpt.load_train_state(Path(resume_from), model, optimizer)
        # The optimizer's groups came back with the learning rate of the next step; the schedule resumes there too.
        scheduler.last_epoch = state["step"]
        return cls(state, best)

    def record(self, epoch: int, metrics: dict[str, float], model) -> None:
        """Count the epoch; keep a CPU copy of the weights when validation Dice improved."""
        from lasegseg.models.segmenter import state_for_checkpoint

        s = self.state
        if "val_dice" in metrics and metrics["val_dice"] > s["best_val_dice"]:
            s["best_val_dice"], s["best_epoch"], s["best_val_iou"] = metrics["val_dice"], epoch, metrics["val_iou"]
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
            metrics["val_dice"] = float(np.mean([r["dice"] for r in val]))
            metrics["val_iou"] = float(np.mean([r["iou"] for r in val]))
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
    from lasegseg.models.segmenter import build_segmenter

    torch.manual_seed(cfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    stub = _backbone_stub(cfg, data, device)
    model = build_segmenter(cfg.model, backbone=stub).to(device)
    timings["backbone_loaded"] = stub is None and model.backbone is not None
    built: dict[str, Any] = {}
    features = _trial_features(cfg, model, data, device, built)
    timings["feature_cache"] = features is not None
    timings["features_path"] = str(features.path) if features is not None else ""
    timings["features_built"] = bool(built.get("built"))
    steps_per_epoch = max(1, math.ceil(len(data.train_rows) / cfg.train.batch_size))
    optimizer, scheduler = _optimizer(cfg, model, steps_per_epoch)
    forward = _compiled_forward(cfg, model, features)
    return _Fit(cfg, model, data, device, features, forward, optimizer, scheduler, build_loss(cfg.train.loss))


def _test(fit: _Fit, progress: _Progress) -> dict[str, Any]:
    """Test metrics of the best epoch's weights, with the trial's summary fields."""
    from lasegseg.models.segmenter import load_checkpoint_state

    if progress.best_weights is not None:
        load_checkpoint_state(fit.model, {k: v.to(fit.device) for k, v in progress.best_weights.items()})
    state, cache, split, train_rows = progress.state, fit.data.cache, fit.data.split, fit.data.train_rows
    val_dice, val_iou, val_s, stride = state["best_val_dice"], state.get("best_val_iou", math.nan), 0.0, fit.val_stride
    if stride > 1 and state["best_epoch"] >= 0:
        # The epochs were compared on every k-th slice; the one chosen is scored on every slice.
        t_val = time.perf_counter()
        val = fit.evaluate(split.val)
        val_dice, val_iou = float(np.mean([r["dice"] for r in val])), float(np.mean([r["iou"] for r in val]))
        val_s = time.perf_counter() - t_val
    test_rows = fit.evaluate(split.test, full=True)
    for row in test_rows:
        row["split"] = "test"
    return {
        "run_name": run_name(fit.cfg),
        "val_dice": val_dice,
        "val_iou": val_iou,
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


AUTO_CHECKPOINT_FACTOR = 19.0  # train 19× a save's cost between saves: saving is ≤ 5 % of the time


@dataclass
class CheckpointPolicy:
    """When a trial saves its training state (``train.checkpoint_every`` / ``train.checkpoint_interval_s``).

    Due after an epoch when ``every`` divides the epoch count, or ``interval_s`` seconds have passed since the
    last save; with neither set, when the time since the last save reaches :data:`AUTO_CHECKPOINT_FACTOR` × the
    last save's cost (the first epoch always saves, which measures it).
    """

    every: int = 0
    interval_s: float = 0.0
    last_at: float = field(default_factory=time.perf_counter)
    cost_s: float = 0.0
    saves: int = 0
    spent_s: float = 0.0

    @classmethod
    def of(cls, cfg: Config) -> CheckpointPolicy:
        return cls(cfg.train.checkpoint_every, cfg.train.checkpoint_interval_s)

    def due(self, epoch: int, now: float | None = None) -> bool:
        """Whether to save after ``epoch`` (0-based)."""
        elapsed = (time.perf_counter() if now is None else now) - self.last_at
        if self.every and (epoch + 1) % self.every == 0:
            return True
        if self.interval_s:
            return elapsed >= self.interval_s
        return not self.every and elapsed >= AUTO_CHECKPOINT_FACTOR * self.cost_s

    def record(self, started: float, ended: float) -> None:
        """A save (and its hand-over) ran from ``started`` to ``ended`` (``time.perf_counter``)."""
        self.cost_s, self.last_at, self.saves = ended - started, ended, self.saves + 1
        self.spent_s += self.cost_s


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
            given on the epochs the :class:`CheckpointPolicy` saved on.
        checkpoint_dir: write the resumable training state here when the :class:`CheckpointPolicy` says so.
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

    policy = CheckpointPolicy.of(cfg)
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
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.epochs, initial=initial, desc=run_name(cfg), unit="ep", leave=True)


def pseudonymize_results(results: dict[str, Any], alias: Callable[[str], str] | None) -> dict[str, Any]:
    """``results`` with every case id (per-patient rows, split lists) replaced by ``alias(case id)``."""
    if alias is None:
        return results
    return {
        **results,
        "per_patient": [{**row, "case_id": alias(row["case_id"])} for row in results["per_patient"]],
        "split": {name: [alias(c) for c in ids] for name, ids in results["split"].items()},
    }


def write_overlays(
    model, cache, rows: list[dict[str, Any]], path: Path, *, device, amp: str, k: int = 3,
    alias: Callable[[str], str] | None = None, features: FeatureCache | None = None,
) -> Path:  # fmt: skip
    """Prediction and ground-truth contours on ``k`` slices of the test patients (as the paper's Figure 3).

    Titles name each case by ``alias(case id)`` when given (pseudonymised runs).

    Args:
        features: decode the panels from these cached backbone features (frozen mode) instead of running the
            backbone.
    """
    from lasegseg.train.overlay import overlay_figure, pick_slices

    model.eval()
    picked, images, truths, preds, titles = [], [], [], [], []
    for row in rows[:2]:
        cid = row["case_id"]
        case_rows = cache.rows_for([cid])
        case_rows = case_rows[np.argsort(cache.slice_index[case_rows], kind="stable")]
        labels = np.moveaxis(np.asarray(cache.labels[case_rows]), 0, -1).astype(bool)
        for z in pick_slices(labels, k=k):
            picked.append(int(case_rows[z]))
            images.append(np.asarray(cache.images[case_rows[z]], dtype=np.float32))
            truths.append(labels[..., z])
            titles.append(f"{alias(cid) if alias else cid} z={z} (3D Dice {row['dice']:.3f})")
    if images:  # one batch for every panel
        if features is not None:
            probs = predict_cached_slices(
                model, features, cache, np.asarray(picked), batch_size=len(picked), device=device, amp=amp
            )
        else:
            probs = predict_slices(model, np.stack(images), batch_size=len(images), device=device, amp=amp)
        preds = list(probs >= 0.5)
    return overlay_figure(path, images, truths, preds, titles)


def write_outputs(
    out_dir: Path, model, cfg: Config, results: dict[str, Any], cache=None, device="cpu",
    alias: Callable[[str], str] | None = None, features: FeatureCache | None = None,
) -> None:  # fmt: skip
    """``model/`` (safetensors + config.json), ``metrics.json``, ``per_patient.csv`` and ``overlays.png``.

    With ``alias``, every case id in these files (and the overlay titles) is its pseudonym; ``features`` are the
    trial's cached backbone features (frozen mode), which the overlays decode from.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if cache is not None and results["per_patient"]:
        write_overlays(
            model, cache, results["per_patient"], out_dir / "overlays.png", device=device, amp=cfg.train.amp,
            alias=alias, features=features,
        )  # fmt: skip
    results = pseudonymize_results(results, alias)
    ckpt.save_model(model, cfg, out_dir / "model", extra={"val_dice": results["val_dice"]})
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["case_id", "split", *METRICS], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results["per_patient"])
    atomic_write(out_dir / "per_patient.csv", table.getvalue())
    write_json_atomic(out_dir / "metrics.json", {"config": cfg.to_flat(), **results})
