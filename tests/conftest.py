"""Shared fixtures: a private cache folder for the session, a small phantom dataset and an untrained model folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One intra-op thread per test process: OpenMP spin-waiting on a busy 2-core machine costs 50x on small ops.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Keep the slice cache and the tiny backbone out of the user's ~/.cache during tests."""
    old = os.environ.get("LASEGSEG_CACHE")
    os.environ["LASEGSEG_CACHE"] = str(tmp_path_factory.mktemp("lasegseg-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield
    if old is None:
        os.environ.pop("LASEGSEG_CACHE", None)
    else:
        os.environ["LASEGSEG_CACHE"] = old


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Six seeded phantom patients in the MSD layout (4 train / 1 val / 1 test with the default split)."""
    from lasegseg.data.phantom import write_phantom

    root = tmp_path_factory.mktemp("phantom") / "msd"
    write_phantom(root, cases=6, seed=0, layout="msd")
    return root


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory) -> Path:
    """An untrained tiny segmenter saved as a model folder (safetensors + config.json)."""
    import torch

    from lasegseg.models.segmenter import build_segmenter
    from lasegseg.train.checkpoint import save_model
    from tests.export.conftest import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(**{"data.path": "/data/phantom"})
    return save_model(build_segmenter(cfg.model), cfg, tmp_path_factory.mktemp("model") / "model")
