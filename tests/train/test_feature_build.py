"""Building features once: reuse, concurrent builders, the levels a cache stores, and trials that build or reuse."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lasegseg.errors import DataError
from lasegseg.train import feature_build as B
from lasegseg.train import feature_plan as P
from lasegseg.train import features as F
from lasegseg.train.trial import run_trial
from lasegseg.train.trial_data import prepare_data
from tests.train.conftest import ALL, LAST, feature_folders, features_cfg, fresh_cache


def test_second_call_reuses_the_folder(built, monkeypatch):
    cache, backbone, feats = built
    monkeypatch.setattr(B, "build_features", lambda *a, **k: pytest.fail("rebuilt a valid cache"))
    again = B.get_or_build_features(backbone, cache, amp="off")
    assert again.path == feats.path and again.matches(backbone, cache)


def test_concurrent_builders_build_once(phantom_dir, tmp_path, monkeypatch):
    from lasegseg.models.segmenter import load_backbone

    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))  # a fresh slice cache → no features yet
    cache = prepare_data(features_cfg(phantom_dir)).cache
    backbone = load_backbone("tiny").requires_grad_(False)
    calls, real = [], B.build_features
    monkeypatch.setattr(B, "build_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(B.get_or_build_features(backbone, cache, amp="off")))
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({f.path for f in out}) == 1


def _no_build(*args, **kwargs):
    pytest.fail("built features that an existing cache holds")


@pytest.mark.parametrize(
    ("decoders", "stored"),
    [(("linear",), LAST), (("linear", "conv"), LAST), (("linear", "multiscale"), ALL), (("conv", "unetr"), ALL)],
)
def test_a_sweep_cache_stores_the_union_of_its_frozen_decoders_levels(
    phantom_dir, tmp_path, monkeypatch, decoders, stored
):
    cache = fresh_cache(phantom_dir, tmp_path, monkeypatch)
    base = features_cfg(phantom_dir).to_flat()
    trials = [{**base, "model.decoder": name, "seed": seed} for name in decoders for seed in (0, 1)]
    # Trials that do not read the cache do not widen it.
    trials += [{**base, "model.decoder": "multiscale", "model.mode": "finetune"},
               {**base, "model.decoder": "unetr", "train.augment": "flip"}]  # fmt: skip
    assert P.slot_readers(trials) == {P.feature_slot(base): tuple(sorted(decoders))}
    (path,) = B.build_sweep_features(trials, cache, device="cpu").values()
    assert feature_folders(cache) == [Path(path)]
    files = sorted(p.name for p in Path(path).iterdir())
    assert files == sorted([*(f"level_{i}.npy" for i in stored), "manifest.json"])
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["levels"] == list(stored) and sorted(manifest["files"]) == files[:-1]
    grid = -(-cache.image_size // 14)
    for i in stored:  # fp16 maps of every slice, nothing more
        assert np.load(Path(path) / f"level_{i}.npy", mmap_mode="r").nbytes == len(cache) * grid * grid * 128 * 2


def test_a_multiscale_reader_of_a_linear_only_cache_gets_a_new_cache(phantom_dir, tmp_path, monkeypatch):
    from lasegseg.models.segmenter import load_backbone

    cache = fresh_cache(phantom_dir, tmp_path, monkeypatch)
    backbone = load_backbone("tiny").requires_grad_(False)
    first: dict = {}
    linear = B.get_or_build_features(backbone, cache, levels=LAST, amp="off", stats=first)
    assert first["built"] and linear.stored == linear.levels == LAST
    with pytest.raises(DataError, match=r"stores levels \[3\], not \[0, 1, 2\]"):
        linear.reader(ALL)
    # A multiscale trial handed the linear-only cache (as a sweep would) builds the full one beside it.
    cfg = features_cfg(phantom_dir, **{"train.epochs": 1, "model.decoder": "multiscale"})
    data = prepare_data(cfg, cache=cache)
    data.features = F.FeatureCache.open(linear.path)
    timings: dict = {}
    results = run_trial(cfg, data=data, timings=timings)
    assert results["feature_cache"] and timings["features_built"]
    (full_path,) = [p for p in feature_folders(cache) if p != linear.path]
    full = F.FeatureCache.open(full_path)
    assert full.stored == ALL and full.path.name == F.feature_key(backbone, cache, "fp32", ALL)
    rows = np.arange(0, len(cache), 7)
    torch.testing.assert_close(full.reader(LAST).batch(rows, torch.device("cpu")),
                               linear.batch(rows, torch.device("cpu")), rtol=0, atol=0)  # fmt: skip


def test_the_first_trial_to_build_builds_every_level_its_sweep_reads(phantom_dir, tmp_path, monkeypatch):
    """A local cluster has no cache task: its first frozen trial (linear) builds what the multiscale ones read too."""
    cache = fresh_cache(phantom_dir, tmp_path, monkeypatch)
    for decoder, build in (("linear", True), ("multiscale", False)):
        cfg = features_cfg(phantom_dir, **{"train.epochs": 1, "model.decoder": decoder})
        data = prepare_data(cfg, cache=cache)
        data.feature_readers = ("linear", "multiscale")
        timings: dict = {}
        assert run_trial(cfg, data=data, timings=timings)["feature_cache"]
        assert timings["features_built"] is build
    (folder,) = feature_folders(cache)
    assert F.FeatureCache.open(folder).stored == ALL


def test_a_linear_reader_of_a_full_cache_reuses_it_without_building(phantom_dir, tmp_path, monkeypatch):
    from lasegseg.models.segmenter import load_backbone

    cache = fresh_cache(phantom_dir, tmp_path, monkeypatch)
    backbone = load_backbone("tiny").requires_grad_(False)
    full = B.get_or_build_features(backbone, cache, amp="off")
    monkeypatch.setattr(B, "build_features", _no_build)
    linear = B.get_or_build_features(backbone, cache, levels=LAST, amp="off")
    assert linear.path == full.path and linear.levels == LAST and linear.stored == ALL
    rows = np.array([1, 4, 30])
    (only,) = linear.batch(rows, torch.device("cpu"))
    assert torch.equal(only, full.batch(rows, torch.device("cpu"))[3])
    assert pickle.loads(pickle.dumps(linear)).levels == LAST  # what a Ray worker receives
    # A frozen linear trial with no cache handed to it finds the full one too; so does one handed the full one.
    cfg = features_cfg(phantom_dir, **{"train.epochs": 1, "model.decoder": "linear"})
    for given in (None, F.FeatureCache.open(full.path)):
        timings: dict = {}
        data = prepare_data(cfg, cache=cache)
        data.features = given
        assert run_trial(cfg, data=data, timings=timings)["feature_cache"] and not timings["features_built"]
    assert feature_folders(cache) == [full.path]


def test_frozen_linear_trial_is_unchanged_by_storing_only_the_last_level(phantom_dir, tmp_path, monkeypatch):
    from lasegseg.models import segmenter

    cache = fresh_cache(phantom_dir, tmp_path, monkeypatch)
    segmenter.load_backbone("tiny")  # both runs deep-copy the same loaded backbone
    cfg = features_cfg(phantom_dir, **{"train.epochs": 3, "model.decoder": "linear", "optim.lr": 1e-2})
    one = run_trial(cfg, data=prepare_data(cfg, cache=cache))
    (one_level,) = feature_folders(cache)
    assert sorted(json.loads((one_level / "manifest.json").read_text())["files"]) == ["level_3.npy"]
    # As before: the decoder is fed every level, from a cache of every level.
    monkeypatch.setattr(segmenter, "decoder_levels", lambda name, num_levels: tuple(range(num_levels)))
    every = run_trial(cfg, data=prepare_data(cfg, cache=cache))
    assert {F.FeatureCache.open(p).stored for p in feature_folders(cache)} == {LAST, ALL}
    assert one["feature_cache"] and every["feature_cache"]
    assert [h["train_loss"] for h in one["history"]] == [h["train_loss"] for h in every["history"]]
    assert (one["val_dice"], one["test_dice_mean"]) == (every["val_dice"], every["test_dice_mean"])


def test_a_builder_that_loses_the_race_keeps_the_first_folder_and_leaves_nothing(built, tmp_path):
    cache, backbone, feats = built
    final = tmp_path / feats.path.name
    shutil.copytree(feats.path, final)  # another process published these first
    first = (final / "manifest.json").read_bytes()
    cpu = torch.device("cpu")
    assert B.build_features(backbone, cache, final, levels=LAST, device=cpu, amp="off") == final
    assert (final / "manifest.json").read_bytes() == first and F.FeatureCache.open(final).stored == ALL
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # this builder's temporary copy is gone
    # A folder in the way that is not a finished cache is an error, and the temporary copy still goes.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "partial").write_text("x")
    with pytest.raises(OSError):
        B.build_features(backbone, cache, blocked, levels=LAST, device=cpu, amp="off")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["blocked", final.name])
