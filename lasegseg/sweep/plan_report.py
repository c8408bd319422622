"""The study's plan as ``--dry-run`` prints it: trials by stage, backbone and mode; with ``--plan-gpus N`` their
GPU-hours and wall time on N cards; the storage they need; what they send to MLflow. The numbers come from
:mod:`lasegseg.sweep.estimate` and :mod:`lasegseg.sweep.timeline`; this module only lays them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lasegseg.config import Config, Mode
from lasegseg.sweep.estimate import (
    CARDS,
    CHECKPOINT_BYTES_PER_PARAM,
    MARKER_BYTES,
    PlanOptions,
    StudyCost,
    TrialCost,
    kinds,
    price_study,
)
from lasegseg.sweep.spec import SweepSpec
from lasegseg.sweep.timeline import Schedule, schedule

STAGES = ("screen", "grid")
MODES = tuple(str(m) for m in Mode)


def print_plan(spec: SweepSpec, trials: Sequence[dict[str, Any]], opts: PlanOptions) -> None:
    """Print the plan of ``trials`` (the seeded grid) and ``spec``'s screen, priced with ``opts``."""
    cost = price_study(spec, trials, opts)
    print_counts(cost.trials, spec)
    timeline = None
    if opts.gpus:
        timeline = schedule(cost.trials, opts.gpus, spec.resources.max_concurrent)
        print_time(cost, opts, timeline)
    else:
        print("GPU time: add --plan-gpus N (and --plan-card, --plan-mfu) for GPU-hours and wall time on N GPUs")
    print_storage(cost, opts, timeline)
    print_tracking(cost.trials)


def _backbone(name: str) -> str:
    return "none (UNet)" if name == "none" else name


def print_counts(trials: Sequence[TrialCost], spec: SweepSpec) -> None:
    """Trials by stage and backbone (rows) and mode (columns)."""
    staged = [t for t in trials if t.stage in STAGES]
    screen = sum(t.stage == "screen" for t in staged)
    cells = len({t.cell for t in staged if t.stage == "screen"})
    parts = [f"screen {screen} ({cells} cells × {spec.screen.trials})"] if screen else []
    print(f"trials: {len(staged)} = " + " + ".join([*parts, f"grid {len(staged) - screen}"]))
    rows = [["stage", "backbone", *MODES, "total"]]
    for stage in STAGES:
        for backbone in dict.fromkeys(t.backbone for t in staged if t.stage == stage):
            mine = [t for t in staged if t.stage == stage and t.backbone == backbone]
            rows.append([stage, _backbone(backbone), *(str(sum(t.mode == m for t in mine)) for m in MODES),
                         str(len(mine))])  # fmt: skip
    _table(rows, right=set(range(2, len(MODES) + 3)))


def print_time(cost: StudyCost, opts: PlanOptions, timeline: Schedule) -> None:
    """GPU-hours per kind of trial, each kind's wall time alone on the cards, and the whole study's."""
    card, ds = CARDS[opts.card], cost.dataset
    print(
        f"GPU time on {opts.gpus} × {card.name} ({card.peak_tflops:g} TFLOP/s dense bf16), FLOPs at MFU {opts.mfu:g}; "
        f"{ds.cases} cases × {ds.slices} slices\n  (train {ds.train} / val {ds.val} / test {ds.test} patients; "
        "--plan-card, --plan-mfu, --plan-cases, --plan-slices)"
    )
    rows = [["stage", "backbone", "mode", "trials", "GPU share", "h per trial", "GPU-h", f"alone on {opts.gpus}",
             "source"]]  # fmt: skip
    for (stage, backbone, mode), group in kinds(cost.trials).items():
        longest = max(t.seconds for t in group) / 3600
        shares = "/".join(f"{s:g}" for s in sorted({t.share for t in group}))
        rows.append([stage, _backbone(backbone), mode, str(len(group)), shares, f"≤ {longest:.3g}",
                     _hours(sum(t.gpu_s for t in group)), _duration(schedule(group, opts.gpus).seconds),
                     "/".join(sorted({t.source for t in group}))])  # fmt: skip
    _table(rows, right={3, 4, 5, 6, 7})
    stages = dict.fromkeys(t.stage for t in cost.trials)
    by_stage = ", ".join(f"{s} {_hours(sum(t.gpu_s for t in cost.trials if t.stage == s))}" for s in stages)
    busy = timeline.busy_gpu_s / (opts.gpus * timeline.seconds) if timeline.seconds else 0.0
    print(f"  total {_hours(sum(t.gpu_s for t in cost.trials))} GPU-h ({by_stage}); the study's wall time "
          f"{_duration(timeline.seconds)} on {opts.gpus} GPUs, {busy:.0%} busy")  # fmt: skip
    for note in NOTES:
        print(f"  {note}")


