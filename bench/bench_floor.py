"""7. floor — the frozen grid's wall time through sweeps/fewshot.py at concurrency 1 against its floor (goal ≤ 1.15×),
and its speed-up over bench/naive.py beside the bound that the floor implies.

The floor is the compute the grid cannot avoid, timed in this process with one thread (``torch.set_num_threads(1)``):

- one backbone pass over every slice of the slice cache the trials use, as the sweep builds its feature cache
  (eval mode, ``torch.inference_mode``, batches of ``max(32, train.batch_size)``, only the levels the grid's decoders
  read), keeping the features in memory as float32 channels-last maps;
- every trial's decoder training steps (forward, loss, backward, AdamW step on in-memory features of its training
  rows: ``ceil(train slices / batch size)`` steps per epoch, the last one of each epoch the smaller remainder);
- every trial's evaluation passes (decoder forward over the validation patients' slices after each epoch that
  ``train.eval_every`` validates, every k-th slice within ``train.val_budget``; over all of them once more for the
  chosen epoch when k > 1; over the test patients' slices once), in the per-case batches of ``train.batch_size``
  that the trials predict in.

The models, optimizer groups and loss are lasegseg's own (``build_segmenter``, ``param_groups``, ``build_loss``);
nothing else is counted (no reads from disk, tracking, resampling to native resolution, metrics or checkpoints).
Steps and passes are not all run: for each distinct (decoder, batch size) one step and one pass are timed, each the
minimum over ``REPEATS`` runs after ``WARMUP`` untimed ones, and multiplied by how many the grid's trials take. The
backbone pass is the minimum over ``REPEATS`` full passes after one untimed batch.

Rows: the sweep's wall time over the floor, and naive wall / sweep wall with naive wall / floor (the most any grid
runner could reach against that naive time) beside it; likewise for the sums of per-trial times when MLflow has them.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.bench_naive_grid import _per_trial_seconds
from bench.harness import Bench

REPEATS = 3
WARMUP = 2


@dataclass
class Floor:
    """The floor of a grid and its parts, in seconds.

    Args:
        backbone_s: one backbone pass over every slice.
        steps_s: every training step of every trial.
        evals_s: every evaluation batch of every trial.
        slices: slices in the backbone pass.
        steps: training steps counted.
        evals: evaluation batches counted.
        per_batch: seconds of one batch by (decoder, ``train`` or ``eval``, batch size).
    """

    backbone_s: float
    steps_s: float = 0.0
    evals_s: float = 0.0
    slices: int = 0
    steps: int = 0
    evals: int = 0
    per_batch: dict[tuple[str, str, int], float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Backbone pass + training steps + evaluation passes."""
        return self.backbone_s + self.steps_s + self.evals_s

    @property
    def trials_s(self) -> float:
        """What the trials themselves cannot avoid (the floor without the one-off backbone pass)."""
        return self.steps_s + self.evals_s

    def describe(self) -> str:
        """The parts as one line for a row's detail."""
        return (f"floor {self.total:.2f}s = backbone pass {self.backbone_s:.2f}s ({self.slices} slices) + "
                f"decoder steps {self.steps_s:.2f}s ({self.steps}) + eval passes {self.evals_s:.2f}s "
                f"({self.evals} batches)")  # fmt: skip


def measure(b: Bench) -> None:
    """The frozen grid at concurrency 1 against its floor, and its speed-up over naive against the floor's bound."""
    run = b.sweep("frozen", 1)
    naive = b.naive("frozen")
    floor = grid_floor(b, run.cache_dir)
    sweep_s, naive_s = run.seconds, naive["wall_s"]
    b.report.add("floor", "frozen grid wall / floor, conc 1", sweep_s / floor.total, goal="≤ 1.15",
                 detail=f"sweep {sweep_s:.1f}s, {floor.describe()}")  # fmt: skip
    detail = f"bound from the floor: {naive_s / floor.total:.2f}×; naive {naive_s:.1f}s, sweep {sweep_s:.1f}s"
    per_trial = _per_trial_seconds(run.sweep_dir)
    if len(per_trial) == b.grids["frozen"].size:
        ours, theirs = sum(per_trial.values()), sum(t["seconds"] for t in naive["trials"])
        detail += (f"; per-trial sum {theirs / ours:.2f}× (bound {theirs / floor.trials_s:.2f}×, "
                   f"naive {theirs:.1f}s, lasegseg {ours:.1f}s)")  # fmt: skip
    b.report.add("floor", "frozen grid speed-up vs naive, conc 1", naive_s / sweep_s, detail=detail)


