"""The backbone module: a model of a registered family that maps a grayscale batch to patch-feature maps.

:func:`build_backbone` resolves a name (:mod:`~lasegseg.models.sources`), loads the model
(:mod:`~lasegseg.models.loading`) and picks its layer table (:mod:`~lasegseg.models.families`); :class:`Backbone`
runs it, :class:`BackboneStub` stands in for a frozen one whose features were computed beforehand. The weights'
fingerprint, taken at load time, identifies the source in checkpoints; :func:`lora_target_modules` names the
projections LoRA adapts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lasegseg.errors import ModelError
from lasegseg.models.families import (
    backbone_family,
    even_indices,
    family_display_names,
    family_of_model_type,
    single_variant_message,
)
from lasegseg.models.loading import load_model
from lasegseg.models.sources import resolve_source

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FINGERPRINT_BYTES = 4096


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
        family = family_of_model_type(cfg.model_type)
        if family is None:
            raise ModelError(f"backbone '{source}' is a '{cfg.model_type}' model, not {family_display_names()}")
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


def build_backbone(name: str, *, registers: bool = False, gradient_checkpointing: bool = False) -> Backbone:
    """Load a backbone of a registered family.

    Args:
        name: ``tiny``, ``dinov2-small|base|large|giant``, ``tiny-dinov3``,
            ``dinov3-small|small-plus|base|large|huge-plus|7b`` (see
            :func:`~lasegseg.models.families.list_backbones`), a hub id (``org/name``) or a local folder.
        registers: pick DINOv2's with-registers variant of ``tiny`` and the named sizes; a hub id or folder is what
            its config says, and asking for registers on one without them is an error. DINOv3 models always have
            their register tokens and no separate variant: true is refused for them.
        gradient_checkpointing: recompute activations in backward (for large/giant when fine-tuning).
    """
    source, size, local = resolve_source(name, registers=registers)
    model = load_model(source, local=local)
    config = model.config
    family = family_of_model_type(config.model_type)  # never None: load_model accepts only registered model types
    if registers and family.single_variant:
        raise ModelError(single_variant_message(name, family))
    if registers and config.model_type not in family.registers_model_types:
        raise ModelError(
            f"model.registers=true but backbone '{name}' ({source}) is a {family.display_name} without registers"
        )
    if size is None:
        size = family.arch_sizes.get((config.hidden_size, config.num_hidden_layers))
    indices = family.layer_indices[size] if size else even_indices(config.num_hidden_layers)
    backbone = Backbone(model, indices, source=source)
    if gradient_checkpointing:
        backbone.set_gradient_checkpointing(True)
    return backbone


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
