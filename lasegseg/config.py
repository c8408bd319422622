"""One trial config with one flat dotted view.

The same flat dict (``model.decoder=multiscale``, ``optim.lr=3e-4``, ``seed=2`` …) is what a sweep searches,
what MLflow logs as params, what a checkpoint's ``config.json`` stores and what an export reloads. Unknown keys
and wrong types are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from lasegseg.errors import ConfigError

# Patch size and display name of each backbone family of lasegseg.models.backbones (by the prefix of its named sizes)
# and the family of each tiny model, declared here so that data.image_size is checked without importing torch; the
# family registry refuses a family these do not declare.
BACKBONE_PATCH_SIZES = {"dinov2": (14, "DINOv2"), "dinov3": (16, "DINOv3")}
TINY_BACKBONES = {"tiny": "dinov2", "tiny-dinov3": "dinov3"}


class Mode(str, Enum):
    """How a trial trains its backbone (``model.mode``); equal to its string, which is what the flat view holds."""

    def __str__(self) -> str:
        return self.value

    FROZEN = "frozen"
    FINETUNE = "finetune"
    LORA = "lora"


MODES = tuple(m.value for m in Mode)
LAYOUTS = ("auto", "msd", "lasc2018", "lascarqs", "generic")
AMP_CHOICES = ("auto", "bf16", "off")
# Names of the augmentation and loss registries (lasegseg.train.augment, lasegseg.train.losses), declared here so
# the config checks them without importing torch; each registry fails at import when it disagrees with its list.
AUGMENT_CHOICES = ("none", "flip", "spatial")
LOSS_CHOICES = ("dicece", "dicefocal")


@dataclass
class DataConfig:
    """Dataset, preprocessing, splits and few-shot subset.

    Args:
        path: dataset folder (any supported layout).
        layout: ``auto`` or one of the layouts in :mod:`lasegseg.data.layouts`.
        image_size: square slice size fed to the model; a multiple of the backbone's patch size (14 for DINOv2,
            16 for DINOv3; 448 suits both).
        clip_low, clip_high: intensity percentiles mapped to 0 and 1.
        split_seed: seeds the patient-level train/val/test split; the test set depends on nothing else.
        val_fraction, test_fraction: share of patients held out for validation and test.
        patients: few-shot subset by training patient count (0 = all).
        fraction: few-shot subset by share of training slices, in (0, 1].
        cache_dir: where the Arrow slice cache lives ("" = ``$LASEGSEG_CACHE`` or ``~/.cache/lasegseg``).
    """

    path: str = ""
    layout: str = "auto"
    image_size: int = 448
    clip_low: float = 0.5
    clip_high: float = 99.5
    split_seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    patients: int = 0
    fraction: float = 1.0
    cache_dir: str = ""


@dataclass
class ModelConfig:
    """Backbone, decoder and training mode.

    Args:
        backbone: ``tiny``, ``dinov2-small|base|large|giant``, ``tiny-dinov3``,
            ``dinov3-small|small-plus|base|large|huge-plus|7b``, a hub id, a local directory, or ``none`` (the MONAI
            UNet baseline, decoder ``unet``).
        registers: use the with-registers DINOv2 variant for the named sizes (DINOv3 models always have their
            register tokens and refuse true).
        decoder: a name from the decoder registry.
        mode: ``frozen`` (no backbone gradients), ``finetune`` (end to end) or ``lora``.
        backbone_lr_mult: backbone learning rate = ``optim.lr * backbone_lr_mult`` in finetune mode.
        lora_rank, lora_alpha, lora_dropout: peft LoRA settings for ``mode=lora``.
        decoder_width: channel width of the decoder.
    """

    backbone: str = "tiny"
    registers: bool = False
    decoder: str = "multiscale"
    mode: str = "finetune"
    backbone_lr_mult: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    decoder_width: int = 64


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay (per step)."""

    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01


