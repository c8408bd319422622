"""One trial config with one flat dotted view.

The same flat dict (``model.decoder=multiscale``, ``optim.lr=3e-4``, ``seed=2`` …) is what a sweep searches,
what MLflow logs as params, what a checkpoint's ``config.json`` stores and what an export reloads. Unknown keys
and wrong types are errors, never ignored; :func:`from_flat` then checks the values with
:func:`lasegseg.config_checks.validate_config` (where the values a key may take are declared).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lasegseg.config_checks import Mode, validate_config
from lasegseg.errors import ConfigError


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
        validate_config(to_flat(cfg))
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
