"""What a study will cost before it starts: each trial's GPU time, its training state and artifacts, its MLflow
points, and how the trials fill N GPUs (``--dry-run --plan-gpus N``). Pure arithmetic: no torch, no ray, no mlflow.

A trial's GPU time is the sum over its phases (training steps, per-epoch validation with ``train.val_budget``, the
final validation, the test pass) of images / throughput. The throughput of a phase is a measured row of
:data:`MEASURED` for that card, backbone, mode, decoder and image size when there is one (``bench/gpu.py`` measures
them), else FLOPs (:mod:`lasegseg.sweep.costs`) / (the card's dense bf16 peak × the MFU). FLOPs per image:

- training step: forward + backward = 3× forward for what trains (2× for the patch embedding, whose input needs no
  gradient); a LoRA backbone costs 2× forward (its activations need gradients, its frozen weights none); a frozen
  backbone 1× forward, or nothing when the trial reads cached features (:func:`uses_feature_cache`), which a
  separate pass over every slice computes once per backbone (stage ``features``).
- inference: 1× forward (the decoder only on cached features).

Gradient checkpointing's recomputation is not counted, as MFU does not count it. The screen's trials are counted at
their full ``screen.set`` epochs: an upper bound, since ASHA stops some early.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lasegseg import metric_table
from lasegseg.data.splits import split_patients
from lasegseg.errors import ConfigError
from lasegseg.sweep import costs
from lasegseg.sweep.spec import SweepSpec, cell_key
from lasegseg.train.feature_plan import feature_slot, uses_feature_cache


@dataclass(frozen=True)
class Card:
    """A GPU model: its name for people and its dense (no sparsity) bf16 tensor-core peak, as bench/gpu_shapes.py."""

    name: str
    peak_tflops: float


CARDS: dict[str, Card] = {
    "h100": Card("H100 SXM", 989.0),
    "h100-pcie": Card("H100 PCIe", 756.0),
    "h200": Card("H200 SXM", 989.0),
    "h200-nvl": Card("H200 NVL", 835.0),
    "a100": Card("A100", 312.0),
    "l40s": Card("L40S", 362.0),
    "a10g": Card("A10G", 125.0),
    "rtx4090": Card("RTX 4090", 165.0),
}
DEFAULT_CARD = "h100"
DEFAULT_MFU = 0.35  # a ViT's fine-tuning step in bf16 reaches 30-45 % of peak on these cards; small convs less
# The study's dataset (DESIGN.md): LAScarQS 2022 / LASC 2018 size, 88 axial slices per LGE-MRI volume.
DEFAULT_CASES = 130
DEFAULT_SLICES = 88

CHECKPOINT_BYTES_PER_PARAM = 16  # fp32 weights, best weights, AdamW's two moments (measured, bench/RESULTS.md)
WEIGHT_BYTES = 4  # model.safetensors holds fp32 weights of what trained (the whole model when fine-tuned)
FEATURE_BYTES = 2  # feature caches: fp16 patch tokens (train/features.py)
SLICE_BYTES_PER_PIXEL = 3  # slice cache: fp16 image + uint8 label (data/cache_format.py)
OVERLAY_BYTES = 900_000  # overlays.png: six 448-px panels of phantom slices wrote 870 KB
SMALL_FILES_BYTES = 50_000  # metrics.json (config, history, per-patient rows), per_patient.csv, model/config.json
MARKER_BYTES = 8_000  # a finished trial's last Tune checkpoint: its MLflow run id only
OVERLAY_SLICES = 6
FINAL_COUNTS = ("best_epoch", "n_train_slices", "n_train_patients")  # tracking.tracker.final_metrics, beside the table


@dataclass(frozen=True)
class Measured:
    """A measured throughput row: ``img_s`` images per second of one ``phase`` (``train``: optimizer steps,
    ``infer``: forward passes, ``features``: the frozen backbone's pass) of a trial kind on one card."""

    card: str
    backbone: str
    mode: str
    decoder: str
    image_size: int
    phase: str
    img_s: float
    source: str


# bench/gpu.py's rows, copied here with where they come from once a run on the card is in bench/RESULTS.md. None yet:
# no GPU run has been recorded there, so every row of a plan is priced from its FLOPs.
MEASURED: tuple[Measured, ...] = ()


@dataclass(frozen=True)
class PlanOptions:
    """The ``--plan-*`` flags, checked."""

    gpus: int | None = None
    card: str = DEFAULT_CARD
    mfu: float = DEFAULT_MFU
    cases: int = DEFAULT_CASES
    slices: int = DEFAULT_SLICES
    list_all: bool = False

    @property
    def flops_per_s(self) -> float:
        return CARDS[self.card].peak_tflops * 1e12 * self.mfu


def plan_options(args: argparse.Namespace) -> PlanOptions:
    """The plan's flags with their defaults; a bad one is a ConfigError naming the flag (and the known cards)."""
    gpus, card = getattr(args, "plan_gpus", None), getattr(args, "plan_card", None) or DEFAULT_CARD
    mfu = getattr(args, "plan_mfu", None)
    cases, slices = getattr(args, "plan_cases", None), getattr(args, "plan_slices", None)
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--plan-gpus must be >= 1, got {gpus}")
    if card.lower() not in CARDS:
        raise ConfigError(f"--plan-card: unknown card '{card}' (known: {', '.join(CARDS)})")
    mfu = DEFAULT_MFU if mfu is None else mfu
    if not 0 < mfu <= 1:
        raise ConfigError(f"--plan-mfu must be in (0, 1], got {mfu}")
    cases = DEFAULT_CASES if cases is None else cases
    if cases < 3:
        raise ConfigError(f"--plan-cases must be >= 3 (a train/val/test split), got {cases}")
    slices = DEFAULT_SLICES if slices is None else slices
    if slices < 1:
        raise ConfigError(f"--plan-slices must be >= 1, got {slices}")
    return PlanOptions(gpus, card.lower(), mfu, cases, slices, bool(getattr(args, "list", False)))


@dataclass(frozen=True)
class Dataset:
    """The reference dataset's size: cases, slices per case, and the patients of one split."""

    cases: int
    slices: int
    train: int
    val: int
    test: int


def dataset(cases: int, slices: int, val_fraction: float, test_fraction: float) -> Dataset:
    """The split sizes of ``cases`` patients, by the function that splits the real ones."""
    split = split_patients([f"c{i:05d}" for i in range(cases)], 0, val_fraction, test_fraction)
    return Dataset(cases, slices, len(split.train), len(split.val), len(split.test))


def train_slices(flat: Mapping[str, Any], ds: Dataset) -> int:
    """Training slices of a trial: ``data.patients`` of the pool (0: all), then ``data.fraction`` of their slices."""
    patients = flat["data.patients"] or ds.train
    return max(1, math.ceil(flat["data.fraction"] * patients * ds.slices))


def validation_slices(budget: float, val_slices: int, train: int, per_volume: int) -> int:
    """Slices one per-epoch validation reads: every k-th slice of each volume within ``train.val_budget``, as
    ``train.evaluation.validation_stride`` and ``strided_slices`` choose them."""
    allowed = budget * train
    stride = 1 if budget <= 0 or val_slices <= allowed else max(1, math.ceil(val_slices / max(allowed, 1.0)))
    if stride == 1:
        return val_slices
    start = (stride - 1) // 2 if stride <= per_volume else per_volume // 2
    return len(range(start, per_volume, stride)) * (val_slices // per_volume)


@dataclass(frozen=True)
class Work:
    """Images of each phase of one trial."""

    train: int
    infer: int


def trial_work(flat: Mapping[str, Any], ds: Dataset) -> Work:
    """Training images (epochs × slices) and inference images (each validation, the final full validation when the
    epochs read fewer slices, the test patients, the overlay panels) of one trial."""
    train, epochs, every = train_slices(flat, ds), flat["train.epochs"], flat["train.eval_every"]
    val = ds.val * ds.slices
    per_epoch = validation_slices(flat["train.val_budget"], val, train, ds.slices)
    evaluations = epochs // every + (1 if epochs % every else 0)
    final = (val if per_epoch < val else 0) + ds.test * ds.slices + OVERLAY_SLICES
    return Work(epochs * train, evaluations * per_epoch + final)


@dataclass(frozen=True)
class ImageFlops:
    """FLOPs per image of a trial's training step and forward pass, and the trained parameters."""

    train: float
    infer: float
    trained: int
    weights: int


def image_flops(flat: Mapping[str, Any]) -> ImageFlops | None:
    """FLOPs and parameters of the trial's model; None for a backbone or decoder :mod:`costs` does not price."""
    backbone, decoder, size = flat["model.backbone"], flat["model.decoder"], flat["data.image_size"]
    if not costs.known(backbone, decoder):
        return None
    shape, width = costs.vit_shape(backbone), flat["model.decoder_width"]
    dec, dec_params = (
        costs.decoder_flops(decoder, shape, size, width),
        costs.decoder_params(decoder, shape, size, width),
    )
    if shape is None:  # the UNet baseline: it all trains
        return ImageFlops(3 * dec, dec, dec_params, dec_params)
    registers = bool(flat.get("model.registers", False))
    embed, blocks = costs.vit_embed_flops(shape, size), costs.vit_block_flops(shape, size, registers)
    vit_params = costs.vit_params(shape, registers)
    mode = str(flat["model.mode"])
    if mode == "finetune":
        return ImageFlops(2 * embed + 3 * blocks + 3 * dec, embed + blocks + dec, vit_params + dec_params,
                          vit_params + dec_params)  # fmt: skip
    if mode == "lora":
        lora = costs.lora_params(shape, flat["model.lora_rank"])
        return ImageFlops(embed + 2 * blocks + 3 * dec, embed + blocks + dec, lora + dec_params, lora + dec_params)
    if uses_feature_cache(flat):
        return ImageFlops(3 * dec, dec, dec_params, dec_params)
    return ImageFlops(embed + blocks + 3 * dec, embed + blocks + dec, dec_params, dec_params)


def feature_pass_flops(flat: Mapping[str, Any], ds: Dataset) -> float:
    """FLOPs of the frozen backbone's one pass over every slice of the dataset (the feature cache's build)."""
    shape, size = costs.vit_shape(flat["model.backbone"]), flat["data.image_size"]
    if shape is None:
        return math.nan
    per_image = costs.vit_embed_flops(shape, size) + costs.vit_block_flops(shape, size, flat["model.registers"])
    return ds.cases * ds.slices * per_image


@dataclass(frozen=True)
class TrialCost:
    """One trial (or one feature pass) as the plan prices it.

    Args:
        stage: ``screen``, ``grid`` or ``features``.
        backbone, mode, decoder: what it trains.
        cell: its screening cell (:func:`lasegseg.sweep.spec.cell_key`); grid trials wait for their cell's screen.
        share: the GPU share it asks for.
        gpu_s: seconds of a whole card it needs (NaN when unpriced); it runs ``gpu_s / share`` seconds at its share.
        source: ``measured``, ``FLOPs`` or ``measured+FLOPs``; ``unpriced`` for an architecture without a shape.
        state_bytes: its resumable training state while it runs.
        artifact_bytes: what it leaves in MLflow's artifact store.
        metric_points: MLflow metric values it logs.
    """

    stage: str
    backbone: str
    mode: str
    decoder: str
    cell: tuple
    share: float
    gpu_s: float
    source: str
    state_bytes: int = 0
    artifact_bytes: int = 0
    metric_points: int = 0

    @property
    def seconds(self) -> float:
        return self.gpu_s / self.share


def _measured(rows: Iterable[Measured], card: str, flat: Mapping[str, Any], phase: str) -> Measured | None:
    key = (card, flat["model.backbone"], str(flat["model.mode"]), flat["model.decoder"], flat["data.image_size"])
    return next((r for r in rows if (r.card, r.backbone, r.mode, r.decoder, r.image_size) == key and r.phase == phase),
                None)  # fmt: skip


def _seconds(phases: Sequence[tuple[str, int, float]], flat, opts: PlanOptions, rows) -> tuple[float, str]:
    """GPU seconds of (phase, images, FLOPs per image) and where the throughput came from."""
    total, sources = 0.0, set()
    for phase, images, flops in phases:
        row = _measured(rows, opts.card, flat, phase)
        total += images / row.img_s if row else images * flops / opts.flops_per_s
        sources.add("measured" if row else "FLOPs")
    return total, "+".join(sorted(sources, reverse=True))


def metric_points(flat: Mapping[str, Any]) -> int:
    """MLflow metric values one trial logs: the per-epoch series (validation ones on validated epochs only) and its
    final values."""
    epochs, every = flat["train.epochs"], flat["train.eval_every"]
    evaluations = epochs // every + (1 if epochs % every else 0)
    validated = len(metric_table.validation())
    per_epoch = (len(metric_table.epoch_metrics()) - validated) * epochs + validated * evaluations
    final = len(FINAL_COUNTS) + len(metric_table.trial_metrics()) + len(metric_table.selection_metrics())
    return per_epoch + final


def price_trial(flat: Mapping[str, Any], stage: str, share: float, ds: Dataset, opts: PlanOptions,
                measured: Sequence[Measured] = MEASURED) -> TrialCost:  # fmt: skip
    """One trial's GPU time, training state, artifacts and MLflow points."""
    fl, work = image_flops(flat), trial_work(flat, ds)
    names = (flat["model.backbone"], str(flat["model.mode"]), flat["model.decoder"], cell_key(flat))
    points = metric_points(flat)
    if fl is None:
        return TrialCost(stage, *names, share, math.nan, "unpriced", 0, OVERLAY_BYTES + SMALL_FILES_BYTES, points)
    gpu_s, source = _seconds([("train", work.train, fl.train), ("infer", work.infer, fl.infer)], flat, opts, measured)
    artifacts = fl.weights * WEIGHT_BYTES + OVERLAY_BYTES + SMALL_FILES_BYTES
    return TrialCost(stage, *names, share, gpu_s, source, fl.trained * CHECKPOINT_BYTES_PER_PARAM, artifacts, points)


def price_feature_pass(flat: Mapping[str, Any], share: float, ds: Dataset, opts: PlanOptions,
                       measured: Sequence[Measured] = MEASURED) -> TrialCost:  # fmt: skip
    """The frozen backbone's one pass over every slice (once per node, before the trials that read it)."""
    images, flops = ds.cases * ds.slices, feature_pass_flops(flat, ds) / (ds.cases * ds.slices)
    gpu_s, source = _seconds([("features", images, flops)], flat, opts, measured)
    if math.isnan(flops):
        source = "unpriced"
    return TrialCost("features", flat["model.backbone"], "frozen", "-", cell_key(flat), share, gpu_s, source)


@dataclass(frozen=True)
class StudyCost:
    """Every trial of a study priced, in the order they would be queued, and the dataset they were priced on."""

    trials: list[TrialCost]
    dataset: Dataset
    feature_caches: list[FeatureCache]
    slice_caches: dict[int, int]  # image size → bytes of one node's slice cache


def price_study(spec: SweepSpec, trials: Sequence[dict[str, Any]], opts: PlanOptions,
                measured: Sequence[Measured] = MEASURED) -> StudyCost:  # fmt: skip
    """Price the feature passes, the screen (``spec.screen.trials`` per screening cell) and the seeded grid."""
    datasets: dict[tuple[float, float], Dataset] = {}

    def data(flat: Mapping[str, Any]) -> Dataset:
        key = (flat["data.val_fraction"], flat["data.test_fraction"])
        if key not in datasets:
            datasets[key] = dataset(opts.cases, opts.slices, *key)
        return datasets[key]

    def share(flat: Mapping[str, Any]) -> float:
        return spec.resources.for_trial(flat)["gpu"] or 1.0  # a CPU sweep planned on GPUs: one card per trial

    screening = spec.screening_cells()
    everything = [*screening, *trials]
    passes: dict[str, TrialCost] = {}
    for flat in everything:
        if uses_feature_cache(flat) and feature_slot(flat) not in passes:
            passes[feature_slot(flat)] = price_feature_pass(flat, share(flat), data(flat), opts, measured)
    priced: dict[tuple, TrialCost] = {}

    def price(flat: Mapping[str, Any], stage: str) -> TrialCost:
        key = (stage, *sorted((k, v) for k, v in flat.items() if k != "seed"))  # seeds cost alike
        if key not in priced:
            priced[key] = price_trial(flat, stage, share(flat), data(flat), opts, measured)
        return priced[key]

    out = list(passes.values())
    for flat in screening:
        out += [price(flat, "screen")] * spec.screen.trials
    out += [price(flat, "grid") for flat in trials]
    slices = opts.cases * opts.slices
    caches = {s: slices * s * s * SLICE_BYTES_PER_PIXEL for s in sorted({f["data.image_size"] for f in everything})}
    return StudyCost(out, data(trials[0]), feature_caches(everything, slices), caches)


@dataclass(frozen=True)
class FeatureCache:
    """One frozen backbone's feature cache: ``levels`` maps of ``slices × tokens × width`` fp16 values each."""

    backbone: str
    image_size: int
    levels: int
    slices: int
    tokens: int
    width: int

    @property
    def level_bytes(self) -> int:
        return self.slices * self.tokens * self.width * FEATURE_BYTES


def feature_caches(trials: Iterable[Mapping[str, Any]], slices: int) -> list[FeatureCache]:
    """The feature caches a sweep builds: one per slot, holding the union of the levels its decoders read."""
    out: dict[str, FeatureCache] = {}
    for flat in trials:
        shape = costs.vit_shape(flat["model.backbone"])
        if not uses_feature_cache(flat) or shape is None:
            continue
        slot, size = feature_slot(flat), flat["data.image_size"]
        levels = 1 if costs.DECODER_LEVELS.get(flat["model.decoder"]) == "last" else costs.TAPS
        if slot in out:
            levels = max(levels, out[slot].levels)
        out[slot] = FeatureCache(flat["model.backbone"], size, levels, slices, costs.grid(shape, size) ** 2,
                                 shape.width)  # fmt: skip
    return list(out.values())


def kinds(trials: Iterable[TrialCost]) -> dict[tuple[str, str, str], list[TrialCost]]:
    """Trials grouped by (stage, backbone, mode), in order of first appearance."""
    out: dict[tuple[str, str, str], list[TrialCost]] = {}
    for t in trials:
        out.setdefault((t.stage, t.backbone, t.mode), []).append(t)
    return out
