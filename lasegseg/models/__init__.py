"""Backbones, the decoder registry and the segmenter (backbone + decoder + training mode)."""

from __future__ import annotations

from lasegseg.models.backbones import (
    Backbone,
    BackboneFamily,
    backbone_family,
    build_backbone,
    check_backbone_name,
    fingerprint,
    list_backbone_families,
    list_backbones,
    register_backbone_family,
    tiny_backbone_dir,
    weights_fingerprint,
)
from lasegseg.models.decoders import create_decoder, decoder_spec, list_decoders, register_decoder
from lasegseg.models.segmenter import (
    Segmenter,
    build_segmenter,
    check_model_config,
    checkpoint_metadata,
    load_checkpoint_state,
    param_groups,
    state_for_checkpoint,
)

__all__ = [
    "Backbone",
    "BackboneFamily",
    "Segmenter",
    "backbone_family",
    "build_backbone",
    "build_segmenter",
    "check_backbone_name",
    "check_model_config",
    "checkpoint_metadata",
    "create_decoder",
    "decoder_spec",
    "fingerprint",
    "list_backbone_families",
    "list_backbones",
    "list_decoders",
    "load_checkpoint_state",
    "param_groups",
    "register_backbone_family",
    "register_decoder",
    "state_for_checkpoint",
    "tiny_backbone_dir",
    "weights_fingerprint",
]
