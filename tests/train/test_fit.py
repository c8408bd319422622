"""The training step: the schedule, the compiled forward, and one epoch over the rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lasegseg.config import Config
from lasegseg.train.fit import compiled_forward, lr_factor, train_one_epoch
from lasegseg.train.trial import run_trial


def test_lr_schedule_warms_up_then_decays():
    values = [lr_factor(s, 100, 10, 0.01) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert values[-1] == pytest.approx(0.01, abs=1e-3)
    assert math.isclose(lr_factor(0, 10, 0, 0.0), 1.0)


@pytest.mark.parametrize(("mode", "target"), [("frozen", "decode"), ("finetune", "Segmenter")])
def test_compile_option_compiles_the_training_forward_only(phantom_dir, monkeypatch, mode, target):
    compiled, calls = [], []

    def fake_compile(fn):
        compiled.append(getattr(fn, "__name__", type(fn).__name__))
        return lambda *a: calls.append(1) or fn(*a)

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = Config().replace(**{"data.path": str(phantom_dir), "data.image_size": 28, "train.epochs": 1,
                              "model.decoder": "linear", "model.mode": mode, "train.compile": True})  # fmt: skip
    results = run_trial(cfg)
    # Only the training step goes through the compiled callable; evaluation and checkpoints use the module.
    assert compiled == [target] and len(calls) == results["n_train_slices"] // -16 * -1


def test_compiled_decoder_runs_the_last_smaller_batch_without_recompiling(monkeypatch):
    import functools
    import types

    from torch._dynamo.utils import counters

    from lasegseg.models.decoders import create_decoder

    real = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real, backend="eager"))  # dynamo's guards, no codegen
    decoder = create_decoder("multiscale", embed_dim=16, num_levels=4, patch_size=14, num_classes=2)
    decoder = decoder.to(memory_format=torch.channels_last)
    cfg = Config().replace(**{"train.compile": True})

    def graphs(forward) -> int:
        torch._dynamo.reset()
        counters.clear()
        for batch in (8, 8, 3, 8, 3):  # full batches, then an epoch's remainder (CPU convs specialise at 16)
            feats = [torch.randn(batch, 3, 3, 16).permute(0, 3, 1, 2) for _ in range(4)]
            forward(feats, torch.rand(batch, 1, 42, 42)).float().sum().backward()
        return counters["stats"]["unique_graphs"]

    assert graphs(compiled_forward(cfg, types.SimpleNamespace(decode=decoder), features=object())) == 1
    assert graphs(torch.compile(decoder)) == 2  # unmarked: the remainder compiles a second graph
    torch._dynamo.reset()


def test_one_epoch_steps_once_per_batch_and_returns_the_mean_loss():
    torch.manual_seed(0)
    images = np.random.default_rng(0).random((10, 8, 8), dtype=np.float32)
    labels = (images > 0.5).astype(np.uint8)
    model = torch.nn.Conv2d(1, 2, 3, padding=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    losses, steps = [], []

    def loss_fn(logits, y):
        loss = torch.nn.functional.cross_entropy(logits, y[:, 0])
        losses.append(float(loss.detach()))
        return loss

    cpu = torch.device("cpu")
    mean, lr = train_one_epoch(
        model, optimizer, loss_fn, images, labels, np.arange(10)[::-1], batch_size=4, device=cpu, amp="off",
        scheduler=scheduler, before_step=lambda: steps.append(optimizer.param_groups[-1]["lr"]),
    )  # fmt: skip
    assert len(losses) == len(steps) == math.ceil(10 / 4) and scheduler.last_epoch == 3
    assert mean == pytest.approx(np.mean(losses)) and lr == pytest.approx(0.1 / 3) == steps[-1]
    with pytest.raises(ValueError, match="cached features cannot be augmented"):
        train_one_epoch(
            model, optimizer, loss_fn, images, labels, np.arange(10), batch_size=4, device=cpu, amp="off",
            features=object(), augment="flip",
        )  # fmt: skip
