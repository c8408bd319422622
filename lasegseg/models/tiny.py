"""Tiny random backbones: one per family (and DINOv2's with-registers variant), and a stand-in per named size, created
once per cache folder.

A tiny model is drawn from a fixed seed (numpy's PCG64, so its weights do not depend on the torch version) and saved
as safetensors under ``<cache>/backbones/<tiny name>[-reg]`` (``tiny``, ``tiny-reg``, ``tiny-dinov3``); it is then
loaded with ``from_pretrained`` like any real backbone. A stand-in (``stand-in-<family>-<size>[-reg]``) is the same
tiny model with as many blocks as the named size's layer table reaches (40 for ``dinov2-giant``), so that it is
tapped at the real model's blocks, and with weights seeded from its name, so that two named sizes never share
features. Processes that race to create a folder publish with :func:`lasegseg.fsio.publish_dir`: the first folder
wins.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lasegseg.errors import ModelError
from lasegseg.fsio import publish_dir
from lasegseg.models.families import backbone_family
from lasegseg.models.loading import progress_bars
from lasegseg.paths import cache_root

TINY_SEED = 0
STAND_IN_PREFIX = "stand-in-"


def tiny_backbone_dir(*, registers: bool = False, family: str = "dinov2") -> Path:
    """The folder of a family's tiny random model, created on first use (safe when processes race).

    Args:
        registers: the with-registers variant (``tiny-reg``; DINOv2 only).
        family: a registered backbone family.
    """
    tiny_name = backbone_family(family).tiny_name
    final = cache_root() / "backbones" / (f"{tiny_name}-reg" if registers else tiny_name)
    if not _complete(final):
        _create_tiny(final, registers=registers, family=family)
    return final


def stand_in_dir(family: str, size: str, *, registers: bool = False) -> Path:
    """The folder of the tiny random stand-in of the named size ``<family>-<size>``, created on first use.

    The stand-in is the family's tiny model (its width, patch size and register tokens) with as many blocks as the
    size's layer table needs, so the decoders tap the same block indices as on the real model, and with weights
    drawn from a seed of its own name (:func:`stand_in_seed`).

    Args:
        family: a registered backbone family.
        size: one of its named sizes.
        registers: the with-registers variant (DINOv2 only).
    """
    fam = backbone_family(family)
    if size not in fam.sizes:
        raise ModelError(f"backbone family '{family}' has no size '{size}' (sizes: {', '.join(fam.sizes)})")
    final = cache_root() / "backbones" / f"{STAND_IN_PREFIX}{fam.name}-{size}{'-reg' if registers else ''}"
    if not _complete(final):
        depth = max(fam.layer_indices[size]) + 1
        _create_tiny(final, registers=registers, family=family, depth=depth, seed=stand_in_seed(final.name))
    return final


def stand_in_seed(folder_name: str) -> int:
    """The weights' seed of a stand-in: 64 bits of the sha256 of its folder name (the same on every machine)."""
    return int.from_bytes(hashlib.sha256(folder_name.encode()).digest()[:8], "big")


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _create_tiny(
    final: Path, *, registers: bool, family: str = "dinov2", depth: int | None = None, seed: int = TINY_SEED
) -> None:
    """Write a family's tiny model (``depth`` blocks, else the tiny config's; weights from ``seed``) to a temporary
    sibling folder and publish it (the first complete one wins)."""
    import transformers  # deferred: heavy (transformers, seconds; only the first use per cache folder creates)

    fam = backbone_family(family)
    model_type = next((t for t in fam.model_classes if (t in fam.registers_model_types) == registers), None)
    if model_type is None:
        raise ModelError(f"backbone family '{family}' has no model {'with' if registers else 'without'} registers")
    fields = {**fam.tiny_config, **fam.load_config, "patch_size": fam.patch_size}
    if depth is not None:
        fields["num_hidden_layers"] = depth
    if registers or fam.single_variant:
        fields["num_register_tokens"] = fam.tiny_num_registers
    model_class = getattr(transformers, fam.model_classes[model_type])
    # transformers' random init draws from torch's global generator; without the fork the first trial on a fresh
    # machine (the one that creates this folder) would initialise its decoder from a different RNG state.
    with torch.random.fork_rng(devices=[]):
        model: nn.Module = model_class(transformers.AutoConfig.for_model(model_type, **fields))
    _seed_weights(model, seed)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        with progress_bars(enabled=False):
            model.save_pretrained(tmp, safe_serialization=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        publish_dir(tmp, final, complete=_complete)
    except OSError as exc:  # a folder is in the way that is not a complete tiny model
        raise ModelError(f"cannot create the tiny backbone at '{final}' (remove that folder): {exc}") from exc


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
