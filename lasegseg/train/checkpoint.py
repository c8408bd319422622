"""Model folders and resumable training state, without pickle.

A model folder is ``model.safetensors`` + ``config.json`` (format tag, the flat trial config, the backbone
fingerprint and the SHA-256 of the weights). Loading verifies the hash, rebuilds the model from the config
and reads tensors with safetensors only — a pickled or tampered file is refused.

Training state (for resume) is a folder too: the current weights, the optimizer state flattened into
safetensors, and a JSON with the epoch, scheduler step, best metrics and RNG states. :class:`CheckpointPolicy` says
after which epochs a trial saves it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lasegseg.config import Config, from_flat
from lasegseg.errors import ModelError
from lasegseg.fsio import atomic_dir, commit_dir, recover_dir, sha256_file, write_json_atomic
from lasegseg.models.backbones import fingerprint
from lasegseg.models.segmenter import build_segmenter, load_checkpoint_state, state_for_checkpoint

MODEL_FORMAT = "lasegseg-model-v1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_model(seg: torch.nn.Module, cfg: Config, folder: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a self-contained model folder atomically; returns ``folder``."""
    folder = Path(folder)
    tmp = atomic_dir(folder)
    try:
        save_file(_contiguous(state_for_checkpoint(seg)), str(tmp / WEIGHTS), metadata={"format": MODEL_FORMAT})
        meta = {
            "format": MODEL_FORMAT,
            "config": cfg.to_flat(),
            "backbone_fingerprint": _fingerprint(seg),
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            **(extra or {}),
        }
        write_json_atomic(tmp / CONFIG, meta)
        commit_dir(tmp, folder)
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"{folder}: could not write the model folder ({exc}); the previous one is unchanged") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _fingerprint(seg: torch.nn.Module) -> str | None:
    backbone = getattr(seg, "backbone", None)
    return fingerprint(backbone) if backbone is not None else None


def read_model_config(folder: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model folder, with clear errors for missing or foreign folders."""
    folder = Path(folder)
    cfg_path = folder / CONFIG
    if not folder.is_dir():
        raise ModelError(f"{folder}: model folder does not exist")
    if not cfg_path.is_file():
        raise ModelError(f"{cfg_path}: missing (not a lasegseg model folder)")
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT or not isinstance(meta.get("config"), dict):
        raise ModelError(f"{cfg_path}: not a {MODEL_FORMAT} config")
    return meta


def load_model(folder: Path, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict]:
    """Rebuild a segmenter from a model folder; refuses missing, tampered or non-safetensors weights."""
    folder = recover_dir(Path(folder))
    meta = read_model_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{weights}: missing")
    if sha256_file(weights) != meta.get("weights_sha256"):
        raise ModelError(f"{weights}: SHA-256 does not match config.json (file altered or replaced)")
    try:
        cfg = from_flat(meta["config"])
    except Exception as exc:
        raise ModelError(f"{folder / CONFIG}: {exc}") from None
    seg = build_segmenter(cfg.model)
    expected = meta.get("backbone_fingerprint")
    if expected is not None and _fingerprint(seg) != expected:
        raise ModelError(
            f"{folder / CONFIG}: backbone '{cfg.model.backbone}' loaded here differs from the one trained with"
        )
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: not a readable safetensors file ({exc})") from None
    load_checkpoint_state(seg, state)
    seg.eval()
    return seg, cfg, meta


# ---- resumable training state -------------------------------------------------------------------------------


def save_train_state(
    folder: Path,
    seg: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scalars: dict[str, Any],
    best_state: dict[str, torch.Tensor] | None,
    *,
    durable: bool = True,
) -> Path:
    """Everything needed to continue a trial bit-for-bit: weights, optimizer moments, counters, RNG.

    Args:
        folder: the training-state folder (replaced atomically).
        seg: the segmenter being trained.
        optimizer: its optimizer.
        scalars: JSON-able counters and history.
        best_state: the best weights so far, if any.
        durable: fsync the commit (see :func:`commit_dir`).
    """
    folder = Path(folder)
    tmp = atomic_dir(folder)
    try:
        save_file(state_for_checkpoint(seg), str(tmp / "current.safetensors"))  # already independent CPU copies
        if best_state is not None:
            save_file(_contiguous(best_state), str(tmp / "best.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng |= {f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
        save_file(_contiguous(rng), str(tmp / "rng.safetensors"))
        write_json_atomic(tmp / "state.json", {"scalars": scalars, "optimizer": opt_meta}, durable=durable)
        commit_dir(tmp, folder, durable=durable)
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"{folder}: could not write the checkpoint ({exc}); the previous one is unchanged") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_train_state(
    folder: Path, seg: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore what :func:`save_train_state` wrote; returns (scalars, best weights or None)."""
    folder = recover_dir(Path(folder))
    try:
        meta = json.loads((folder / "state.json").read_text())
        load_checkpoint_state(seg, load_file(str(folder / "current.safetensors")))
        _restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), meta["optimizer"])
        rng = load_file(str(folder / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        cuda_states = [rng[f"cuda{i}"] for i in range(len(rng) - 1) if f"cuda{i}" in rng]
        if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        best_path = folder / "best.safetensors"
        best = load_file(str(best_path)) if best_path.is_file() else None
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise ModelError(f"{folder}: unreadable training checkpoint ({exc})") from None
    return meta["scalars"], best


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---- when a trial saves its training state ------------------------------------------------------------------

AUTO_CHECKPOINT_FACTOR = 19.0  # train 19× a save's cost between saves: saving is ≤ 5 % of the time


@dataclass
class CheckpointPolicy:
    """When a trial saves its training state (``train.checkpoint_every`` / ``train.checkpoint_interval_s``).

    Due after an epoch when ``every`` divides the epoch count, or ``interval_s`` seconds have passed since the
    last save; with neither set, when the time since the last save reaches :data:`AUTO_CHECKPOINT_FACTOR` × the
    last save's cost (the first epoch always saves, which measures it).
    """

    every: int = 0
    interval_s: float = 0.0
    last_at: float = field(default_factory=time.perf_counter)
    cost_s: float = 0.0
    saves: int = 0
    spent_s: float = 0.0

    @classmethod
    def of(cls, cfg: Config) -> CheckpointPolicy:
        return cls(cfg.train.checkpoint_every, cfg.train.checkpoint_interval_s)

    def due(self, epoch: int, now: float | None = None) -> bool:
        """Whether to save after ``epoch`` (0-based)."""
        elapsed = (time.perf_counter() if now is None else now) - self.last_at
        if self.every and (epoch + 1) % self.every == 0:
            return True
        if self.interval_s:
            return elapsed >= self.interval_s
        return not self.every and elapsed >= AUTO_CHECKPOINT_FACTOR * self.cost_s

    def record(self, started: float, ended: float) -> None:
        """A save (and its hand-over) ran from ``started`` to ``ended`` (``time.perf_counter``)."""
        self.cost_s, self.last_at, self.saves = ended - started, ended, self.saves + 1
        self.spent_s += self.cost_s
