"""A trial's training features: held on its device within a budget, else prefetched on a thread, else read from the
map; every path gives the memory-mapped values exactly and trains alike."""

from __future__ import annotations

import itertools
import pickle
import threading

import numpy as np
import pytest
import torch

from lasegseg.train import feature_residency as R
from lasegseg.train import features as F
from lasegseg.train import trial_data
from lasegseg.train.trial import run_trial
from lasegseg.train.trial_data import prepare_data
from tests.train.conftest import ALL, LAST, features_cfg


def _row_batches(rows: np.ndarray, size: int) -> list[np.ndarray]:
    order = np.random.default_rng(0).permutation(rows)
    return [np.sort(order[start : start + size]) for start in range(0, len(order), size)]


def _assert_same(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)


def test_held_training_rows_give_the_memory_mapped_batches_exactly(built):
    cache, _, feats = built
    reader = feats.reader((3, 0))
    train = np.arange(3, len(cache), 2)
    held = R.ResidentFeatures(reader, train, "cpu")
    assert held.levels == (3, 0) and np.array_equal(held.rows, train)
    assert [tuple(t.shape) for t in held.store] == [(len(train), *feats.maps[i].shape[1:]) for i in (3, 0)]
    cpu = torch.device("cpu")
    for rows in _row_batches(train, 5):
        _assert_same(held.batch(rows, cpu), reader.batch(rows, cpu))
    # Rows it does not hold (validation, test) are read from the map.
    other = np.array([0, 2, 3])
    assert held.positions(other) is None and held.positions(np.array([], np.int64)) is None
    _assert_same(held.batch(other, cpu), reader.batch(other, cpu))
    assert type(pickle.loads(pickle.dumps(held))) is F.FeatureCache  # a Ray worker gets the plain reader


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "feature-prefetch"]


def test_prefetched_batches_come_in_order_with_the_memory_mapped_values(built):
    cache, _, feats = built
    cpu = torch.device("cpu")
    reader = feats.reader(ALL)  # the files now in the folder (an earlier test rebuilt them)
    batches = _row_batches(np.arange(len(cache)), 7)
    got = list(R.PrefetchFeatures(reader).batches(batches, cpu))
    assert len(got) == len(batches)
    for rows, maps in zip(batches, got, strict=True):
        _assert_same(maps, reader.batch(rows, cpu))
    assert not _prefetch_threads()


def test_a_prefetch_error_reaches_the_training_thread_and_the_thread_ends(built):
    cache, _, feats = built
    prefetch = R.PrefetchFeatures(feats.reader(LAST))
    cpu = torch.device("cpu")

    def rows():
        yield np.array([0, 1])
        yield np.array([len(cache) + 5])  # past the last row: the map's IndexError

    stream = prefetch.batches(rows(), cpu)
    _assert_same(next(stream), prefetch.batch(np.array([0, 1]), cpu))
    with pytest.raises(IndexError):
        next(stream)
    assert not _prefetch_threads()
    # An epoch left early (an error in the step) closes its iterator: the thread stops though batches remain.
    endless = prefetch.batches(itertools.repeat(np.array([2, 3])), cpu)
    next(endless)
    endless.close()
    assert not _prefetch_threads()


def test_training_features_are_held_within_the_budget_else_read_from_the_map(built, monkeypatch):
    cache, _, feats = built
    reader = feats.reader(LAST)
    train = np.array([9, 4, 4, 1])
    need = 3 * reader.row_bytes()
    assert reader.row_bytes() == int(np.prod(feats.maps[3].shape[1:])) * 2
    held = R.for_training(reader, train, "cpu", budget_bytes=need)
    assert isinstance(held, R.ResidentFeatures) and held.rows.tolist() == [1, 4, 9]
    assert R.for_training(reader, train, "cpu", budget_bytes=need - 1) is reader  # the CPU reads the map
    assert R.resident_budget(torch.device("cpu")) == R.RESIDENT_HOST_BYTES == 0
    assert R.for_training(reader, train, "cpu") is reader  # by default a CPU trial reads the shared map
    # On a GPU, rows over the budget are prefetched instead.
    monkeypatch.setattr(R, "_concrete", lambda device: device)
    prefetch = R.for_training(reader, train, "cuda", budget_bytes=need - 1)
    assert type(prefetch) is R.PrefetchFeatures and prefetch.levels == LAST and prefetch.path == reader.path


def test_packed_trials_hold_features_within_their_share_of_the_card(monkeypatch):
    """A quarter of the card's free memory, but never more than a quarter of the trial's own share of the card:
    four trials packed on one GPU hold at most a quarter of it together, whichever starts first."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * gib, 80 * gib))
    cuda = torch.device("cuda", 0)
    assert R.resident_budget(cuda) == int(70 * gib * R.RESIDENT_DEVICE_FRACTION)  # alone: the free memory rules
    assert R.resident_budget(cuda, share=0.25) == int(20 * gib * R.RESIDENT_DEVICE_FRACTION)
    assert R.resident_budget(cuda, share=2.0) == R.resident_budget(cuda)  # two whole cards: still this one's free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    assert R.resident_budget(cuda, share=0.25) == int(10 * gib * R.RESIDENT_DEVICE_FRACTION)  # a full card


def test_a_trial_asks_for_features_within_its_device_share(phantom_dir, monkeypatch):
    cfg = features_cfg(phantom_dir, **{"train.epochs": 1, "model.decoder": "linear"})
    data = prepare_data(cfg)
    data.device_share = 0.25
    asked = []
    monkeypatch.setattr(R, "resident_budget", lambda device, share=1.0: asked.append((device.type, share)) or 0)
    assert run_trial(cfg, data=data)["feature_cache"]
    assert asked == [("cpu", 0.25)]


def test_a_trial_trains_from_its_held_rows_and_evaluates_from_the_map(phantom_dir, monkeypatch):
    cfg = features_cfg(phantom_dir, **{"train.epochs": 1, "model.decoder": "linear"})
    data = prepare_data(cfg)
    monkeypatch.setattr(R, "RESIDENT_HOST_BYTES", 2**30)  # held on the CPU too (off by default there)
    sent: list[np.ndarray] = []
    real = F.FeatureCache.send
    monkeypatch.setattr(
        F.FeatureCache, "send", lambda self, rows, device: sent.append(rows) or real(self, rows, device)
    )
    assert run_trial(cfg, data=data)["feature_cache"]
    read = np.concatenate(sent)
    assert len(read) and not np.isin(read, data.train_rows).any()


def test_held_prefetched_and_mapped_training_features_train_alike(phantom_dir):
    cfg = features_cfg(phantom_dir, **{"train.epochs": 2, "model.decoder": "conv", "model.decoder_width": 8})
    data = prepare_data(cfg)
    losses, hold = {}, R.for_training
    for name, pick in {
        "held": lambda self, rows, device, **_: hold(self, rows, device, budget_bytes=2**30),
        "prefetched": lambda self, rows, device, **_: R.PrefetchFeatures(self),
        "mapped": lambda self, rows, device, **_: self,
    }.items():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(trial_data, "for_training", pick)
            results = run_trial(cfg, data=data)
        assert results["feature_cache"]
        losses[name] = [h["train_loss"] for h in results["history"]] + [results["val_dice"]]
    assert losses["held"] == losses["prefetched"] == losses["mapped"]
    assert not _prefetch_threads()
