"""Slice-wise inference shared by validation, testing and ``lasegseg predict``; the host → device copy and the
autocast every pass uses."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from lasegseg.data.preprocess import resize_back


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast on GPU (``amp`` auto/bf16), on CPU only when asked for explicitly."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device copy; on CUDA through pinned memory without blocking (torch's host allocator reuses it)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


@torch.inference_mode()
def predict_slices(
    model: torch.nn.Module,
    slices: np.ndarray,
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    amp: str = "auto",
    flip_tta: bool = False,
) -> np.ndarray:
    """Foreground probability for each slice of ``slices`` (Z, S, S) in [0, 1] → float32 (Z, S, S)."""
    device = torch.device(device)
    out = np.empty(slices.shape, dtype=np.float32)
    for start in range(0, len(slices), batch_size):
        x = torch.from_numpy(np.asarray(slices[start : start + batch_size], dtype=np.float32))[:, None].to(device)
        with autocast_context(device, amp):
            prob = torch.softmax(model(x).float(), dim=1)[:, 1]
            if flip_tta:
                flipped = torch.softmax(model(torch.flip(x, dims=(-1,))).float(), dim=1)[:, 1]
                prob = 0.5 * (prob + torch.flip(flipped, dims=(-1,)))
        out[start : start + len(x)] = prob.float().cpu().numpy()
    return out


def probabilities_to_native(probs: np.ndarray, native_xy: tuple[int, int]) -> np.ndarray:
    """(Z, S, S) slice probabilities → (X, Y, Z) at the native in-plane size, linearly interpolated."""
    return resize_back(np.ascontiguousarray(np.moveaxis(probs, 0, -1)), native_xy, order=1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component of a boolean mask (the LA is one connected structure)."""
    from scipy.ndimage import label  # deferred: heavy (scipy.ndimage, ~0.35 s; only when asked for)

    labelled, n = label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(sizes.argmax())
