"""An S3 API server on loopback for the storage tests, a ``ray.init`` that only records what it was given, and a
small sweep definition."""

from __future__ import annotations

import os

import pytest

from tests.object_store import S3Server


def sweep_spec(**extra) -> dict:
    """A small sweep YAML's content (2 decoders × 2 modes × 2 few-shot sizes × 2 seeds); ``extra`` replaces keys."""
    raw = {
        "name": "t",
        "base": {"train.epochs": 2, "data.image_size": 56},
        "grid": {"model.decoder": ["linear", "multiscale"], "model.mode": ["frozen", "finetune"]},
        "fewshot": [{"data.patients": 2}, {"data.fraction": 0.5}],
        "seeds": [0, 1],
    }
    raw.update(extra)
    return raw


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3


class _FakeRay:
    """``ray.init`` that records the environment the cluster's processes would inherit."""

    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.calls.append((kwargs, dict(os.environ)))


@pytest.fixture
def fake_ray(monkeypatch):
    import ray
    from ray.tune.execution import class_cache

    fake = _FakeRay()
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(class_cache, "DEFAULT_ENV_VARS", {"PL_DISABLE_FORK": "1"})
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_preload_python_modules", "RAY_num_workers_soft_limit"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    # The driver keeps this one on purpose (Tune reads it in this process); set here, so the test restores it.
    monkeypatch.setenv("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return fake
