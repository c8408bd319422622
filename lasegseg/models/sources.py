"""Backbone names → where the weights come from: a registered short name, a hub id (``org/name``) or a folder.

:func:`resolve_source` is the one reading of a ``model.backbone`` value: a family's named size becomes its hub id
(with its layer table), its tiny name the tiny model's folder (created on first use), ``none`` and unknown names are
errors that list the valid ones. Nothing here loads weights.

The stand-in switch: with ``$LASEGSEG_STAND_IN_BACKBONES=1`` (``--stand-in-backbones`` of a sweep) every named size
resolves to its tiny random stand-in of the same family instead (:func:`~lasegseg.models.tiny.stand_in_dir`), with
the real size's layer table; tiny names, hub ids and folders are left as they are. A rehearsal of a study thus runs
its sweep file unchanged, with every trial shrunk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lasegseg.errors import ConfigError, ModelError
from lasegseg.models.families import FAMILIES, list_backbones, single_variant_message
from lasegseg.models.tiny import stand_in_dir, tiny_backbone_dir

NONE = "none"
STAND_IN_ENV = "LASEGSEG_STAND_IN_BACKBONES"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def backbone_source(name: str, *, registers: bool = False) -> str:
    """The source :func:`~lasegseg.models.backbones.build_backbone` loads ``name`` from (hub id or folder;
    :attr:`~lasegseg.models.backbones.Backbone.source`), without loading it.

    Args:
        name: as for :func:`~lasegseg.models.backbones.build_backbone`.
        registers: as for :func:`~lasegseg.models.backbones.build_backbone`.
    """
    return resolve_source(name, registers=registers)[0]


def check_backbone_name(name: str, *, registers: bool = False) -> None:
    """Fail early on a name :func:`~lasegseg.models.backbones.build_backbone` cannot resolve, without loading or
    creating anything.

    Args:
        name: as for :func:`~lasegseg.models.backbones.build_backbone`; a hub id is accepted without contacting the
            hub.
        registers: as for :func:`~lasegseg.models.backbones.build_backbone`.
    """
    resolve_source(name, registers=registers, create=False)


def stand_ins_enabled() -> bool:
    """Whether named backbones resolve to their tiny random stand-ins: ``$LASEGSEG_STAND_IN_BACKBONES`` is ``1``
    (unset, blank or ``0``: the real models; anything else is a ConfigError naming the variable)."""
    text = os.environ.get(STAND_IN_ENV, "").strip()
    if text not in ("", "0", "1"):
        raise ConfigError(f"{STAND_IN_ENV} must be 1 (stand-in backbones) or 0, got '{text}'")
    return text == "1"


def resolve_source(name: str, *, registers: bool, create: bool = True) -> tuple[str, str | None, bool]:
    """``name`` → (source for ``from_pretrained``, size key of the layer table or None, source is local).

    Args:
        name: a backbone short name (:func:`~lasegseg.models.families.list_backbones`), a hub id or a folder.
        registers: the with-registers variant; refused for a family with one variant.
        create: create a tiny model's or stand-in's folder if it is missing (false: its name stands for the folder).
    """
    if name == NONE:
        raise ModelError("backbone 'none' has no model (it selects the decoder-only baseline, model.decoder=unet)")
    for family in FAMILIES.values():
        size = name.removeprefix(f"{family.name}-")
        named = name.startswith(f"{family.name}-") and size in family.sizes
        if (named or name == family.tiny_name) and registers and family.single_variant:
            raise ModelError(single_variant_message(name, family))
        if name == family.tiny_name:
            return str(tiny_backbone_dir(registers=registers, family=family.name) if create else name), "tiny", True
        if named and stand_ins_enabled():
            return str(stand_in_dir(family.name, size, registers=registers) if create else name), size, True
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
