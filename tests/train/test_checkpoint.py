"""Checkpoints: when a trial saves its training state, and what a saved state gives back."""

from __future__ import annotations

import pytest
import torch

from lasegseg.config import Config
from lasegseg.models.segmenter import build_segmenter
from lasegseg.train.checkpoint import (
    AUTO_CHECKPOINT_FACTOR,
    CheckpointPolicy,
    load_train_state,
    save_train_state,
)


def test_checkpoint_policy_by_epochs_by_seconds_and_by_cost():
    every = CheckpointPolicy(every=3, last_at=0.0)
    assert [e for e in range(9) if every.due(e, now=0.0)] == [2, 5, 8]
    timed = CheckpointPolicy(interval_s=10.0, last_at=0.0)
    assert not timed.due(0, now=9.9) and timed.due(0, now=10.0)
    timed.record(10.0, 11.0)
    assert not timed.due(1, now=20.9) and timed.due(1, now=21.0)  # counted from the end of the last save
    auto = CheckpointPolicy(last_at=0.0)
    assert auto.due(0, now=0.0)  # the first epoch saves: that measures what a save costs
    auto.record(1.0, 3.0)  # a 2 s save (writing + hand-over)
    budget = AUTO_CHECKPOINT_FACTOR * 2.0
    assert not auto.due(1, now=3.0 + budget - 0.1) and auto.due(1, now=3.0 + budget)
    assert budget / (budget + 2.0) == pytest.approx(0.95)  # training time between saves: 95 %


@pytest.mark.parametrize("key,value", [("train.checkpoint_every", -1), ("train.checkpoint_interval_s", -1.0),
                                       ("train.checkpoint_interval_s", float("inf")), ("train.val_budget", -0.5),
                                       ("train.val_budget", float("nan"))])  # fmt: skip
def test_bad_checkpoint_cadence_names_its_key(key, value):
    from lasegseg.config_checks import validate_config
    from lasegseg.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config({**Config().to_flat(), key: value})


def test_the_policy_reads_the_trials_cadence_keys():
    policy = CheckpointPolicy.of(Config().replace(**{"train.checkpoint_every": 4, "train.checkpoint_interval_s": 30.0}))
    assert (policy.every, policy.interval_s, policy.saves, policy.spent_s) == (4, 30.0, 0, 0.0)
    assert [e for e in range(8) if policy.due(e, now=policy.last_at)] == [3, 7]


def test_a_saved_training_state_gives_back_the_weights_the_optimizer_and_the_counters(tmp_path):
    torch.manual_seed(0)
    model_cfg = Config().replace(**{"model.mode": "finetune", "model.decoder": "linear"}).model
    seg = build_segmenter(model_cfg)
    optimizer = torch.optim.AdamW(seg.parameters(), lr=1e-3)
    seg(torch.rand(2, 1, 28, 28)).float().sum().backward()
    optimizer.step()  # moments to save
    scalars = {"epoch": 3, "step": 7, "best_val_dice": 0.5, "history": [{"epoch": 0, "train_loss": 0.25}]}
    save_train_state(tmp_path / "state", seg, optimizer, scalars, None, durable=False)
    fresh = build_segmenter(model_cfg)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    got, best = load_train_state(tmp_path / "state", fresh, fresh_optimizer)
    assert got == scalars and best is None
    for (name, a), (_, b) in zip(seg.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    saved, restored = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys()
    for pid, moments in saved.items():
        for key, value in moments.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored[pid][key])), (pid, key)
