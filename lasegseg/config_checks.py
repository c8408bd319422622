"""What a trial config may hold, and the one check of it, without importing torch.

The values a string key may take are declared here: the modes, layouts and numerics, and the names of the
registries that live behind torch (augmentations, losses, decoders and whether each reads a backbone, backbone
families with their patch sizes, named sizes and variants). Each registry refuses, when its module is imported, a
name or fact these do not declare, and a declared name it never registers.

:func:`validate_config` is every rule a trial's model, data and training follow that the config alone tells:
``config.from_flat`` runs it, so a sweep's up-front check and its ``--dry-run`` refuse what a trial would refuse,
and the segmenter runs :func:`validate_model` before it builds anything. Left to the model's loader is only what
depends on the machine: whether a backbone folder or hub id is there, and what it holds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lasegseg.errors import ConfigError


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
# Names of the augmentation and loss registries (lasegseg.train.augment, lasegseg.train.losses).
AUGMENT_CHOICES = ("none", "flip", "spatial")
LOSS_CHOICES = ("dicece", "dicefocal")
# The decoder registry (lasegseg.models.decoders): each name, and whether the decoder reads backbone features (False:
# it reads only the image, the no-backbone baseline of model.backbone=none).
DECODER_NEEDS_BACKBONE = {"linear": True, "conv": True, "multiscale": True, "unetr": True, "unet": False}
NO_BACKBONE = "none"


@dataclass(frozen=True)
class FamilyDeclaration:
    """What the config checks know of a backbone family of :mod:`lasegseg.models.families`.

    Args:
        display_name: the family in messages.
        patch_size: pixels per patch.
        tiny_name: the ``model.backbone`` name of its tiny random model.
        sizes: its named sizes, written ``<family>-<size>``.
        single_variant: no separate with-registers models, so ``model.registers=true`` is refused.
    """

    display_name: str
    patch_size: int
    tiny_name: str
    sizes: tuple[str, ...]
    single_variant: bool


BACKBONE_FAMILIES = {
    "dinov2": FamilyDeclaration("DINOv2", 14, "tiny", ("small", "base", "large", "giant"), single_variant=False),
    "dinov3": FamilyDeclaration(
        "DINOv3", 16, "tiny-dinov3", ("small", "small-plus", "base", "large", "huge-plus", "7b"), single_variant=True
    ),
}


def validate_config(flat: Mapping[str, Any]) -> None:
    """Every rule a trial config follows that the config alone tells; ConfigError names the first key at fault.

    Args:
        flat: a whole flat config (``Config.to_flat()``).
    """
    sections = _sections(flat)
    d, o, t, e = (sections[name] for name in ("data", "optim", "train", "eval"))
    checks = [
        (d.layout in LAYOUTS, "data.layout", f"must be one of {', '.join(LAYOUTS)}, got '{d.layout}'"),
        (d.image_size > 0, "data.image_size", f"must be a positive number of pixels, got {d.image_size}"),
        _image_size_check(d.image_size, flat["model.backbone"]),
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
    _check_model(sections["model"])


def validate_model(flat: Mapping[str, Any]) -> None:
    """The ``model.*`` rules: values, mode, LoRA settings, the decoder, the backbone's name and registers, and which
    backbone a decoder takes. The segmenter runs this on its model section before it builds anything.

    Args:
        flat: a flat config with every ``model.*`` key (other keys are ignored).
    """
    _check_model(_sections(flat)["model"])


def _check_model(m: SimpleNamespace) -> None:
    needs_backbone = DECODER_NEEDS_BACKBONE.get(m.decoder)
    image_only = ", ".join(name for name, needs in DECODER_NEEDS_BACKBONE.items() if not needs)
    _raise_first([
        (m.mode in MODES, "model.mode", f"must be one of {', '.join(MODES)}, got '{m.mode}'"),
        (m.backbone_lr_mult > 0, "model.backbone_lr_mult", f"must be > 0, got {m.backbone_lr_mult}"),
        (m.lora_rank >= 1, "model.lora_rank", f"must be >= 1, got {m.lora_rank}"),
        (m.lora_alpha > 0 and math.isfinite(m.lora_alpha), "model.lora_alpha",
         f"must be a finite number > 0, got {m.lora_alpha}"),
        (0 <= m.lora_dropout < 1, "model.lora_dropout", f"must be in [0, 1), got {m.lora_dropout}"),
        (m.decoder_width >= 4, "model.decoder_width", f"must be >= 4, got {m.decoder_width}"),
        (needs_backbone is not None, "model.decoder",
         f"must be one of {', '.join(DECODER_NEEDS_BACKBONE)}, got '{m.decoder}'"),
        (m.backbone != NO_BACKBONE or not needs_backbone, "model.decoder",
         f"must be a decoder without backbone ({image_only}) when model.backbone=none, got '{m.decoder}'"),
        (m.backbone == NO_BACKBONE or needs_backbone is not False, "model.backbone",
         f"must be 'none' for model.decoder={m.decoder} (it reads only the image), got '{m.backbone}'"),
        *_backbone_checks(m.backbone, m.registers),
    ])  # fmt: skip


def backbone_names() -> list[str]:
    """The declared backbone short names (per family: its tiny model, then its named sizes)."""
    return [n for name, f in BACKBONE_FAMILIES.items() for n in (f.tiny_name, *(f"{name}-{s}" for s in f.sizes))]


def declared_family(backbone: str) -> FamilyDeclaration | None:
    """The family of a tiny or named backbone (``tiny``, ``dinov3-large``), None for anything else.

    Args:
        backbone: a ``model.backbone`` value.
    """
    return next(
        (
            f
            for name, f in BACKBONE_FAMILIES.items()
            if backbone == f.tiny_name or (backbone.startswith(f"{name}-") and backbone[len(name) + 1 :] in f.sizes)
        ),
        None,
    )


def backbone_patch_size(backbone: str) -> tuple[int, str] | None:
    """The patch size of a ``model.backbone`` value and where it comes from, without loading or importing anything.

    Args:
        backbone: a named or tiny backbone (its family's patch size), a local folder (the ``patch_size`` of its
            ``config.json``), a hub id or ``none``. None when the size is not known without loading: ``none``, a hub
            id, a folder without a readable config (the backbone loader reports that one).
    """
    family = declared_family(backbone)
    if family is not None:
        return family.patch_size, family.display_name
    if backbone == NO_BACKBONE:
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


def _backbone_checks(backbone: str, registers: bool) -> list[tuple[bool, str, str]]:
    """``model.backbone`` and ``model.registers``: entries for :func:`_raise_first`."""
    if backbone == NO_BACKBONE:
        return []
    family = declared_family(backbone)
    if family is not None:
        return [
            (
                not (registers and family.single_variant),
                "model.registers",
                f"must be false for backbone '{backbone}': a {family.display_name} has one variant (its models always "
                f"carry their register tokens)",
            )
        ]
    # A hub id or a path is looked up where the model is built: the folder may exist on that machine only.
    path_like = "/" in backbone or os.sep in backbone or backbone.startswith(("~", "."))
    known = bool(backbone.strip()) and (path_like or Path(backbone).is_dir())
    return [
        (
            known,
            "model.backbone",
            f"must be a backbone name ({', '.join(backbone_names())}), a hub id org/name, a local folder or "
            f"'none', got '{backbone}'",
        )
    ]


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


def _sections(flat: Mapping[str, Any]) -> dict[str, SimpleNamespace]:
    """A flat config's sections, their keys as attributes (``model.mode`` → ``sections["model"].mode``)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, dot, leaf = key.partition(".")
        if dot:
            sections.setdefault(section, {})[leaf] = value
    return {name: SimpleNamespace(**keys) for name, keys in sections.items()}


def _raise_first(checks: list[tuple[bool, str, str]]) -> None:
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {message}")
