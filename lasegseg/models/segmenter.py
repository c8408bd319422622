"""Segmenter = backbone + decoder + training mode, its optimiser groups and its checkpoint state.

Modes: ``frozen`` (backbone fixed, in eval mode, run without autograd), ``finetune`` (everything trains) and
``lora`` (peft LoRA adapters on the attention query/value projections; only they and the decoder train). The
no-backbone baseline (``backbone=none``, ``decoder=unet``) ignores the mode.

A checkpoint holds what training changed: in frozen/lora mode the base backbone weights are left out (they come
back from the backbone source) and :func:`checkpoint_metadata` records their fingerprint instead.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lasegseg.config import Config, ModelConfig, frozen_backbone
from lasegseg.config_checks import Mode, validate_model
from lasegseg.errors import ModelError
from lasegseg.models.backbones import Backbone, BackboneStub, build_backbone, fingerprint, lora_target_modules
from lasegseg.models.decoders import create_decoder, decoder_levels
from lasegseg.models.sources import NONE, check_backbone_name, stand_ins_enabled
from lasegseg.paths import cache_root

NUM_CLASSES = 2
FROZEN_FEATURE_DTYPE = torch.float16
# Layers from which gradient checkpointing pays off (dinov2-large has 24, giant 40).
_CHECKPOINTING_MIN_LAYERS = 24
_NO_DECAY_SUFFIXES = ("cls_token", "mask_token", "register_tokens", "position_embeddings", "level_weights")
# The last backbone loaded in this process, as loaded: a reused worker deep-copies it instead of reading and
# parsing the weights again for every trial. One entry only, since a giant backbone is gigabytes.
_BACKBONE_TEMPLATE: dict[tuple, Backbone] = {}


class Segmenter(nn.Module):
    """Backbone (or none) + decoder, trained in one of the modes.

    Args:
        backbone: the feature extractor, or None for image-only decoders.
        decoder: a registry decoder, ``forward(feats, image) -> logits``.
        mode: ``frozen``, ``finetune`` or ``lora`` (recorded; :func:`build_segmenter` sets up the parameters).
        levels: the backbone levels the decoder reads (see :func:`~lasegseg.models.decoders.decoder_levels`);
            None for all.
    """

    def __init__(
        self, backbone: Backbone | None, decoder: nn.Module, *, mode: str, levels: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.mode = mode if backbone is not None else Mode.FINETUNE.value
        self.levels = tuple(backbone.check_levels(levels)) if backbone is not None else ()

    @property
    def frozen(self) -> bool:
        """Whether the backbone is fixed (its features can be computed once and cached)."""
        # Without a backbone the mode is "finetune" (see __init__), so the mode alone decides here.
        return self.mode == Mode.FROZEN

    def train(self, mode: bool = True) -> Segmenter:
        """Set training mode; a frozen backbone stays in eval mode (no dropout, fixed features)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The maps of the levels the decoder reads (``[]`` without a backbone); no autograd graph and fp16-rounded
        values when frozen.

        Args:
            image: ``(B, 1, H, W)`` in [0, 1].
        """
        if self.backbone is None:
            return []
        if self.frozen:
            with torch.no_grad():
                # Frozen features are fp16 values by definition: the feature cache stores them so, and rounding
                # here as well gives the same numbers with or without the cache, in training and at inference.
                return [f.to(FROZEN_FEATURE_DTYPE).to(f.dtype) for f in self.backbone(image, self.levels)]
        # A backbone that trains keeps its all-levels pass: autograd holds every block's activations anyway.
        feats = self.backbone(image)
        return [feats[i] for i in self.levels]

    def decode(self, feats: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """Logits from (possibly cached) features.

        Args:
            feats: output of :meth:`features` for ``image``.
            image: ``(B, 1, H, W)`` in [0, 1].
        """
        return self.decoder(feats, image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` image in [0, 1] → ``(B, 2, H, W)`` logits.

        Args:
            image: intensity-normalised grayscale batch.
        """
        return self.decode(self.features(image), image)


