"""Frozen-backbone feature cache: layout, reuse, damage, locking, stored levels, and trials trained on it."""

from __future__ import annotations

import itertools
import json
import logging
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lasegseg.config import Config
from lasegseg.errors import DataError
from lasegseg.models.backbones import fingerprint
from lasegseg.train import features as F
from lasegseg.train.checkpoint import load_model
from lasegseg.train.trial import evaluate, prepare_data, run_trial

ALL = (0, 1, 2, 3)  # the tiny backbone taps four blocks
LAST = (3,)


def _cfg(phantom_dir, **flat):
    base = {
        "data.path": str(phantom_dir), "data.image_size": 42, "train.epochs": 2, "train.batch_size": 16,
        "model.decoder": "multiscale", "model.mode": "frozen", "optim.lr": 3e-3, "model.decoder_width": 16,
    }  # fmt: skip
    return Config().replace(**{**base, **flat})


@pytest.fixture(scope="module")
def built(phantom_dir):
    from lasegseg.models.segmenter import load_backbone

    data = prepare_data(_cfg(phantom_dir))
    backbone = load_backbone("tiny").requires_grad_(False)
    return data.cache, backbone, F.get_or_build_features(backbone, data.cache, amp="off")


def test_layout_key_and_values(built):
    cache, backbone, feats = built
    assert feats.path.parent == cache.path.parent / "features"
    assert feats.path.name == F.feature_key(backbone, cache, "fp32")
    assert feats.path.name.startswith(fingerprint(backbone) + "-")
    manifest = json.loads((feats.path / "manifest.json").read_text())
    assert manifest["slice_cache"] == cache.key and manifest["rows"] == len(cache)
    assert sorted(manifest["files"]) == [f"level_{i}.npy" for i in range(backbone.num_features_levels)]
    assert feats.stored == feats.levels == tuple(manifest["levels"]) == ALL
    assert manifest["blocks"] == backbone.layer_indices
    grid = -(-cache.image_size // backbone.patch_size)
    for level in feats.maps.values():
        assert level.shape == (len(cache), grid, grid, backbone.embed_dim) and level.dtype == np.float16
    rows = np.array([0, 5, 17])
    with torch.no_grad():
        ref = backbone(torch.from_numpy(np.array(cache.images[rows], np.float32))[:, None])
    got = feats.batch(rows, torch.device("cpu"))
    for a, b in zip(got, ref, strict=True):
        assert a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-3)  # fp16 storage


def test_second_call_reuses_the_folder(built, monkeypatch):
    cache, backbone, feats = built
    monkeypatch.setattr(F, "build_features", lambda *a, **k: pytest.fail("rebuilt a valid cache"))
    again = F.get_or_build_features(backbone, cache, amp="off")
    assert again.path == feats.path and again.matches(backbone, cache)