@dataclass
class TrainConfig:
    """Epochs, batch size, augmentation and numerics of one trial.

    Args:
        epochs: passes over the few-shot training slices.
        batch_size: slices per optimizer step (and per inference batch).
        amp: ``auto`` (bf16 autocast on GPU only), ``bf16`` or ``off``.
        eval_every: validate every this many epochs (and after the last).
        val_budget: validation slices an epoch's validation may read per training slice (0: every slice). Each
            validation volume is then read at every k-th slice (the smallest k within the budget), so the per-epoch
            Dice/IoU that picks the best epoch stays 3D and per patient; the epoch picked is validated again on
            every slice, and that is the trial's ``val_dice``/``val_iou``. Few-shot trials train on a handful of
            patients but validate on all of the validation split, which would otherwise cost more than training.
            A forward pass costs about 0.3 of a training step per slice, so 0.2 keeps validation near 6 % of an
            epoch, 10 % with resampling, metrics and the final pass over every slice.
        augment: ``none``, ``flip`` (random horizontal/vertical flips) or ``spatial`` (flips plus small rotations
            and scales), applied to each batch in torch, seeded from the trial seed.
        loss: ``dicece`` (soft Dice + cross-entropy) or ``dicefocal`` (soft Dice + focal loss, gamma 2).
        feature_cache: in frozen mode without spatial augmentation, compute the backbone features of every slice
            once (fp16, memory-mapped on disk) and train/evaluate the decoder on them.
        compile: ``torch.compile`` the decoder (frozen) or the whole model (finetune/lora).
        checkpoint_every: save the resumable training state every this many epochs (0: no epoch rule).
        checkpoint_interval_s: save it once this many seconds have passed since the last save (0: no time rule).
            With both 0 (the default) the state is saved once the time since the last save reaches 19× what that
            save cost (writing it and handing it over), so checkpoints take at most ~5 % of the training time
            whatever the model's size: every epoch or two for a small decoder, every few minutes for ViT-g.
            A resumed trial repeats the epochs since its last save; their metrics are not logged twice.
    """

    epochs: int = 40
    batch_size: int = 16
    amp: str = "auto"
    eval_every: int = 1
    val_budget: float = 0.2
    augment: str = "none"
    loss: str = "dicece"
    feature_cache: bool = True
    compile: bool = False
    checkpoint_every: int = 0
    checkpoint_interval_s: float = 0.0


@dataclass
class EvalConfig:
    """Test-time evaluation (validation keeps Dice and IoU only).

    Args:
        nsd_tolerance_mm: boundary tolerance of the normalised surface Dice, in mm (voxel spacing applied).
    """

    nsd_tolerance_mm: float = 2.0