def grid_floor(b: Bench, cache_dir: Path) -> Floor:
    """Time the frozen grid's floor in this process (see the module docstring).

    Args:
        b: the bench (its frozen grid and phantom).
        cache_dir: the cache folder of the sweep whose slice cache the trials read (reused, not rebuilt).
    """
    import torch

    from lasegseg.config import from_flat
    from lasegseg.data.cache import open_cache
    from lasegseg.sweep.spec import load_spec

    torch.set_num_threads(1)
    g = b.grids["frozen"]
    spec = b.tmp / "floor.yaml"
    spec.write_text(g.yaml())
    overrides = {"data.path": str(b.phantom), "data.cache_dir": str(cache_dir)}
    configs = [from_flat(flat) for flat in load_spec(spec, overrides=overrides).trials()]
    cache = open_cache(configs[0])
    backbone_s, feats = backbone_pass(configs[0], cache, sorted({c.model.decoder for c in configs}))
    floor = Floor(backbone_s, slices=len(cache))
    counts = batch_counts(configs, cache)
    for decoder in sorted({d for d, _, _ in counts}):
        cfg = next(c for c in configs if c.model.decoder == decoder)
        sizes = {(kind, size) for d, kind, size in counts if d == decoder}
        floor.per_batch.update(time_decoder(cfg, cache, feats, sizes))
    for key, n in counts.items():
        seconds = n * floor.per_batch[key]
        if key[1] == "train":
            floor.steps_s, floor.steps = floor.steps_s + seconds, floor.steps + n
        else:
            floor.evals_s, floor.evals = floor.evals_s + seconds, floor.evals + n
    return floor


def backbone_pass(cfg: Any, cache: Any, decoders: Sequence[str]) -> tuple[float, dict[int, Any]]:
    """One backbone pass over every slice, as the sweep's feature-cache build runs it; its time and its features.

    Args:
        cfg: a trial config of the grid (backbone, registers, amp, batch size).
        cache: the slice cache.
        decoders: the grid's decoders (the pass computes the union of the levels they read).

    Returns:
        The minimum over ``REPEATS`` passes in seconds, and ``{level: float32 (N, h, w, C) tensor}`` of the
        features rounded to fp16 as the feature cache stores them.
    """
    import numpy as np
    import torch

    from lasegseg.models.segmenter import load_backbone
    from lasegseg.train.feature_build import levels_read
    from lasegseg.train.inference import autocast_context

    device = torch.device("cpu")
    backbone = load_backbone(cfg.model.backbone, registers=cfg.model.registers).requires_grad_(False).eval()
    levels = list(levels_read(decoders, backbone.num_features_levels))
    batch = max(32, cfg.train.batch_size)
    images = torch.from_numpy(np.array(cache.images[:]))[:, None].float()
    out: dict[int, Any] = {}

    def run_pass(stop: int) -> None:
        kept: list[list[Any]] = [[] for _ in levels]
        with torch.inference_mode():
            for start in range(0, stop, batch):
                with autocast_context(device, cfg.train.amp):
                    maps = backbone(images[start : start + batch], levels)
                for level_maps, f in zip(kept, maps, strict=True):
                    level_maps.append(f.permute(0, 2, 3, 1).to(torch.float16).float())
        out.update({level: torch.cat(level_maps) for level, level_maps in zip(levels, kept, strict=True)})

    run_pass(min(batch, len(images)))
    backbone_s = min_seconds(lambda: run_pass(len(images)), REPEATS)
    return backbone_s, out