def check_model_config(model_cfg: ModelConfig) -> None:
    """Check names and their combination before any data or weights are loaded.

    Every rule the config alone tells is :func:`~lasegseg.config_checks.validate_model`'s, the check every config
    passes when it is built (a sweep's trials before the first starts); here only what depends on this machine is
    added: that a backbone folder exists.

    Args:
        model_cfg: the model section of a trial config.

    Raises:
        ConfigError: a value, name or backbone/decoder pair that cannot work (see
            :func:`~lasegseg.config_checks.validate_model`).
        ModelError: a backbone folder that does not exist.
    """
    validate_model(Config(model=model_cfg).to_flat())
    if model_cfg.backbone != NONE:
        check_backbone_name(model_cfg.backbone, registers=model_cfg.registers)


def build_segmenter(
    model_cfg: ModelConfig, *, gradient_checkpointing: bool | None = None, backbone: BackboneStub | None = None
) -> Segmenter:
    """Build backbone, decoder and mode from the ``model.*`` config.

    Args:
        model_cfg: the model section of a trial config.
        gradient_checkpointing: None = on for backbones of 24+ blocks that receive gradients (large, giant).
        backbone: a weightless stand-in for the configured backbone, for a frozen model that only ever decodes
            cached features (see :class:`~lasegseg.models.backbones.BackboneStub`); None loads the backbone.
    """
    check_model_config(model_cfg)
    if model_cfg.backbone == NONE:
        decoder = create_decoder(
            model_cfg.decoder,
            embed_dim=0,
            num_levels=0,
            patch_size=1,
            width=model_cfg.decoder_width,
            num_classes=NUM_CLASSES,
        )
        return Segmenter(None, decoder.to(memory_format=torch.channels_last), mode=model_cfg.mode)

    frozen = frozen_backbone(model_cfg)
    if backbone is not None and not frozen:
        raise ModelError(f"a backbone stub serves frozen models only, not mode '{model_cfg.mode}'")
    if backbone is None:
        backbone = load_backbone(model_cfg.backbone, registers=model_cfg.registers)
    decoder = create_decoder(
        model_cfg.decoder,
        embed_dim=backbone.embed_dim,
        num_levels=backbone.num_features_levels,
        patch_size=backbone.patch_size,
        width=model_cfg.decoder_width,
        num_classes=NUM_CLASSES,
    )
    # Channels-last conv weights make every decoder conv run channels-last (1.2-1.6x faster on CPU, and the layout
    # tensor cores want); the backbone's feature maps already come in that layout.
    decoder.to(memory_format=torch.channels_last)
    if frozen:
        backbone.requires_grad_(False)
    elif model_cfg.mode == Mode.LORA:
        _inject_lora(backbone, model_cfg)
    if gradient_checkpointing is None:
        gradient_checkpointing = not frozen and backbone.model.config.num_hidden_layers >= _CHECKPOINTING_MIN_LAYERS
    if gradient_checkpointing:
        backbone.set_gradient_checkpointing(True)
    levels = decoder_levels(model_cfg.decoder, backbone.num_features_levels)
    return Segmenter(backbone, decoder, mode=model_cfg.mode, levels=levels).train()


def load_backbone(name: str, *, registers: bool = False) -> Backbone:
    """A fresh copy of a backbone, read from its source once per process and deep-copied afterwards.

    Args:
        name: as for :func:`~lasegseg.models.backbones.build_backbone`.
        registers: as for :func:`~lasegseg.models.backbones.build_backbone`.
    """
    # The stand-in switch is part of the key: one name is two models with it on and off.
    key = (name, registers, str(cache_root()), _folder_stamp(name), stand_ins_enabled())
    template = _BACKBONE_TEMPLATE.get(key)
    if template is None:
        template = build_backbone(name, registers=registers)
        _BACKBONE_TEMPLATE.clear()
        _BACKBONE_TEMPLATE[key] = template
    return copy.deepcopy(template)


def forget_backbones() -> None:
    """Drop the backbone this process keeps for :func:`load_backbone` (a sweep driver's, once its features are
    built), so its memory goes back."""
    _BACKBONE_TEMPLATE.clear()