@dataclass
class Config:
    """A whole trial."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0

    def to_flat(self) -> dict[str, Any]:
        """The flat dotted view: ``{"data.image_size": 448, …, "seed": 0}``."""
        return to_flat(self)

    def replace(self, **flat: Any) -> Config:
        """A copy with flat keys (dots may be written as ``__``) replaced and checked."""
        return from_flat({**self.to_flat(), **{k.replace("__", "."): v for k, v in flat.items()}})


def _fields() -> dict[str, type]:
    """Every flat key and its Python type, in declaration order."""
    out: dict[str, type] = {}
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            for sub in dataclasses.fields(f.default_factory):
                out[f"{f.name}.{sub.name}"] = _TYPES[sub.type]
        else:
            out[f.name] = _TYPES[f.type]
    return out


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, int: int, float: float, str: str, bool: bool}


def config_keys() -> dict[str, type]:
    """The flat keys a config accepts, with their types."""
    return dict(_FIELDS)


def to_flat(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _FIELDS:
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        out[key] = obj
    return out


def coerce(key: str, value: Any) -> Any:
    """Check ``value`` against the type of ``key``; strings (from a CLI or MLflow params) are parsed."""
    if key not in _FIELDS:
        raise ConfigError(f"unknown config key '{key}' (valid keys: {', '.join(_FIELDS)})")
    typ = _FIELDS[key]
    if isinstance(value, str) and typ is not str:
        return _parse(key, value, typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    raise ConfigError(f"config key '{key}' expects {typ.__name__}, got {type(value).__name__} {value!r}")


def _parse(key: str, text: str, typ: type) -> Any:
    text = text.strip()
    if typ is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
    else:
        try:
            value = typ(float(text)) if typ is int and "e" in text.lower() else typ(text)
            if typ is float and not math.isfinite(value):
                raise ValueError
            return value
        except ValueError:
            pass
    raise ConfigError(f"config key '{key}' expects {typ.__name__}, got {text!r}")


def from_flat(flat: dict[str, Any], *, validate: bool = True) -> Config:
    """Build a config from a (possibly partial) flat dict; missing keys keep their defaults."""
    cfg = Config()
    for key, value in flat.items():
        value = coerce(key, value)
        obj: Any = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            obj = getattr(obj, part)
        setattr(obj, leaf, value)
    if validate:
        validate_config(cfg)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "seed=2"]`` → typed flat dict; each item must be ``key=value``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
        out[key.strip()] = coerce(key.strip(), value)
    return out


def validate_config(cfg: Config) -> None:
    """Value checks that need no heavy imports; names of backbones/decoders are checked by their registries."""
    d, m, o, t, e = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.eval
    checks = [
        (d.layout in LAYOUTS, "data.layout", f"must be one of {', '.join(LAYOUTS)}, got '{d.layout}'"),
        (d.image_size > 0, "data.image_size", f"must be a positive number of pixels, got {d.image_size}"),
        _image_size_check(d.image_size, m.backbone),
        (0 <= d.clip_low < d.clip_high <= 100, "data.clip_low/clip_high", "must satisfy 0 <= low < high <= 100"),
        (0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}"),
        (0 < d.test_fraction < 1, "data.test_fraction", f"must be in (0, 1), got {d.test_fraction}"),
        (
            d.val_fraction + d.test_fraction < 1,
            "data.val_fraction + data.test_fraction",
            "must leave patients for training",
        ),
        (d.patients >= 0, "data.patients", f"must be >= 0 (0 = all), got {d.patients}"),
        (0 < d.fraction <= 1, "data.fraction", f"must be in (0, 1], got {d.fraction}"),
        (
            d.patients == 0 or d.fraction == 1.0,
            "data.patients/data.fraction",
            "choose a few-shot subset by patient count or by fraction, not both",
        ),
        (o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}"),
        (o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}"),
        (o.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {o.warmup_epochs}"),
        (0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}"),
        (t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}"),
        (t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}"),
        (t.amp in AMP_CHOICES, "train.amp", f"must be one of {', '.join(AMP_CHOICES)}, got '{t.amp}'"),
        (t.eval_every >= 1, "train.eval_every", f"must be >= 1, got {t.eval_every}"),
        (
            t.val_budget >= 0 and math.isfinite(t.val_budget),
            "train.val_budget",
            f"must be a finite number >= 0 (0 = every slice), got {t.val_budget}",
        ),
        (t.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {t.checkpoint_every}"),
        (
            t.checkpoint_interval_s >= 0 and math.isfinite(t.checkpoint_interval_s),
            "train.checkpoint_interval_s",
            f"must be a finite number >= 0, got {t.checkpoint_interval_s}",
        ),
        (
            t.augment in AUGMENT_CHOICES,
            "train.augment",
            f"must be one of {', '.join(AUGMENT_CHOICES)}, got '{t.augment}'",
        ),
        (t.loss in LOSS_CHOICES, "train.loss", f"must be one of {', '.join(LOSS_CHOICES)}, got '{t.loss}'"),
        (
            e.nsd_tolerance_mm > 0 and math.isfinite(e.nsd_tolerance_mm),
            "eval.nsd_tolerance_mm",
            f"must be a finite distance > 0 (mm), got {e.nsd_tolerance_mm}",
        ),
    ]
    _raise_first(checks)
    validate_model(m)


def validate_model(m: ModelConfig) -> None:
    """The ``model.*`` value checks (mode included), also run by the segmenter builder on a model section alone."""
    _raise_first([
        (m.mode in MODES, "model.mode", f"must be one of {', '.join(MODES)}, got '{m.mode}'"),
        (m.backbone_lr_mult > 0, "model.backbone_lr_mult", f"must be > 0, got {m.backbone_lr_mult}"),
        (m.lora_rank >= 1, "model.lora_rank", f"must be >= 1, got {m.lora_rank}"),
        (0 <= m.lora_dropout < 1, "model.lora_dropout", f"must be in [0, 1), got {m.lora_dropout}"),
        (m.decoder_width >= 4, "model.decoder_width", f"must be >= 4, got {m.decoder_width}"),
    ])  # fmt: skip


def backbone_patch_size(backbone: str) -> tuple[int, str] | None:
    """The patch size of a ``model.backbone`` value and where it comes from, without loading or importing anything.

    Args:
        backbone: a named or tiny backbone (its family's patch size), a local folder (the ``patch_size`` of its
            ``config.json``), a hub id or ``none``. None when the size is not known without loading: ``none``, a hub
            id, a folder without a readable config (the backbone loader reports that one).
    """
    family = TINY_BACKBONES.get(backbone) or next(
        (f for f in BACKBONE_PATCH_SIZES if backbone.startswith(f"{f}-")), None
    )
    if family is not None:
        patch, display = BACKBONE_PATCH_SIZES[family]
        return patch, display
    if backbone == "none":
        return None
    config = Path(backbone).expanduser() / "config.json"
    try:
        patch = json.loads(config.read_text()).get("patch_size")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(patch, list) and len(set(patch)) == 1:
        patch = patch[0]
    if isinstance(patch, int) and not isinstance(patch, bool) and patch > 0:
        return patch, f"patch_size in {config}"
    return None


def _image_size_check(image_size: int, backbone: str) -> tuple[bool, str, str]:
    """``data.image_size`` against the backbone's patch size: an entry for :func:`_raise_first`."""
    known = backbone_patch_size(backbone) if image_size > 0 else None
    if known is None or image_size % known[0] == 0:
        return True, "data.image_size", ""
    patch, why = known
    below = image_size // patch * patch
    fits = f"{below} or {below + patch}" if below else str(patch)
    return (
        False,
        "data.image_size",
        f"must be a positive multiple of the patch size {patch} of backbone '{backbone}' ({why}), got {image_size}; "
        f"{fits} would do",
    )


