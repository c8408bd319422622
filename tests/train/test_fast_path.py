"""The trial fast path: no MONAI import, batch augmentation, per-process backbone reuse, timings."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lasegseg.train.augment import augment_batch


def test_trials_never_import_monai(phantom_dir):
    script = textwrap.dedent(f"""
        import sys
        from lasegseg.config import Config
        from lasegseg.train.trial import run_trial
        base = {{"data.path": {str(phantom_dir)!r}, "data.image_size": 28, "train.epochs": 1,
                 "model.decoder": "linear", "model.decoder_width": 8}}
        for mode in ("frozen", "finetune"):
            timings = {{}}
            r = run_trial(Config().replace(**base, **{{"model.mode": mode}}), timings=timings)
            assert r["feature_cache"] == (mode == "frozen") and timings["first_step_at"] > 0
        print("monai" in sys.modules)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the session's cache: slices and tiny backbone already built
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def _batch():
    y = torch.zeros(4, 1, 14, 14, dtype=torch.long)
    y[:, :, 2:6, 3:9] = 1
    y[1, :, 8:12, 1:4] = 1
    x = y.float() * 0.8 + 0.1
    return x, y


@pytest.mark.parametrize("kind", ["flip", "spatial"])
def test_augmentation_moves_images_and_labels_together_and_is_seeded(kind):
    x, y = _batch()
    ax, ay = augment_batch(x, y, kind, torch.Generator().manual_seed(3))
    bx, by = augment_batch(x, y, kind, torch.Generator().manual_seed(3))
    assert torch.equal(ax, bx) and torch.equal(ay, by)
    assert ax.shape == x.shape and ay.dtype == torch.long and set(ay.unique().tolist()) <= {0, 1}
    agree = ((ax > 0.5).long() == ay).float().mean().item()
    assert agree > (0.999 if kind == "flip" else 0.95)
    many = [augment_batch(x, y, kind, torch.Generator().manual_seed(s))[1] for s in range(6)]
    assert any(not torch.equal(m, y) for m in many)
    if kind == "flip":  # flips keep the foreground area exactly
        assert all(torch.equal(m.sum(dim=(1, 2, 3)), y.sum(dim=(1, 2, 3))) for m in many)


def test_none_augmentation_is_identity():
    x, y = _batch()
    ax, ay = augment_batch(x, y, "none", torch.Generator())
    assert ax is x and ay is y


def test_backbone_is_read_once_per_process_and_copies_are_independent(monkeypatch):
    from lasegseg.models import segmenter
    from lasegseg.models.backbones import fingerprint

    monkeypatch.setattr(segmenter, "_BACKBONE_TEMPLATE", {})
    calls = []
    real = segmenter.build_backbone
    monkeypatch.setattr(segmenter, "build_backbone", lambda *a, **k: calls.append(a) or real(*a, **k))
    a = segmenter.load_backbone("tiny")
    b = segmenter.load_backbone("tiny")
    assert len(calls) == 1 and a is not b
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    c = segmenter.load_backbone("tiny")
    for (name, pb), (_, pc) in zip(b.state_dict().items(), c.state_dict().items(), strict=True):
        assert torch.equal(pb, pc), name
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_training_from_fp16_batches_matches_float32_input(phantom_dir):
    """Batches cross to the device as fp16/uint8 and are widened there: same numbers as widening on the host."""
    from lasegseg.config import Config
    from lasegseg.train.trial_data import prepare_data

    data = prepare_data(Config().replace(**{"data.path": str(phantom_dir), "data.image_size": 28}))
    idx = np.sort(data.train_rows[:5])
    host = torch.from_numpy(data.cache.images[idx].astype(np.float32))
    device_side = torch.from_numpy(np.asarray(data.cache.images[idx])).float()
    assert torch.equal(host, device_side)
