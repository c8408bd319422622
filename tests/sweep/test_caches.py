"""A node's cache task: one feature cache per frozen backbone, holding the levels its sweep's frozen trials read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lasegseg.config import Config
from lasegseg.sweep.caches import (
    build_node_caches,
    build_on_node,
    frozen_feature_trials,
    open_slice_caches,
    preprocessing_key,
)
from lasegseg.train.feature_plan import feature_slot, slot_readers


def _trials(phantom_dir, decoders):
    base = Config().replace(**{"data.path": str(phantom_dir), "data.image_size": 42, "model.mode": "frozen"}).to_flat()
    return [{**base, "model.decoder": name} for name in decoders] + [
        {**base, "model.decoder": "multiscale", "model.mode": "lora"},  # runs its backbone: reads no cache
    ]


def test_node_task_builds_the_union_of_levels_once(phantom_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))  # outside Ray: this process is the node
    linear_only = _trials(phantom_dir, ("linear", "conv"))
    slot = feature_slot(linear_only[0])
    first = build_on_node(frozen_feature_trials(linear_only), slot_readers(linear_only))
    assert first["built"] == [slot] and first["device"] == "cpu"
    path = Path(first["paths"][slot])
    assert sorted(p.name for p in path.iterdir()) == ["level_3.npy", "manifest.json"]
    assert build_on_node(frozen_feature_trials(linear_only), slot_readers(linear_only))["built"] == []
    # Adding a multiscale trial to the sweep widens the cache to every level: a new folder, built once.
    mixed = _trials(phantom_dir, ("linear", "multiscale"))
    second = build_on_node(frozen_feature_trials(mixed), slot_readers(mixed))
    wide = Path(second["paths"][slot])
    assert second["built"] == [slot] and wide != path
    assert json.loads((wide / "manifest.json").read_text())["levels"] == [0, 1, 2, 3]
    # The exact cache is preferred; without it, the wider one serves the linear-only sweep, with no build.
    again = build_on_node(frozen_feature_trials(linear_only), slot_readers(linear_only))
    assert again["built"] == [] and again["paths"][slot] == str(path)
    shutil.rmtree(path)
    third = build_on_node(frozen_feature_trials(linear_only), slot_readers(linear_only))
    assert third["built"] == [] and third["paths"][slot] == str(wide)


def test_a_sweep_over_image_sizes_gets_one_slice_cache_and_feature_slot_per_size(phantom_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    trials = _trials(phantom_dir, ("linear",))[:1]
    trials += [{**trials[0], "seed": 1}, {**trials[0], "data.image_size": 28}]
    caches = open_slice_caches(trials)
    assert sorted(c.image_size for c in caches.values()) == [28, 42]
    assert caches[preprocessing_key(trials[2])].image_size == 28
    assert feature_slot(trials[0]) == feature_slot(trials[1]) != feature_slot(trials[2])
    out = build_on_node(frozen_feature_trials(trials), slot_readers(trials))
    assert sorted(out["built"]) == sorted({feature_slot(t) for t in trials})


def test_a_local_sweep_builds_in_its_driver_only_when_no_worker_loads_a_backbone(phantom_dir, tmp_path, monkeypatch):
    """Frozen trials and a U-Net baseline only: the driver builds the features (then drops its backbone), so no
    worker needs transformers. With a LoRA trial the workers import it anyway: the first frozen trial builds."""
    from types import SimpleNamespace

    from lasegseg.models import segmenter

    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    res = SimpleNamespace(for_trial=lambda flat: {"cpu": 1.0, "gpu": 0.0})
    with_lora = _trials(phantom_dir, ("linear",))
    assert build_node_caches(with_lora, res, joined=False) == {}
    assert not (tmp_path / "features").exists() and not list(tmp_path.rglob("manifest.json"))
    frozen = with_lora[:-1] + [{**with_lora[0], "model.backbone": "none", "model.decoder": "unet"}]
    paths = build_node_caches(frozen, res, joined=False)
    ((node, slots),) = paths.items()
    assert node == "" and list(slots) == [feature_slot(frozen[0])]  # outside Ray: no node id
    assert json.loads((Path(slots[feature_slot(frozen[0])]) / "manifest.json").read_text())["levels"] == [3]
    assert segmenter._BACKBONE_TEMPLATE == {}  # the driver keeps no backbone for the rest of the sweep