def _raise_first(checks: list[tuple[bool, str, str]]) -> None:
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {message}")


def frozen_backbone(model: ModelConfig | Mapping[str, Any]) -> bool:
    """Whether a trial trains on a fixed backbone, so that a feature cache could serve it (the one definition: sweep
    resources, feature caches, the trial and the segmenter all ask this).

    Args:
        model: the trial's model section, or its flat config (``model.mode``, ``model.backbone``).
    """
    if isinstance(model, Mapping):
        mode, backbone = model.get("model.mode"), model.get("model.backbone", ModelConfig.backbone)
    else:
        mode, backbone = model.mode, model.backbone
    return mode == Mode.FROZEN and backbone != "none"


def merge_trial(config: dict[str, Any]) -> dict[str, Any]:
    """The flat config of a Tune trial: ``config["trial"]`` with the learning rate Optuna sampled, if any."""
    flat = dict(config["trial"])
    if "optim.lr" in config:
        flat["optim.lr"] = float(config["optim.lr"])
    return flat


def run_name(cfg: Config) -> str:
    """A readable, deterministic name such as ``multiscale·finetune·p5·s2``."""
    if cfg.data.patients:
        subset = f"p{cfg.data.patients}"
    elif cfg.data.fraction < 1:
        subset = f"f{cfg.data.fraction:g}"
    else:
        subset = "all"
    backbone = "" if cfg.model.backbone in ("tiny", "none") else f"{cfg.model.backbone.rsplit('/', 1)[-1]}·"
    mode = "" if cfg.model.backbone == "none" else f"·{cfg.model.mode}"
    return f"{backbone}{cfg.model.decoder}{mode}·{subset}·lr{cfg.optim.lr:g}·s{cfg.seed}"


def config_hash(flat: dict[str, Any], exclude: tuple[str, ...] = ()) -> str:
    """A short stable hash of a flat config (``exclude`` e.g. ``("seed",)`` to name a cell)."""
    payload = json.dumps({k: v for k, v in sorted(flat.items()) if k not in exclude}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


_FIELDS = _fields()
