"""Frozen-backbone features: their key, their file format, and the memory-mapped reader of one cache.

In frozen mode the backbone output of a cached slice never changes, so a sweep computes it once per distinct
backbone and every frozen decoder trains and evaluates on it (no backbone pass per epoch). A cache stores only the
levels its readers need (a decoder declares them in its registry entry; see
:func:`~lasegseg.models.decoders.decoder_levels`). Layout of ``<slice cache dir>/features/<key>/``::

    level_<i>.npy    one per stored level i (an index into the backbone's layer taps, 0 = shallowest): float16
                     (N, h, w, C), row r is slice row r of the slice cache, stored channels-last so a batch becomes
                     a channels-last (B, C, h, w) view for free
    manifest.json    version, key, backbone source + fingerprint + layer taps, the stored levels and their blocks,
                     slice-cache key, rows, and bytes + sha256 of every level file

``key`` hashes the backbone fingerprint, its layer taps, the stored levels, the slice-cache key (dataset content +
preprocessing), the image size, the compute precision and the storage dtype. :meth:`FeatureCache.open` verifies a
folder against its manifest; a damaged one is refused. Building a cache (once across processes) is
:mod:`lasegseg.train.feature_build`; holding or prefetching a trial's training rows on its device is
:mod:`lasegseg.train.feature_residency`; which cache a sweep's trial reads is :mod:`lasegseg.train.feature_plan`.
Pure compute: no ray, no mlflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lasegseg.errors import DataError
from lasegseg.fsio import sha256_file
from lasegseg.models.backbones import fingerprint
from lasegseg.train.inference import autocast_context, to_device

# 2: a cache stores only the requested levels (``levels`` in the manifest and the key).
FEATURES_VERSION = 2
FEATURES_DIR = "features"
MANIFEST_FILE = "manifest.json"
STORAGE_DTYPE = "float16"


def features_root(cache: Any) -> Path:
    """``<slice cache dir>/features``: beside the slice caches, so a cache folder's files stay immutable.

    Args:
        cache: an open :class:`~lasegseg.data.cache.SliceCache`.
    """
    return Path(cache.path).parent / FEATURES_DIR


def compute_precision(device: torch.device, amp: str) -> str:
    """``bf16`` when the backbone pass runs under bf16 autocast (GPU, ``amp`` auto/bf16), else ``fp32``."""
    return "fp32" if isinstance(autocast_context(device, amp), contextlib.nullcontext) else "bf16"


def level_file(level: int) -> str:
    """The file name of a stored level (an index into the backbone's layer taps)."""
    return f"level_{level}.npy"


def feature_identity(backbone: Any, cache: Any, precision: str) -> dict[str, Any]:
    """Everything a feature cache's values depend on: recorded in its manifest, hashed (with its levels) into its key.

    Args:
        backbone: a :class:`~lasegseg.models.backbones.Backbone`.
        cache: the slice cache.
        precision: ``fp32`` or ``bf16`` (see :func:`compute_precision`).
    """
    return {
        "version": FEATURES_VERSION,
        "backbone_fingerprint": fingerprint(backbone),
        "layer_indices": list(backbone.layer_indices),
        "slice_cache": cache.key,
        "image_size": int(cache.image_size),
        "precision": precision,
        "dtype": STORAGE_DTYPE,
    }


def stored_levels(backbone: Any, levels: Iterable[int] | None) -> tuple[int, ...]:
    """``levels`` as a cache stores them: valid for ``backbone``, distinct, sorted; None means every tapped level."""
    return tuple(sorted(backbone.check_levels(None if levels is None else list(levels))))


def feature_key(backbone: Any, cache: Any, precision: str, levels: Iterable[int] | None = None) -> str:
    """The folder name of the features of ``backbone``'s ``levels`` over ``cache``.

    Args:
        backbone: a :class:`~lasegseg.models.backbones.Backbone`.
        cache: the slice cache.
        precision: ``fp32`` or ``bf16`` (see :func:`compute_precision`).
        levels: indices into ``backbone.layer_indices``; None for all.
    """
    identity = feature_identity(backbone, cache, precision)
    payload = {**identity, "levels": list(stored_levels(backbone, levels))}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{identity['backbone_fingerprint']}-{digest}"


class FeatureCache:
    """Read-only memory-mapped features of one backbone over one slice cache, read as some of the levels it stores.

    Args:
        path: the feature folder.
        manifest: its parsed ``manifest.json``.
        levels: the levels :meth:`batch` returns, in this order (use :meth:`reader`); None for every stored one.

    Attributes:
        stored: the levels the folder holds (indices into the backbone's layer taps), sorted.
        maps: ``{level: read-only float16 (N, h, w, C) memmap}`` for every stored level.
        levels: the levels :meth:`batch` returns.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], levels: Sequence[int] | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.stored = tuple(int(i) for i in manifest["levels"])
        self.maps = {i: np.load(self.path / level_file(i), mmap_mode="r") for i in self.stored}
        self.levels = self.stored if levels is None else tuple(levels)

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: Literal["full", "size"] = "full") -> FeatureCache:
        """Open and verify a feature folder; raises :class:`DataError` naming the damaged file.

        Args:
            path: ``<features root>/<key>``.
            verify: ``full`` rehashes every level file; ``size`` checks sizes and shapes only (for trials opening a
                cache the sweep driver verified).
        """
        path = Path(path)
        mpath = path / MANIFEST_FILE
        try:
            manifest = json.loads(mpath.read_text())
            files = manifest["files"]
            rows = int(manifest["rows"])
            names = {level_file(int(i)) for i in manifest["levels"]}
        except OSError as err:
            raise DataError(f"feature manifest '{mpath}' cannot be read: {err.strerror}") from None
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"feature manifest '{mpath}' is damaged ({type(err).__name__}: {err})") from None
        if manifest.get("version") != FEATURES_VERSION or manifest.get("key") != path.name:
            raise DataError(f"feature manifest '{mpath}' is for another version or key")
        if set(files) != names or not names:
            raise DataError(f"feature manifest '{mpath}' lists files {sorted(files)} for levels {manifest['levels']}")
        for name, record in files.items():
            fpath = path / name
            try:
                size = fpath.stat().st_size
            except OSError:
                raise DataError(f"feature file '{fpath}' is missing") from None
            if size != record["bytes"]:
                raise DataError(f"feature file '{fpath}' is truncated or altered: {size} bytes, manifest says "
                                f"{record['bytes']}")  # fmt: skip
            if verify == "full" and sha256_file(fpath) != record["sha256"]:
                raise DataError(f"feature file '{fpath}' is corrupt: its sha256 does not match the manifest")
        try:
            out = cls(path, manifest)
        except (OSError, ValueError) as err:
            raise DataError(f"feature cache '{path}' cannot be memory-mapped: {err}") from None
        for i, level in out.maps.items():
            if level.dtype != np.float16 or level.ndim != 4 or level.shape[0] != rows:
                raise DataError(f"feature file '{path / level_file(i)}' has shape {level.shape} {level.dtype}, "
                                f"expected ({rows}, h, w, C) float16")  # fmt: skip
        return out

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def matches(self, backbone: Any, cache: Any) -> bool:
        """Whether these are the features of ``backbone``'s weights over ``cache``'s slices."""

        m = self.manifest
        return (
            m.get("backbone_fingerprint") == fingerprint(backbone)
            and m.get("layer_indices") == list(backbone.layer_indices)
            and m.get("slice_cache") == cache.key
            and int(m.get("rows", -1)) == len(cache)
        )

    def holds(self, levels: Iterable[int]) -> bool:
        """Whether this folder stores every one of ``levels``."""
        return set(levels) <= set(self.stored)

    def reader(self, levels: Sequence[int]) -> FeatureCache:
        """This cache read as ``levels`` (a decoder's, in its order): :meth:`batch` returns exactly their maps.

        Args:
            levels: indices into the backbone's layer taps; each must be stored (DataError names the missing ones).
        """
        levels = tuple(int(i) for i in levels)
        missing = sorted(set(levels) - set(self.stored))
        if missing:
            raise DataError(f"feature cache '{self.path}' stores levels {list(self.stored)}, not {missing}")
        return FeatureCache(self.path, self.manifest, levels)

    def batch(self, rows: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        """Float32 channels-last ``(B, C, h, w)`` maps of ``rows`` on ``device``, one per level in :attr:`levels`.

        fp16 crosses to the device (half the bytes, pinned and non-blocking on CUDA) and is widened there.

        Args:
            rows: sorted slice-cache row indices (sorted rows read sequential pages).
            device: where the decoder runs.
        """
        return [widen(half) for half in self.send(rows, device)]

    def send(self, rows: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        """The fp16 ``(B, h, w, C)`` maps of ``rows`` on ``device`` as stored, one per level (:meth:`batch` before
        :func:`widen`)."""
        return [to_device(torch.from_numpy(np.ascontiguousarray(self.maps[i][rows])), device) for i in self.levels]

    def batches(self, batches: Iterable[np.ndarray], device: torch.device) -> Iterator[list[torch.Tensor]]:
        """:meth:`batch` of every row batch of ``batches``, in order (an epoch's reads; see
        :func:`~lasegseg.train.feature_residency.for_training`).

        Args:
            batches: sorted slice-cache row indices, one array per batch.
            device: where the decoder runs.
        """
        for rows in batches:
            yield self.batch(rows, device)

    def row_bytes(self) -> int:
        """Bytes of one slice row's maps over :attr:`levels` as stored (fp16)."""
        return sum(int(np.prod(self.maps[i].shape[1:])) * self.maps[i].itemsize for i in self.levels)

    def __reduce__(self):
        return (_reopen, (str(self.path), self.levels))


def widen(half: torch.Tensor) -> torch.Tensor:
    """A stored fp16 ``(B, h, w, C)`` map as the decoder reads it: float32, a channels-last ``(B, C, h, w)`` view."""
    return half.float().permute(0, 3, 1, 2)


def _reopen(path: str, levels: tuple[int, ...]) -> FeatureCache:
    return FeatureCache.open(path, verify="size").reader(levels)
