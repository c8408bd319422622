"""The backbone family registry: one entry per family of ViT backbones in transformers (DINOv2, DINOv3).

A family is one registry entry (:class:`BackboneFamily`): its patch size, named sizes and their layer tables, hub
ids, transformers model classes, LoRA target modules and tiny random config. Its names, patch size and variants are
declared in :data:`lasegseg.config_checks.BACKBONE_FAMILIES` as well, so that the config checks ``model.backbone``,
``model.registers`` and ``data.image_size`` without importing torch; registering a family that disagrees with it,
or declaring one that is never registered, fails. Adding a family is one :func:`register_backbone_family` call here
and its line there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lasegseg.config_checks import BACKBONE_FAMILIES, FamilyDeclaration
from lasegseg.errors import ModelError
from lasegseg.registry import Registry


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


FAMILIES: Registry[BackboneFamily] = Registry(
    "backbone family", "families", ModelError, declared=BACKBONE_FAMILIES,
    declared_in="lasegseg.config_checks.BACKBONE_FAMILIES",
)  # fmt: skip


def register_backbone_family(family: BackboneFamily) -> BackboneFamily:
    """Register a backbone family; its tiny name and named sizes become backbone names.

    Args:
        family: the entry; registering a name twice, or a family that
            :data:`lasegseg.config_checks.BACKBONE_FAMILIES` does not declare as it is, is an error.
    """
    declared = FamilyDeclaration(
        family.display_name, family.patch_size, family.tiny_name, family.sizes, family.single_variant
    )
    if BACKBONE_FAMILIES.get(family.name) != declared:
        raise ValueError(
            f"backbone family '{family.name}' must be declared as {declared} in "
            f"lasegseg.config_checks.BACKBONE_FAMILIES, which the config checks without torch"
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


def family_of_model_type(model_type: str) -> BackboneFamily | None:
    """The family whose transformers models include ``model_type``, or None.

    Args:
        model_type: a transformers config's ``model_type``.
    """
    return next((f for f in FAMILIES.values() if model_type in f.model_classes), None)


def list_backbones() -> list[str]:
    """The backbone short names (per family: its tiny model, then its sizes); any hub id (``org/name``) or local
    folder is accepted as well."""
    return [n for f in FAMILIES.values() for n in (f.tiny_name, *(f"{f.name}-{size}" for size in f.sizes))]


def family_display_names() -> str:
    """The registered families for messages: ``DINOv2 or DINOv3``."""
    return " or ".join(f.display_name for f in FAMILIES.values())


def single_variant_message(name: str, family: BackboneFamily) -> str:
    """Why ``model.registers=true`` is refused for backbone ``name`` of a one-variant family."""
    return (
        f"model.registers=true but backbone '{name}' is a {family.display_name}, which has one variant (its models "
        f"always carry their register tokens): leave model.registers false"
    )


def even_indices(num_layers: int, n: int = 4) -> list[int]:
    """``n`` evenly spaced blocks ending at the last one (12 layers → [2, 5, 8, 11]): the layer table of an
    architecture no family names.

    Args:
        num_layers: transformer blocks of the model.
        n: taps wanted.
    """
    if num_layers <= n:
        return list(range(num_layers))
    return [round((k + 1) * num_layers / n) - 1 for k in range(n)]


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

FAMILIES.check_complete()
