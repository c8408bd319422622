"""lasegseg: DINOv2 left-atrium segmenters, few-shot sweeps on Ray Tune tracked in MLflow, export and prediction.

``lasegseg.load_model(src)`` (see :mod:`lasegseg.api`) is imported lazily so ``import lasegseg`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from lasegseg.api import load_model  # deferred: start-up (torch)

        return load_model
    raise AttributeError(f"module 'lasegseg' has no attribute '{name}'")
