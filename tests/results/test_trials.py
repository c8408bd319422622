"""Reading a sweep's trial runs back from a sqlite MLflow store written as the sweep writes it."""

from __future__ import annotations

import logging
import socket
import time

import numpy as np
import pytest

from lasegseg.config import Config, config_hash
from lasegseg.errors import LasegsegError
from lasegseg.results import trials as trials_module
from lasegseg.results.trials import load_trials
from tests.results.conftest import DECODERS, EXPERIMENT, MODES, PATIENTS, SEEDS


def test_load_trials_types_and_parent_filter(store, trials):
    assert len(trials) == len(DECODERS) * len(MODES) * len(PATIENTS) * len(SEEDS)
    assert set(trials["status"]) == {"FINISHED"}
    assert set(trials["parent_run_id"]) == {store["parent"]}
    assert "conv" not in set(trials["model.decoder"])
    assert trials["data.fraction"].dtype == np.float64 and trials["data.patients"].dtype == np.int64
    assert trials["optim.lr"].iloc[0] == pytest.approx(3e-4) and trials["model.registers"].dtype == bool
    assert set(trials["data.patients"]) == set(PATIENTS) and set(trials["data.cache_dir"]) == {""}
    assert trials.attrs["skipped"] == {"FAILED": 1}
    # The cell column matches the tag the sweep wrote.
    flat = Config().replace(**trials.iloc[0][list(Config().to_flat())].to_dict()).to_flat()
    assert trials["cell"].iloc[0] == config_hash(flat, exclude=("seed",))

    everything = load_trials(store["uri"], EXPERIMENT)
    assert len(everything) == len(trials) + 2 and "conv" in set(everything["model.decoder"])


def test_load_trials_paginates(store, trials, monkeypatch):
    monkeypatch.setattr(trials_module, "_PAGE_SIZE", 5)
    paged = load_trials(store["uri"], EXPERIMENT, store["parent"])
    assert sorted(paged["run_id"]) == sorted(trials["run_id"])


def test_failed_trials_are_noted(store, caplog):
    with caplog.at_level(logging.WARNING, logger="lasegseg.results.trials"):
        load_trials(store["uri"], EXPERIMENT, store["parent"])
    assert "1 FAILED" in caplog.text


def test_unknown_and_empty_experiments(store):
    with pytest.raises(LasegsegError, match="experiment 'nope' not found"):
        load_trials(store["uri"], "nope")
    with pytest.raises(LasegsegError, match="no finished trial runs"):
        load_trials(store["uri"], "empty")


def test_unreachable_stores_fail_fast(tmp_path):
    with pytest.raises(LasegsegError, match="no MLflow database"):
        load_trials(f"sqlite:///{tmp_path}/missing.db", EXPERIMENT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        start = time.monotonic()
        with pytest.raises(LasegsegError, match="unreachable"):
            load_trials(f"http://127.0.0.1:{port}", EXPERIMENT)
    assert time.monotonic() - start < 10
