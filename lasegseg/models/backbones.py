"""Backbone families through transformers (DINOv2, DINOv3): named sizes, hub ids, local folders and tiny random models.

A family is one registry entry (:class:`BackboneFamily`): its patch size, named sizes and their layer tables, hub
ids, transformers model classes, LoRA target modules and tiny random config. Each family's patch size is declared in
:data:`lasegseg.config.BACKBONE_PATCH_SIZES` as well, so that the config checks ``data.image_size`` without
importing torch; registering a family that disagrees with it fails.

Every backbone — the tiny ones included — is loaded with ``from_pretrained`` from a folder or hub id, so tests
exercise the same path as real weights. A tiny model is created once per cache folder from a fixed seed and saved
as safetensors under ``<cache>/backbones/<tiny name>[-reg]`` (``tiny``, ``tiny-reg``, ``tiny-dinov3``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lasegseg.config import BACKBONE_PATCH_SIZES, TINY_BACKBONES
from lasegseg.errors import ModelError, first_line
from lasegseg.paths import cache_root
from lasegseg.registry import Registry

NONE = "none"
TINY_SEED = 0


@dataclass(frozen=True)
class BackboneFamily:
    """A registry entry: one family of ViT backbones in transformers, with everything that differs between families.

    Args:
        name: prefix of the named sizes (``dinov2`` → ``dinov2-small`` …).
        display_name: the family in messages.
        patch_size: pixels per patch.
        sizes: the named sizes, written ``<name>-<size>``.
        layer_indices: multi-layer feature taps (0-based block indices) per size and for ``tiny``.
        arch_sizes: ``(hidden_size, num_hidden_layers)`` → size, so that a local copy of a named size gets its table.
        hub_id: hub id of a named size, formatted with ``size`` (its ``hub_sizes`` spelling).
        registers_hub_id: the same for the with-registers variant; empty when the family has no such variant.
        model_classes: transformers ``model_type`` → model class name, for every variant of the family.
        registers_model_types: the model types in ``model_classes`` that form a separate with-registers variant,
            which ``model.registers=true`` selects. Empty for a family with one variant (DINOv3, whose models all
            have register tokens): there ``model.registers=true`` is refused rather than silently ignored, so a
            sweep never runs the same model as two cells.
        final_norm: attribute of the model that holds its final layer norm.
        lora_targets: candidate name sets of the attention projections LoRA adapts; the first set the model has
            wins (transformers renamed them between versions).
        tiny_name: short name of the tiny random model (saved under ``<cache>/backbones/<tiny_name>[-reg]``).
        tiny_config: transformers config fields of the tiny model, the patch size aside.
        tiny_num_registers: register tokens of its with-registers variant, or of the tiny model itself when the
            family has one variant.
        hub_sizes: size → how the hub ids spell it, where they differ (``small-plus`` → ``s16plus``).
        load_config: config fields set on every model of the family as it is loaded.
    """

    name: str
    display_name: str
    patch_size: int
    sizes: tuple[str, ...]
    layer_indices: Mapping[str, list[int]]
    arch_sizes: Mapping[tuple[int, int], str]
    hub_id: str
    registers_hub_id: str
    model_classes: Mapping[str, str]
    registers_model_types: tuple[str, ...]
    final_norm: str
    lora_targets: tuple[tuple[str, ...], ...]
    tiny_name: str
    tiny_config: Mapping[str, object]
    tiny_num_registers: int
    hub_sizes: Mapping[str, str] = field(default_factory=dict)
    load_config: Mapping[str, object] = field(default_factory=dict)

    @property
    def single_variant(self) -> bool:
        """Whether the family has one variant only (no separate with-registers models)."""
        return not self.registers_model_types


FAMILIES: Registry[BackboneFamily] = Registry("backbone family", "families", ModelError)


def register_backbone_family(family: BackboneFamily) -> BackboneFamily:
    """Register a backbone family; its tiny name and named sizes become backbone names.

    Args:
        family: the entry; registering a name twice, or a family whose patch size or tiny name
            :data:`lasegseg.config.BACKBONE_PATCH_SIZES` / :data:`~lasegseg.config.TINY_BACKBONES` do not declare, is an
            error.
    """
    declared = BACKBONE_PATCH_SIZES.get(family.name)
    if declared != (family.patch_size, family.display_name) or TINY_BACKBONES.get(family.tiny_name) != family.name:
        raise ValueError(
            f"backbone family '{family.name}' (patch {family.patch_size}, tiny '{family.tiny_name}') must be declared "
            f"in lasegseg.config.BACKBONE_PATCH_SIZES and TINY_BACKBONES, which the config checks without torch"
        )
    return FAMILIES.add(family.name, family)


def list_backbone_families() -> list[str]:
    """Registered backbone family names, sorted."""
    return FAMILIES.names()


def backbone_family(name: str) -> BackboneFamily:
    """The registry entry of the family ``name``.

    Args:
        name: a registered family name; anything else raises ModelError listing the valid names.
    """
    return FAMILIES.get(name)


def _family_of_model_type(model_type: str) -> BackboneFamily | None:
    """The family whose transformers models include ``model_type``, or None."""
    return next((f for f in FAMILIES.values() if model_type in f.model_classes), None)


register_backbone_family(
    BackboneFamily(
        name="dinov2",
        display_name="DINOv2",
        patch_size=14,
        sizes=("small", "base", "large", "giant"),
        # As in dinov2's depth/segmentation heads.
        layer_indices={
            "tiny": [0, 1, 2, 3],
            "small": [2, 5, 8, 11],
            "base": [2, 5, 8, 11],
            "large": [4, 11, 17, 23],
            "giant": [9, 19, 29, 39],
        },
        arch_sizes={(384, 12): "small", (768, 12): "base", (1024, 24): "large", (1536, 40): "giant"},
        hub_id="facebook/dinov2-{size}",
        registers_hub_id="facebook/dinov2-with-registers-{size}",
        model_classes={"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"},
        registers_model_types=("dinov2_with_registers",),
        final_norm="layernorm",
        lora_targets=(("q_proj", "v_proj"), ("query", "value")),
        tiny_name="tiny",
        # 4 blocks of width 128 on a 14-px patch: 112 px images give an 8×8 grid and ~0.9 M parameters, small
        # enough to train for tens of epochs on two CPU cores.
        tiny_config={
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "mlp_ratio": 4,
            "image_size": 112,
            "layerscale_value": 1.0,
            "drop_path_rate": 0.0,
        },
        tiny_num_registers=4,
    )
)

register_backbone_family(
    BackboneFamily(
        name="dinov3",
        display_name="DINOv3",
        patch_size=16,
        sizes=("small", "small-plus", "base", "large", "huge-plus", "7b"),
        # Four evenly spaced blocks ending at the last, as dinov3's dense heads take them (FOUR_EVEN_INTERVALS):
        # depths 12 (S, S+, B), 24 (L), 32 (H+), 40 (7B).
        layer_indices={
            "tiny": [0, 1, 2, 3],
            "small": [2, 5, 8, 11],
            "small-plus": [2, 5, 8, 11],
            "base": [2, 5, 8, 11],
            "large": [5, 11, 17, 23],
            "huge-plus": [7, 15, 23, 31],
            "7b": [9, 19, 29, 39],
        },
        # S and S+ share (384, 12) and their table; "small" stands for both.
        arch_sizes={
            (384, 12): "small",
            (768, 12): "base",
            (1024, 24): "large",
            (1280, 32): "huge-plus",
            (4096, 40): "7b",
        },
        hub_id="facebook/dinov3-vit{size}-pretrain-lvd1689m",
        registers_hub_id="",
        hub_sizes={
            "small": "s16",
            "small-plus": "s16plus",
            "base": "b16",
            "large": "l16",
            "huge-plus": "h16plus",
            "7b": "7b16",
        },
        model_classes={"dinov3_vit": "DINOv3ViTModel"},
        # Every DINOv3 checkpoint has 4 register tokens: one variant, see BackboneFamily.registers_model_types.
        registers_model_types=(),
        final_norm="norm",
        lora_targets=(("q_proj", "v_proj"),),
        tiny_name="tiny-dinov3",
        # The tiny DINOv2's width and depth on a 16-px patch, with the 4 register tokens every DINOv3 has.
        tiny_config={
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 512,
            "image_size": 128,
            "layerscale_value": 1.0,
            "drop_path_rate": 0.0,
        },
        tiny_num_registers=4,
        # The hub configs keep DINOv3's pre-training augmentation of the RoPE patch coordinates (random rescale by
        # up to 2x) switched on in training mode. Off here: a fine-tuned backbone then sees the same geometry in
        # training as at inference (as DINOv2, which has none), and its pass does not draw from the trial's RNG.
        load_config={"pos_embed_shift": None, "pos_embed_jitter": None, "pos_embed_rescale": None},
    )
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_FINGERPRINT_BYTES = 4096


def list_backbones() -> list[str]:
    """The backbone short names (per family: its tiny model, then its sizes); any hub id (``org/name``) or local
    folder is accepted as well."""
    return [n for f in FAMILIES.values() for n in (f.tiny_name, *(f"{f.name}-{size}" for size in f.sizes))]


class Backbone(nn.Module):
    """A model of a registered family (DINOv2, DINOv3) that maps a grayscale batch to a list of patch-feature maps.

    Args:
        model: a transformers model of a registered family (``Dinov2Model``, ``Dinov2WithRegistersModel``,
            ``DINOv3ViTModel``).
        layer_indices: 0-based transformer blocks whose (final-layernormed) outputs are returned.
        source: where the weights came from (hub id or folder), for messages and metadata.

    Attributes:
        family: the backbone family name.
        embed_dim: channels of every feature map.
        patch_size: pixels per patch; inputs are padded right/bottom to a multiple of it.
        layer_indices: the tapped blocks.
        num_features_levels: ``len(layer_indices)``.
        num_prefix_tokens: CLS and register tokens ahead of the patch tokens, dropped from every map.
    """

    def __init__(self, model: nn.Module, layer_indices: list[int], *, source: str) -> None:
        super().__init__()
        cfg = model.config
        if not layer_indices or not all(0 <= i < cfg.num_hidden_layers for i in layer_indices):
            raise ModelError(
                f"backbone '{source}': layer indices {layer_indices} outside 0..{cfg.num_hidden_layers - 1}"
            )
        family = _family_of_model_type(cfg.model_type)
        if family is None:
            raise ModelError(f"backbone '{source}' is a '{cfg.model_type}' model, not {_family_display_names()}")
        self.model = model
        self.source = source
        self.family = family.name
        self._final_norm = family.final_norm
        self.embed_dim = int(cfg.hidden_size)
        self.patch_size = int(cfg.patch_size)
        self.layer_indices = list(layer_indices)
        self.num_features_levels = len(self.layer_indices)
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        # The mask token only serves masked-image pre-training; it never gets a gradient here.
        mask_token = getattr(model.embeddings, "mask_token", None)
        if mask_token is not None:
            mask_token.requires_grad_(False)
        # Identity of the weights as loaded; it must survive fine-tuning and LoRA so checkpoints can be checked.
        self.source_fingerprint = weights_fingerprint(model)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, levels: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Feature maps of a batch.

        Args:
            x: ``(B, 1, H, W)`` intensity-normalised grayscale in [0, 1].
            levels: indices into ``layer_indices`` of the maps to return, in this order; None for all. Only their
                hidden states are kept during the pass (the others are freed as it goes), which is what makes a
                frozen pass of a one-level decoder lighter; the values are the same as in the all-levels pass.

        Returns:
            One map per level, of shape ``(B, embed_dim, ceil(H / p), ceil(W / p))``; the last row/column of patches
            covers the zero padding when H or W is not a multiple of ``patch_size``.
        """
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, H, W) batch, got shape {tuple(x.shape)}")
        blocks = [self.layer_indices[i] for i in self.check_levels(levels)]
        b, _, height, width = x.shape
        p = self.patch_size
        pad_h, pad_w = -height % p, -width % p
        if pad_h or pad_w:
            # Padding before normalisation: 0 is the dark MRI background the model sees elsewhere.
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        h, w = (height + pad_h) // p, (width + pad_w) // p
        # hidden[0] is the embedding output, hidden[i + 1] the output of block i. transformers 5 keeps only the
        # indices it is given (None elsewhere; older versions keep all); True keeps every one, as LoRA and
        # fine-tuning always did.
        select = True if levels is None else sorted({i + 1 for i in blocks})
        hidden = self.model(pixel_values=x, output_hidden_states=select).hidden_states
        norm = getattr(self.model, self._final_norm)
        return [
            norm(hidden[i + 1][:, self.num_prefix_tokens :]).reshape(b, h, w, self.embed_dim).permute(0, 3, 1, 2)
            for i in blocks
        ]

    def check_levels(self, levels: Sequence[int] | None) -> list[int]:
        """``levels`` as a list of valid level indices (all of them for None); ModelError names a bad one.

        Args:
            levels: indices into ``layer_indices``.
        """
        if levels is None:
            return list(range(self.num_features_levels))
        levels = [int(i) for i in levels]
        bad = [i for i in levels if not 0 <= i < self.num_features_levels]
        if bad or not levels or len(set(levels)) != len(levels):
            raise ModelError(
                f"backbone '{self.source}': levels {levels} must be distinct indices in "
                f"0..{self.num_features_levels - 1} (it taps blocks {self.layer_indices})"
            )
        return levels

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute block activations in the backward pass (memory for time; worth it for large/giant).

        Args:
            enabled: turn it on or off.
        """
        model = self.model
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn).
        if hasattr(model, "activation_checkpointing_enable"):
            enable, disable, kwargs_name = (
                model.activation_checkpointing_enable,
                model.activation_checkpointing_disable,
                "activation_checkpointing_kwargs",
            )
        else:
            enable, disable, kwargs_name = (
                model.gradient_checkpointing_enable,
                model.gradient_checkpointing_disable,
                "gradient_checkpointing_kwargs",
            )
        if enabled:
            # Non-reentrant checkpointing also works when the block inputs need no grad (frozen embeddings, LoRA).
            enable(**{kwargs_name: {"use_reentrant": False}})
        else:
            disable()


class BackboneStub(nn.Module):
    """A frozen backbone's identity without its weights: what a decoder, an optimizer and a checkpoint need from a
    :class:`Backbone` whose features were computed beforehand (a sweep's feature cache).

    A frozen trial that trains and evaluates on cached features never runs its backbone, so it need not load it:
    no transformers import in its worker, no weights in its memory (4.5 GB on the device for ViT-g). Checkpoints
    record the same fingerprint as with the real backbone, so ``lasegseg predict`` later loads the weights and
    checks them. Calling the stub is an error.

    Args:
        source: where the weights come from (hub id or folder), as :attr:`Backbone.source`.
        family: the backbone family name.
        embed_dim: channels of every feature map.
        patch_size: pixels per patch.
        layer_indices: the tapped blocks.
        source_fingerprint: :func:`fingerprint` of the weights the features were computed with.
    """

    def __init__(
        self, *, source: str, family: str, embed_dim: int, patch_size: int, layer_indices: Sequence[int],
        source_fingerprint: str,
    ) -> None:  # fmt: skip
        super().__init__()
        self.source, self.family = source, family
        self.embed_dim, self.patch_size = int(embed_dim), int(patch_size)
        self.layer_indices = [int(i) for i in layer_indices]
        self.num_features_levels = len(self.layer_indices)
        self.source_fingerprint = source_fingerprint

    check_levels = Backbone.check_levels

    def forward(self, x: torch.Tensor, levels: Sequence[int] | None = None) -> list[torch.Tensor]:
        raise ModelError(
            f"backbone '{self.source}' was not loaded: this frozen model decodes cached features only "
            "(build it with build_segmenter to run the backbone)"
        )


def backbone_source(name: str, *, registers: bool = False) -> str:
    """The source :func:`build_backbone` loads ``name`` from (hub id or folder; :attr:`Backbone.source`), without
    loading it.

    Args:
        name: as for :func:`build_backbone`.
        registers: as for :func:`build_backbone`.
    """
    return _resolve(name, registers=registers)[0]


def build_backbone(name: str, *, registers: bool = False, gradient_checkpointing: bool = False) -> Backbone:
    """Load a backbone of a registered family.

    Args:
        name: ``tiny``, ``dinov2-small|base|large|giant``, ``tiny-dinov3``,
            ``dinov3-small|small-plus|base|large|huge-plus|7b`` (see :func:`list_backbones`), a hub id (``org/name``)
            or a local folder.
        registers: pick DINOv2's with-registers variant of ``tiny`` and the named sizes; a hub id or folder is what
            its config says, and asking for registers on one without them is an error. DINOv3 models always have
            their register tokens and no separate variant: true is refused for them.
        gradient_checkpointing: recompute activations in backward (for large/giant when fine-tuning).
    """
    source, size, local = _resolve(name, registers=registers)
    model = _load(source, local=local)
    config = model.config
    family = _family_of_model_type(config.model_type)  # never None: _load accepts only registered model types
    if registers and family.single_variant:
        raise ModelError(_single_variant_message(name, family))
    if registers and config.model_type not in family.registers_model_types:
        raise ModelError(
            f"model.registers=true but backbone '{name}' ({source}) is a {family.display_name} without registers"
        )
    if size is None:
        size = family.arch_sizes.get((config.hidden_size, config.num_hidden_layers))
    indices = family.layer_indices[size] if size else _even_indices(config.num_hidden_layers)
    backbone = Backbone(model, indices, source=source)
    if gradient_checkpointing:
        backbone.set_gradient_checkpointing(True)
    return backbone


def tiny_backbone_dir(*, registers: bool = False, family: str = "dinov2") -> Path:
    """The folder of a family's tiny random model, created on first use (safe when processes race).

    Args:
        registers: the with-registers variant (``tiny-reg``; DINOv2 only).
        family: a registered backbone family.
    """
    tiny_name = backbone_family(family).tiny_name
    final = cache_root() / "backbones" / (f"{tiny_name}-reg" if registers else tiny_name)
    if not (final / "config.json").is_file():
        _create_tiny(final, registers=registers, family=family)
    return final


def fingerprint(backbone: Backbone) -> str:
    """Identity of the pretrained weights ``backbone`` was loaded from (see :func:`weights_fingerprint`).

    It is taken at load time, so it stays the same while the backbone is fine-tuned or gets LoRA adapters: a
    checkpoint of any mode stores it, and a rebuild from the same source gives the same value.

    Args:
        backbone: a backbone from :func:`build_backbone`.
    """
    return backbone.source_fingerprint


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap hash of a model's current weights: sha256 over names, shapes, dtypes and each tensor's first 4 KiB.

    LoRA adapters are ignored and peft's ``base_layer`` renaming is undone, so injecting LoRA leaves it unchanged.

    Args:
        model: any module (the transformers model of a backbone).
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        data = tensor.detach().reshape(-1)[: max(1, _FINGERPRINT_BYTES // tensor.element_size())]
        digest.update(f"{name.replace('.base_layer', '')}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(data.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_backbone_name(name: str, *, registers: bool = False) -> None:
    """Fail early on a name :func:`build_backbone` cannot resolve, without loading or creating anything.

    Args:
        name: as for :func:`build_backbone`; a hub id is accepted without contacting the hub.
        registers: as for :func:`build_backbone`.
    """
    _resolve(name, registers=registers, create=False)


def lora_target_modules(backbone: Backbone) -> list[str]:
    """Names of the attention projections LoRA adapts in ``backbone``: the first of its family's candidate sets
    that the model has.

    Args:
        backbone: a backbone from :func:`build_backbone`.
    """
    leaves = {name.rsplit(".", 1)[-1] for name, _ in backbone.model.named_modules()}
    candidates = backbone_family(backbone.family).lora_targets
    for names in candidates:
        if set(names) <= leaves:
            return list(names)
    raise ModelError(f"backbone '{backbone.source}' has none of the LoRA target modules {candidates}")


def _resolve(name: str, *, registers: bool, create: bool = True) -> tuple[str, str | None, bool]:
    """``name`` → (source for ``from_pretrained``, size key of the layer table or None, source is local)."""
    if name == NONE:
        raise ModelError("backbone 'none' has no model (it selects the decoder-only baseline, model.decoder=unet)")
    for family in FAMILIES.values():
        size = name.removeprefix(f"{family.name}-")
        named = name.startswith(f"{family.name}-") and size in family.sizes
        if (named or name == family.tiny_name) and registers and family.single_variant:
            raise ModelError(_single_variant_message(name, family))
        if name == family.tiny_name:
            return str(tiny_backbone_dir(registers=registers, family=family.name) if create else name), "tiny", True
        if named:
            hub_size = family.hub_sizes.get(size, size)
            return (family.registers_hub_id if registers else family.hub_id).format(size=hub_size), size, False
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), None, True
    if _HUB_ID.match(name) and not name.startswith("."):
        return name, None, False
    if os.sep in name or "/" in name or name.startswith(("~", ".")):
        raise ModelError(f"backbone folder '{name}' does not exist")
    raise ModelError(
        f"unknown backbone '{name}' (valid names: {', '.join(list_backbones())}, a hub id org/name or a local folder)"
    )


def _single_variant_message(name: str, family: BackboneFamily) -> str:
    return (
        f"model.registers=true but backbone '{name}' is a {family.display_name}, which has one variant (its models "
        f"always carry their register tokens): leave model.registers false"
    )


def _family_display_names() -> str:
    return " or ".join(f.display_name for f in FAMILIES.values())


def _load(source: str, *, local: bool) -> nn.Module:
    import transformers

    where = "folder" if local else "hub id"
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
        family = _family_of_model_type(config.model_type)
        if family is None:
            raise ModelError(
                f"backbone {where} '{source}' holds a '{config.model_type}' model, not {_family_display_names()}"
            )
        model_class = getattr(transformers, family.model_classes[config.model_type])
        for key, value in family.load_config.items():
            setattr(config, key, value)
        # A local load takes milliseconds: its progress bars would only clutter every trial's log.
        with _progress_bars(enabled=not local):
            # fp32 master weights whatever dtype the checkpoint was saved in: without ``dtype`` transformers keeps
            # the checkpoint's (a bf16 one would be fine-tuned in bf16); bf16 compute comes from autocast.
            return model_class.from_pretrained(
                source, config=config, attn_implementation="sdpa", local_files_only=local, dtype=torch.float32
            )
    except ModelError:
        raise
    except Exception as exc:  # hub/IO failures come as many types; report them as one line
        reason = first_line(exc)
        raise ModelError(f"cannot load backbone {where} '{source}': {reason}") from exc


@contextlib.contextmanager
def _progress_bars(*, enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def _even_indices(num_layers: int, n: int = 4) -> list[int]:
    """``n`` evenly spaced blocks ending at the last one (12 layers → [2, 5, 8, 11])."""
    if num_layers <= n:
        return list(range(num_layers))
    return [round((k + 1) * num_layers / n) - 1 for k in range(n)]


def _create_tiny(final: Path, *, registers: bool, family: str = "dinov2") -> None:
    """Write a family's tiny model to a temporary sibling folder and rename it into place atomically."""
    import transformers

    fam = backbone_family(family)
    model_type = next((t for t in fam.model_classes if (t in fam.registers_model_types) == registers), None)
    if model_type is None:
        raise ModelError(f"backbone family '{family}' has no model {'with' if registers else 'without'} registers")
    fields = {**fam.tiny_config, **fam.load_config, "patch_size": fam.patch_size}
    if registers or fam.single_variant:
        fields["num_register_tokens"] = fam.tiny_num_registers
    model_class = getattr(transformers, fam.model_classes[model_type])
    # transformers' random init draws from torch's global generator; without the fork the first trial on a fresh
    # machine (the one that creates this folder) would initialise its decoder from a different RNG state.
    with torch.random.fork_rng(devices=[]):
        model: nn.Module = model_class(transformers.AutoConfig.for_model(model_type, **fields))
    _seed_weights(model, TINY_SEED)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        with _progress_bars(enabled=False):
            model.save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            # Another process won the race and its folder is complete (rename is atomic); keep that one.
            if not (final / "config.json").is_file():
                raise ModelError(f"cannot create the tiny backbone at '{final}' (remove that folder): {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _seed_weights(model: nn.Module, seed: int) -> None:
    """Redraw every randomly initialised tensor from numpy's PCG64 so the tiny weights do not depend on the torch
    version or its RNG; constant tensors (norms, biases, layer scales, zero tokens) keep their init."""
    rng = np.random.default_rng(seed)
    std = 0.02  # transformers' initializer_range for DINOv2 and DINOv3
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            flat = param.reshape(-1)
            if param.numel() > 1 and not bool((flat == flat[0]).all()):
                values = rng.standard_normal(param.shape)
                # Truncated at 2 std like trunc_normal_: redraw the tails rather than clip them.
                while (tails := np.abs(values) > 2.0).any():
                    values[tails] = rng.standard_normal(int(tails.sum()))
                param.copy_(torch.from_numpy((values * std).astype(np.float32)))