def test_damaged_file_is_refused_and_rebuilt(built, tmp_path):
    cache, backbone, feats = built
    path = feats.path / "level_0.npy"
    original = path.read_bytes()
    with open(path, "r+b") as fh:  # flip one byte of the data, keep the size
        fh.seek(len(original) - 3)
        fh.write(bytes([original[-3] ^ 0xFF]))
    with pytest.raises(DataError, match="level_0.npy' is corrupt"):
        F.FeatureCache.open(feats.path)
    rebuilt = F.get_or_build_features(backbone, cache, amp="off")
    assert rebuilt.path == feats.path and path.read_bytes() == original
    with open(path, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(DataError, match="truncated or altered"):
        F.FeatureCache.open(feats.path, verify="size")
    F.get_or_build_features(backbone, cache, amp="off", verify="size")
    assert path.read_bytes() == original


def test_concurrent_builders_build_once(phantom_dir, tmp_path, monkeypatch):
    from lasegseg.models.segmenter import load_backbone

    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))  # a fresh slice cache → no features yet
    cache = prepare_data(_cfg(phantom_dir)).cache
    backbone = load_backbone("tiny").requires_grad_(False)
    calls, real = [], F.build_features
    monkeypatch.setattr(F, "build_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(F.get_or_build_features(backbone, cache, amp="off")))
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({f.path for f in out}) == 1


def test_frozen_results_agree_with_and_without_the_cache(phantom_dir, tmp_path):
    cfg = _cfg(phantom_dir, **{"train.epochs": 4, "model.decoder": "conv", "model.decoder_width": 8, "optim.lr": 1e-2})
    cached = run_trial(cfg, tmp_path / "cached")
    plain = run_trial(cfg.replace(**{"train.feature_cache": False}))
    assert cached["feature_cache"] and not plain["feature_cache"]
    assert plain["val_dice"] > 0.2 and plain["test_dice_mean"] > 0.2  # a model that learned something
    # Frozen features are fp16-rounded on both paths, so training sees the same numbers.
    for a, b in zip(cached["history"], plain["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert cached["val_dice"] == pytest.approx(plain["val_dice"], abs=1e-4)
    assert cached["test_dice_mean"] == pytest.approx(plain["test_dice_mean"], abs=1e-4)
    # The model folder is like any other: decoder weights + backbone fingerprint; it predicts without the cache.
    model, cfg2, _ = load_model(tmp_path / "cached" / "model")
    data = prepare_data(cfg2)
    rows = evaluate(model, data.cache, data.split.test, device="cpu", amp="off", batch_size=8, full=True)
    assert np.mean([r["dice"] for r in rows]) == pytest.approx(cached["test_dice_mean"], abs=1e-4)


def test_spatial_augmentation_turns_the_cache_off(phantom_dir, caplog):
    cfg = _cfg(phantom_dir, **{"train.epochs": 1, "train.augment": "spatial", "model.decoder": "linear"})
    with caplog.at_level(logging.WARNING, logger="lasegseg.train.trial"):
        results = run_trial(cfg)
    assert not results["feature_cache"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("feature cache off: spatial augmentation changes the backbone input every epoch") == 1
    assert np.isfinite(results["history"][0]["train_loss"])


def test_sweep_helpers_pick_one_cache_per_frozen_backbone():
    base = Config().to_flat()
    trials = [
        {**base, "model.mode": "frozen", "model.decoder": "linear"},
        {**base, "model.mode": "frozen", "model.decoder": "conv"},
        {**base, "model.mode": "finetune"},
        {**base, "model.mode": "frozen", "train.augment": "flip"},
        {**base, "model.mode": "frozen", "train.feature_cache": False},
        {**base, "model.mode": "frozen", "model.registers": True},
    ]
    picked = F.distinct_frozen_backbones(trials)
    assert [(t["model.decoder"], t["model.registers"]) for t in picked] == [("linear", False), ("multiscale", True)]
    assert F.feature_slot(trials[0]) == F.feature_slot(trials[1]) != F.feature_slot(trials[5])
    readers = F.slot_readers(trials)
    assert readers == {F.feature_slot(trials[0]): ("conv", "linear"), F.feature_slot(trials[5]): ("multiscale",)}
    assert F.levels_read(readers[F.feature_slot(trials[0])], 4) == LAST
    assert F.levels_read(("linear", "multiscale"), 4) == ALL


def _fresh_cache(phantom_dir, tmp_path, monkeypatch):
    """A slice cache in a cache folder of its own, so that no feature cache exists yet."""
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    return prepare_data(_cfg(phantom_dir)).cache


def _feature_folders(cache) -> list[Path]:
    return sorted(p for p in F.features_root(cache).iterdir() if not p.name.startswith("."))


def _no_build(*args, **kwargs):
    pytest.fail("built features that an existing cache holds")


@pytest.mark.parametrize(
    ("decoders", "stored"),
    [(("linear",), LAST), (("linear", "conv"), LAST), (("linear", "multiscale"), ALL), (("conv", "unetr"), ALL)],
)
def test_a_sweep_cache_stores_the_union_of_its_frozen_decoders_levels(
    phantom_dir, tmp_path, monkeypatch, decoders, stored
):
    cache = _fresh_cache(phantom_dir, tmp_path, monkeypatch)
    base = _cfg(phantom_dir).to_flat()
    trials = [{**base, "model.decoder": name, "seed": seed} for name in decoders for seed in (0, 1)]
    # Trials that do not read the cache do not widen it.
    trials += [{**base, "model.decoder": "multiscale", "model.mode": "finetune"},
               {**base, "model.decoder": "unetr", "train.augment": "flip"}]  # fmt: skip
    assert F.slot_readers(trials) == {F.feature_slot(base): tuple(sorted(decoders))}
    (path,) = F.build_sweep_features(trials, cache, device="cpu").values()
    assert _feature_folders(cache) == [Path(path)]
    files = sorted(p.name for p in Path(path).iterdir())
    assert files == sorted([*(f"level_{i}.npy" for i in stored), "manifest.json"])
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["levels"] == list(stored) and sorted(manifest["files"]) == files[:-1]
    grid = -(-cache.image_size // 14)
    for i in stored:  # fp16 maps of every slice, nothing more
        assert np.load(Path(path) / f"level_{i}.npy", mmap_mode="r").nbytes == len(cache) * grid * grid * 128 * 2


def test_a_multiscale_reader_of_a_linear_only_cache_gets_a_new_cache(phantom_dir, tmp_path, monkeypatch):
    from lasegseg.models.segmenter import load_backbone

    cache = _fresh_cache(phantom_dir, tmp_path, monkeypatch)
    backbone = load_backbone("tiny").requires_grad_(False)
    first: dict = {}
    linear = F.get_or_build_features(backbone, cache, levels=LAST, amp="off", stats=first)
    assert first["built"] and linear.stored == linear.levels == LAST
    with pytest.raises(DataError, match=r"stores levels \[3\], not \[0, 1, 2\]"):
        linear.reader(ALL)
    # A multiscale trial handed the linear-only cache (as a sweep would) builds the full one beside it.
    cfg = _cfg(phantom_dir, **{"train.epochs": 1, "model.decoder": "multiscale"})
    data = prepare_data(cfg, cache=cache)
    data.features = F.FeatureCache.open(linear.path)
    timings: dict = {}
    results = run_trial(cfg, data=data, timings=timings)
    assert results["feature_cache"] and timings["features_built"]
    (full_path,) = [p for p in _feature_folders(cache) if p != linear.path]
    full = F.FeatureCache.open(full_path)
    assert full.stored == ALL and full.path.name == F.feature_key(backbone, cache, "fp32", ALL)
    rows = np.arange(0, len(cache), 7)
    torch.testing.assert_close(full.reader(LAST).batch(rows, torch.device("cpu")),
                               linear.batch(rows, torch.device("cpu")), rtol=0, atol=0)  # fmt: skip


def test_the_first_trial_to_build_builds_every_level_its_sweep_reads(phantom_dir, tmp_path, monkeypatch):
    """A local cluster has no cache task: its first frozen trial (linear) builds what the multiscale ones read too."""
    cache = _fresh_cache(phantom_dir, tmp_path, monkeypatch)
    for decoder, build in (("linear", True), ("multiscale", False)):
        cfg = _cfg(phantom_dir, **{"train.epochs": 1, "model.decoder": decoder})
        data = prepare_data(cfg, cache=cache)
        data.feature_readers = ("linear", "multiscale")
        timings: dict = {}
        assert run_trial(cfg, data=data, timings=timings)["feature_cache"]
        assert timings["features_built"] is build
    (folder,) = _feature_folders(cache)
    assert F.FeatureCache.open(folder).stored == ALL


def test_a_linear_reader_of_a_full_cache_reuses_it_without_building(phantom_dir, tmp_path, monkeypatch):
    from lasegseg.models.segmenter import load_backbone

    cache = _fresh_cache(phantom_dir, tmp_path, monkeypatch)
    backbone = load_backbone("tiny").requires_grad_(False)
    full = F.get_or_build_features(backbone, cache, amp="off")
    monkeypatch.setattr(F, "build_features", _no_build)
    linear = F.get_or_build_features(backbone, cache, levels=LAST, amp="off")
    assert linear.path == full.path and linear.levels == LAST and linear.stored == ALL
    rows = np.array([1, 4, 30])
    (only,) = linear.batch(rows, torch.device("cpu"))
    assert torch.equal(only, full.batch(rows, torch.device("cpu"))[3])
    assert pickle.loads(pickle.dumps(linear)).levels == LAST  # what a Ray worker receives
    # A frozen linear trial with no cache handed to it finds the full one too; so does one handed the full one.
    cfg = _cfg(phantom_dir, **{"train.epochs": 1, "model.decoder": "linear"})
    for given in (None, F.FeatureCache.open(full.path)):
        timings: dict = {}
        data = prepare_data(cfg, cache=cache)
        data.features = given
        assert run_trial(cfg, data=data, timings=timings)["feature_cache"] and not timings["features_built"]
    assert _feature_folders(cache) == [full.path]


def test_frozen_linear_trial_is_unchanged_by_storing_only_the_last_level(phantom_dir, tmp_path, monkeypatch):
    from lasegseg.models import segmenter

    cache = _fresh_cache(phantom_dir, tmp_path, monkeypatch)
    segmenter.load_backbone("tiny")  # both runs deep-copy the same loaded backbone
    cfg = _cfg(phantom_dir, **{"train.epochs": 3, "model.decoder": "linear", "optim.lr": 1e-2})
    one = run_trial(cfg, data=prepare_data(cfg, cache=cache))
    (one_level,) = _feature_folders(cache)
    assert sorted(json.loads((one_level / "manifest.json").read_text())["files"]) == ["level_3.npy"]
    # As before: the decoder is fed every level, from a cache of every level.
    monkeypatch.setattr(segmenter, "decoder_levels", lambda name, num_levels: tuple(range(num_levels)))
    every = run_trial(cfg, data=prepare_data(cfg, cache=cache))
    assert {F.FeatureCache.open(p).stored for p in _feature_folders(cache)} == {LAST, ALL}
    assert one["feature_cache"] and every["feature_cache"]
    assert [h["train_loss"] for h in one["history"]] == [h["train_loss"] for h in every["history"]]
    assert (one["val_dice"], one["test_dice_mean"]) == (every["val_dice"], every["test_dice_mean"])


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
    held = F.ResidentFeatures(reader, train, "cpu")
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
    got = list(F.PrefetchFeatures(reader).batches(batches, cpu))
    assert len(got) == len(batches)
    for rows, maps in zip(batches, got, strict=True):
        _assert_same(maps, reader.batch(rows, cpu))
    assert not _prefetch_threads()


def test_a_prefetch_error_reaches_the_training_thread_and_the_thread_ends(built):
    cache, _, feats = built
    prefetch = F.PrefetchFeatures(feats.reader(LAST))
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
    held = reader.for_training(train, "cpu", budget_bytes=need)
    assert isinstance(held, F.ResidentFeatures) and held.rows.tolist() == [1, 4, 9]
    assert reader.for_training(train, "cpu", budget_bytes=need - 1) is reader  # the CPU reads the map
    assert F.resident_budget(torch.device("cpu")) == F.RESIDENT_HOST_BYTES == 0
    assert reader.for_training(train, "cpu") is reader  # by default a CPU trial reads the shared map
    # On a GPU, rows over the budget are prefetched instead.
    monkeypatch.setattr(F, "_concrete", lambda device: device)
    prefetch = reader.for_training(train, "cuda", budget_bytes=need - 1)
    assert type(prefetch) is F.PrefetchFeatures and prefetch.levels == LAST and prefetch.path == reader.path


def test_packed_trials_hold_features_within_their_share_of_the_card(monkeypatch):
    """A quarter of the card's free memory, but never more than a quarter of the trial's own share of the card:
    four trials packed on one GPU hold at most a quarter of it together, whichever starts first."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * gib, 80 * gib))
    cuda = torch.device("cuda", 0)
    assert F.resident_budget(cuda) == int(70 * gib * F.RESIDENT_DEVICE_FRACTION)  # alone: the free memory rules
    assert F.resident_budget(cuda, share=0.25) == int(20 * gib * F.RESIDENT_DEVICE_FRACTION)
    assert F.resident_budget(cuda, share=2.0) == F.resident_budget(cuda)  # two whole cards: still this one's free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    assert F.resident_budget(cuda, share=0.25) == int(10 * gib * F.RESIDENT_DEVICE_FRACTION)  # a full card


def test_a_trial_asks_for_features_within_its_device_share(phantom_dir, monkeypatch):
    cfg = _cfg(phantom_dir, **{"train.epochs": 1, "model.decoder": "linear"})
    data = prepare_data(cfg)
    data.device_share = 0.25
    asked = []
    monkeypatch.setattr(F, "resident_budget", lambda device, share=1.0: asked.append((device.type, share)) or 0)
    assert run_trial(cfg, data=data)["feature_cache"]
    assert asked == [("cpu", 0.25)]


def test_a_trial_trains_from_its_held_rows_and_evaluates_from_the_map(phantom_dir, monkeypatch):
    cfg = _cfg(phantom_dir, **{"train.epochs": 1, "model.decoder": "linear"})
    data = prepare_data(cfg)
    monkeypatch.setattr(F, "RESIDENT_HOST_BYTES", 2**30)  # held on the CPU too (off by default there)
    sent: list[np.ndarray] = []
    real = F.FeatureCache.send
    monkeypatch.setattr(
        F.FeatureCache, "send", lambda self, rows, device: sent.append(rows) or real(self, rows, device)
    )
    assert run_trial(cfg, data=data)["feature_cache"]
    read = np.concatenate(sent)
    assert len(read) and not np.isin(read, data.train_rows).any()


def test_held_prefetched_and_mapped_training_features_train_alike(phantom_dir):
    cfg = _cfg(phantom_dir, **{"train.epochs": 2, "model.decoder": "conv", "model.decoder_width": 8})
    data = prepare_data(cfg)
    losses, hold = {}, F.FeatureCache.for_training
    for name, pick in {
        "held": lambda self, rows, device, **_: hold(self, rows, device, budget_bytes=2**30),
        "prefetched": lambda self, rows, device, **_: F.PrefetchFeatures(self),
        "mapped": lambda self, rows, device, **_: self,
    }.items():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(F.FeatureCache, "for_training", pick)
            results = run_trial(cfg, data=data)
        assert results["feature_cache"]
        losses[name] = [h["train_loss"] for h in results["history"]] + [results["val_dice"]]
    assert losses["held"] == losses["prefetched"] == losses["mapped"]
    assert not _prefetch_threads()
