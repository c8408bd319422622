"""Backbones, the decoder registry and the segmenter (backbone + decoder + training mode).

What lives where:

- ``families``: the backbone family registry (DINOv2, DINOv3): sizes, layer tables, hub ids, model classes, LoRA
  targets, tiny configs; the list of backbone short names.
- ``sources``: a ``model.backbone`` value → where its weights come from (hub id or folder), without loading.
- ``loading``: reading a transformers model of a registered family from a folder or hub id.
- ``tiny``: the seeded tiny random backbones, created once per cache folder.
- ``backbones``: :class:`Backbone` (grayscale batch → patch-feature maps), its weightless stub, ``build_backbone``,
  the weights' fingerprint and the LoRA target modules.
- ``decoders``: the decoder registry and its decoders.
- ``segmenter``: backbone + decoder + training mode, optimiser groups and checkpoint state.
"""

from __future__ import annotations

from lasegseg.models.backbones import Backbone, build_backbone, fingerprint, weights_fingerprint
from lasegseg.models.decoders import create_decoder, decoder_spec, list_decoders, register_decoder
from lasegseg.models.families import (
    BackboneFamily,
    backbone_family,
    list_backbone_families,
    list_backbones,
    register_backbone_family,
)
from lasegseg.models.segmenter import (
    Segmenter,
    build_segmenter,
    check_model_config,
    checkpoint_metadata,
    load_checkpoint_state,
    param_groups,
    state_for_checkpoint,
)
from lasegseg.models.sources import check_backbone_name
from lasegseg.models.tiny import tiny_backbone_dir

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