def batch_counts(configs: Sequence[Any], cache: Any) -> Counter[tuple[str, str, int]]:
    """How many batches of each (decoder, ``train`` or ``eval``, batch size) the trials take.

    Args:
        configs: the grid's trial configs.
        cache: the slice cache.
    """
    from lasegseg.train.evaluation import strided_slices, validation_stride
    from lasegseg.train.trial_data import prepare_data

    counts: Counter[tuple[str, str, int]] = Counter()
    for cfg in configs:
        data, t, bs = prepare_data(cfg, cache=cache), cfg.train, cfg.train.batch_size
        for size in _batches(len(data.train_rows), bs):
            counts[(cfg.model.decoder, "train", size)] += t.epochs
        validations = sum(1 for e in range(t.epochs) if (e + 1) % t.eval_every == 0 or e + 1 == t.epochs)
        stride = validation_stride(t.val_budget, len(cache.rows_for(list(data.split.val))), len(data.train_rows))
        passes = [(data.split.val, validations, stride), (data.split.test, 1, 1)]
        if stride > 1:
            passes.append((data.split.val, 1, 1))  # the chosen epoch, on every slice
        for cases, times, k in passes:
            for case in cases:
                for size in _batches(len(strided_slices(len(cache.rows_for([case])), k)), bs):
                    counts[(cfg.model.decoder, "eval", size)] += times
    return counts


def _batches(n: int, batch_size: int) -> list[int]:
    """Sizes of the batches of ``n`` rows: full ones, then the remainder."""
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def time_decoder(
    cfg: Any, cache: Any, feats: dict[int, Any], sizes: set[tuple[str, int]]
) -> dict[tuple[str, str, int], float]:
    """Seconds of one training step and one evaluation batch of ``cfg``'s decoder at each batch size asked for.

    Args:
        cfg: a trial config with this decoder (its learning rate, weight decay and loss).
        cache: the slice cache (images and labels of the batch).
        feats: the backbone pass's features by level.
        sizes: ``(train | eval, batch size)`` pairs.

    Returns:
        ``{(decoder, kind, batch size): seconds}``, each the minimum over ``REPEATS`` after ``WARMUP`` runs.
    """
    import numpy as np
    import torch

    from lasegseg.models.segmenter import build_segmenter, param_groups
    from lasegseg.train.losses import build_loss

    torch.manual_seed(cfg.seed)
    model = build_segmenter(cfg.model)
    groups = param_groups(model, cfg.optim.lr, cfg.model.backbone_lr_mult, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loss_fn = build_loss(cfg.train.loss)
    out = {}
    for kind, size in sorted(sizes):
        idx = np.arange(size)
        maps = [feats[level][idx].permute(0, 3, 1, 2) for level in model.levels]
        x = torch.from_numpy(np.asarray(cache.images[idx]))[:, None].float()
        y = torch.from_numpy(np.asarray(cache.labels[idx]))[:, None].long()
        model.train(kind == "train")
        if kind == "train":
            run = partial(train_step, model, optimizer, loss_fn, cfg.train.amp, maps, x, y)
        else:
            run = partial(eval_batch, model, cfg.train.amp, maps, x)
        for _ in range(WARMUP):
            run()
        out[(cfg.model.decoder, kind, size)] = min_seconds(run, REPEATS)
    return out


def train_step(model: Any, optimizer: Any, loss_fn: Any, amp: str, maps: list[Any], x: Any, y: Any) -> None:
    """One training step of the decoder on cached features, as a trial takes it: forward, loss, backward, AdamW.

    Args:
        model: the segmenter (its decoder trains).
        optimizer: AdamW over its parameter groups.
        loss_fn: the trial's loss.
        amp: ``train.amp``.
        maps: the features of the levels the decoder reads, ``(B, C, h, w)`` channels-last.
        x: the ``(B, 1, H, W)`` images.
        y: the ``(B, 1, H, W)`` class indices.
    """
    import torch

    from lasegseg.train.inference import autocast_context

    with autocast_context(torch.device("cpu"), amp):
        loss = loss_fn(model.decode(maps, x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def eval_batch(model: Any, amp: str, maps: list[Any], x: Any) -> None:
    """One evaluation batch: the decoder's forward on cached features, without autograd.

    Args:
        model: the segmenter, in eval mode.
        amp: ``train.amp``.
        maps: the features of the levels the decoder reads, ``(B, C, h, w)`` channels-last.
        x: the ``(B, 1, H, W)`` images.
    """
    import torch

    from lasegseg.train.inference import autocast_context

    with torch.inference_mode(), autocast_context(torch.device("cpu"), amp):
        model.decode(maps, x)


def min_seconds(fn: Callable[[], None], repeats: int) -> float:
    """The least wall time of ``repeats`` calls of ``fn``."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