def _folder_stamp(name: str) -> tuple:
    """Modification times of a local backbone folder's files, so weights replaced on disk are read again."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in path.iterdir() if p.is_file()))


def _inject_lora(backbone: Backbone, model_cfg: ModelConfig) -> None:
    from peft import LoraConfig, inject_adapter_in_model  # deferred: heavy (peft; only LoRA trials need it)

    lora = LoraConfig(
        r=model_cfg.lora_rank,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        target_modules=lora_target_modules(backbone),
    )
    inject_adapter_in_model(lora, backbone.model)
    for name, param in backbone.named_parameters():
        param.requires_grad_("lora_" in name)


def param_groups(seg: Segmenter, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: decoder / backbone × decay / no decay; empty groups are left out.

    Norms, biases, layer scales, tokens, position embeddings and the level-weight vector get no weight decay. The
    backbone learns at ``lr * backbone_lr_mult`` in finetune mode; LoRA adapters learn at ``lr``.

    Args:
        seg: the segmenter; only parameters that require grad are included.
        lr: base learning rate.
        backbone_lr_mult: backbone learning-rate multiplier (finetune mode).
        weight_decay: decay of the decayed groups.
    """
    backbone_lr = lr * backbone_lr_mult if seg.mode == Mode.FINETUNE else lr
    groups: dict[str, dict[str, Any]] = {}
    for name, param in seg.named_parameters():
        if not param.requires_grad:
            continue
        part = "backbone" if name.startswith("backbone.") else "decoder"
        no_decay = param.ndim <= 1 or name.endswith(_NO_DECAY_SUFFIXES)
        key = f"{part}_no_decay" if no_decay else part
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "lr": backbone_lr if part == "backbone" else lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
            },
        )
        group["params"].append(param)
    return list(groups.values())


def _excluded(seg: Segmenter, key: str) -> bool:
    """Base backbone weights that a frozen/lora checkpoint leaves out."""
    return seg.mode in (Mode.FROZEN, Mode.LORA) and key.startswith("backbone.") and "lora_" not in key


def state_for_checkpoint(seg: Segmenter) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: the whole state, minus the base backbone weights in frozen/lora mode.

    Tensors are detached CPU copies, contiguous and sharing no memory (as safetensors requires).

    Args:
        seg: the segmenter.
    """
    return {k: v.detach().cpu().contiguous().clone() for k, v in seg.state_dict().items() if not _excluded(seg, k)}


def checkpoint_metadata(seg: Segmenter) -> dict[str, str]:
    """String metadata to store beside :func:`state_for_checkpoint` (safetensors metadata is ``str → str``).

    Args:
        seg: the segmenter.
    """
    return {"mode": seg.mode, "backbone_fingerprint": fingerprint(seg.backbone) if seg.backbone is not None else ""}


def load_checkpoint_state(
    seg: Segmenter, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Load a checkpoint into a freshly built segmenter, strictly.

    Args:
        seg: built from the same model config as the checkpoint.
        state: tensors from :func:`state_for_checkpoint`.
        metadata: from :func:`checkpoint_metadata`; when given, the mode and (in frozen/lora mode) the backbone
            fingerprint must match, so a checkpoint never silently pairs with different base weights.
    """
    if metadata is not None:
        if metadata.get("mode", seg.mode) != seg.mode:
            raise ModelError(f"checkpoint was trained in mode '{metadata['mode']}', the model is built in '{seg.mode}'")
        stored = metadata.get("backbone_fingerprint", "")
        current = fingerprint(seg.backbone) if seg.backbone is not None else ""
        if stored != current:
            source = seg.backbone.source if seg.backbone is not None else "no backbone"
            raise ModelError(
                f"checkpoint backbone fingerprint {stored or '(none)'} does not match the loaded backbone "
                f"{current or '(none)'} ({source}): different pretrained weights"
            )
    expected = {k: v for k, v in seg.state_dict().items() if not _excluded(seg, k)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"checkpoint does not fit the model: {len(missing)} missing key(s) {_few(missing)}, "
            f"{len(unexpected)} unexpected key(s) {_few(unexpected)}"
        )
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise ModelError(
            f"checkpoint does not fit the model: {len(wrong)} tensor(s) of another shape, e.g. '{k}' "
            f"{tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        )
    seg.load_state_dict(dict(state), strict=False)


def _few(keys: list[str], n: int = 3) -> str:
    return "[" + ", ".join(keys[:n]) + (", …" if len(keys) > n else "") + "]"