NOTES = (
    "wall time: screening cells side by side, each cell's grid as soon as its own screen ends, trials packed by GPU "
    "share;",
    "screen trials at their full epochs: an upper bound (ASHA stops some early); per-trial start-up not counted;",
    "decoder-only trials on cached features rarely reach a ViT's MFU: their rows are optimistic.",
)


def print_storage(cost: StudyCost, opts: PlanOptions, timeline: Schedule | None) -> None:
    """Slice and feature caches per node, the training state of running trials, MLflow's artifacts."""
    slices = cost.dataset.cases * cost.dataset.slices
    caches = ", ".join(f"{size} px {_bytes(b)}" for size, b in cost.slice_caches.items())
    print(f"storage:\n  slice cache, on every node: {caches} ({slices} slices, fp16 image + uint8 label)")
    if cost.feature_caches:
        print(f"  feature caches, on every node that runs frozen trials ({slices} slices of fp16 patch tokens):")
        rows = [["backbone", "px", "per level", "levels", "total", "tokens × width"]]
        for fc in cost.feature_caches:
            rows.append([fc.backbone, str(fc.image_size), _bytes(fc.level_bytes), str(fc.levels),
                         _bytes(fc.levels * fc.level_bytes), f"{fc.tokens} × {fc.width}"])  # fmt: skip
        _table(rows, right={1, 2, 3, 4}, indent=4)
    staged = [t for t in cost.trials if t.stage in STAGES]
    print(f"  training state of a running trial ({CHECKPOINT_BYTES_PER_PARAM} B per trained parameter: fp32 weights, "
          "best weights, AdamW's two moments):")  # fmt: skip
    rows = [["backbone", *MODES]]
    for backbone in dict.fromkeys(t.backbone for t in staged):
        sizes = [max((t.state_bytes for t in staged if (t.backbone, t.mode) == (backbone, m)), default=None)
                 for m in MODES]  # fmt: skip
        rows.append([_backbone(backbone), *("–" if n is None else _bytes(n) for n in sizes)])
    _table(rows, right=set(range(1, len(MODES) + 1)), indent=4)
    peak = f"at most {_bytes(timeline.peak_state_bytes)} at once on {opts.gpus} GPUs; " if timeline else ""
    print(f"    {peak}a finished trial keeps a marker only ({len(staged)} × {_bytes(MARKER_BYTES)} = "
          f"{_bytes(len(staged) * MARKER_BYTES)})")  # fmt: skip
    artifacts = sum(t.artifact_bytes for t in staged)
    tuned = sum(t.artifact_bytes for t in staged if t.mode == "finetune" and t.backbone != "none")
    print(
        f"  MLflow artifacts: {_bytes(artifacts)}, {_bytes(tuned)} of it fine-tuned backbones: every trial logs "
        "model.safetensors\n    (fp32 weights of what trained), overlays.png (~0.9 MB), metrics and per-patient tables"
    )


def print_tracking(trials: Sequence[TrialCost]) -> None:
    """Runs, params and metric points MLflow receives."""
    staged = [t for t in trials if t.stage in STAGES]
    points = sum(t.metric_points for t in staged)
    per = sorted({t.metric_points for t in staged})
    print(f"MLflow: {len(staged) + 1} runs (one parent), {len(Config().to_flat())} params each, {points:,} metric "
          f"points ({per[0]}–{per[-1]} per trial)")  # fmt: skip


def _table(rows: list[list[str]], right: set[int], indent: int = 2) -> None:
    """Aligned columns: the ones in ``right`` right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        print(" " * indent + "  ".join(cells).rstrip())


def _hours(gpu_s: float) -> str:
    return f"{gpu_s / 3600:.3g}"


def _duration(seconds: float) -> str:
    """``40 s``, ``42 min``, ``7.5 h``, ``3.2 d``."""
    hours = seconds / 3600
    if seconds < 60:
        return f"{seconds:.0f} s"
    if hours < 1:
        return f"{seconds / 60:.0f} min"
    return f"{hours:.3g} h" if hours < 48 else f"{hours / 24:.3g} d"


def _bytes(n: float) -> str:
    """Decimal units: ``6.9 GB``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"
