"""2. data — slice-cache (and frozen-feature-cache) batch reads vs the model's step (loader never the bottleneck),
and one cache build per dataset however many trials open it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.harness import IMAGE_SIZE, Bench

if TYPE_CHECKING:
    from lasegseg.config import Config
    from lasegseg.data.cache import SliceCache
    from lasegseg.models.segmenter import Segmenter
    from lasegseg.train.features import FeatureCache


def measure(b: Bench) -> None:
    """Cache builds per dataset, and batch reads from the caches vs the cheapest training steps they feed."""
    from lasegseg.config import Config

    cache_dir = b.fresh_cache("data")
    base = Config().replace(**{"data.path": str(b.phantom), "data.image_size": IMAGE_SIZE,
                               "data.cache_dir": str(cache_dir), "train.batch_size": 16})  # fmt: skip
    cache = _slice_cache_builds(b, base, cache_dir)
    frozen, feats = _feature_cache_builds(b, base, cache, cache_dir)
    _reads_vs_steps(b, base, cache, frozen, feats)


def _slice_cache_builds(b: Bench, base: Config, cache_dir: Path) -> SliceCache:
    """One slice-cache build, then three more trials' views of the same dataset that should only reopen it."""
    from lasegseg.train.trial import prepare_data

    t0 = time.perf_counter()
    data = prepare_data(base)
    build_s = time.perf_counter() - t0
    reopen = []
    for seed, patients in ((0, 2), (1, 4), (2, 0)):
        t0 = time.perf_counter()
        prepare_data(base.replace(seed=seed, **{"data.patients": patients}))
        reopen.append(time.perf_counter() - t0)
    built = [p for p in cache_dir.iterdir() if (p / "manifest.json").is_file()]
    b.report.add("data", "slice caches built for 4 trial views", float(len(built)), unit="", goal="≤ 1",
                 detail=f"build {build_s:.2f}s, reopen {statistics.median(reopen) * 1000:.0f} ms "
                        f"({build_s / statistics.median(reopen):.0f}× cheaper)")  # fmt: skip
    return data.cache


def _feature_cache_builds(b: Bench, base: Config, cache: SliceCache, cache_dir: Path) -> tuple[Segmenter, FeatureCache]:
    """The frozen model's feature cache built once and reopened; returns (frozen model, features)."""
    import torch

    from lasegseg.models.segmenter import build_segmenter
    from lasegseg.train.features import get_or_build_features

    torch.manual_seed(0)
    frozen = build_segmenter(base.replace(**{"model.mode": "frozen", "model.decoder": "linear"}).model)
    t0 = time.perf_counter()
    feats = get_or_build_features(frozen.backbone, cache)
    feat_build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    get_or_build_features(frozen.backbone, cache)
    feat_open_s = time.perf_counter() - t0
    n_feat = len(list((cache_dir / "features").glob("*/manifest.json")))
    b.report.add("data", "feature caches built for 2 frozen opens", float(n_feat), unit="", goal="≤ 1",
                 detail=f"build {feat_build_s:.2f}s, reopen {feat_open_s * 1000:.0f} ms")  # fmt: skip
    return frozen, feats


def _reads_vs_steps(b: Bench, base: Config, cache: SliceCache, frozen: Segmenter, feats: FeatureCache) -> None:
    """Batch reads (slices; slices + features) as a share of the linear decoder's fine-tuned and frozen steps."""
    import numpy as np
    import torch

    from lasegseg.models.segmenter import build_segmenter
    from lasegseg.train.losses import build_loss

    bs, n_batches = 16, (20 if b.quick else 80)
    rows, rng = np.arange(len(cache)), np.random.default_rng(0)
    batches = [np.sort(rng.choice(rows, bs, replace=False)) for _ in range(n_batches)]

    def read_slices() -> float:
        t = time.perf_counter()
        for idx in batches:
            torch.from_numpy(np.asarray(cache.images[idx]))[:, None].float()
            torch.from_numpy(np.asarray(cache.labels[idx]))[:, None].long()
        return (time.perf_counter() - t) / n_batches

    def read_features() -> float:
        t = time.perf_counter()
        for idx in batches:
            feats.batch(idx, torch.device("cpu"))
        return (time.perf_counter() - t) / n_batches

    loss_fn = build_loss(base.train.loss)
    x = torch.from_numpy(np.asarray(cache.images[batches[0]]))[:, None].float()
    y = torch.from_numpy(np.asarray(cache.labels[batches[0]]))[:, None].long()
    f = feats.batch(batches[0], torch.device("cpu"))
    finetune = build_segmenter(base.replace(**{"model.mode": "finetune", "model.decoder": "linear"}).model)

    def step(model, forward) -> float:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        t = time.perf_counter()
        for _ in range(n_batches):
            loss = loss_fn(forward(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t) / n_batches

    repeats = 3 if b.quick else 7
    read_slices(), read_features()  # warm the page cache, as every epoch after the first finds it
    slice_t, feat_t, ft_t, fr_t = [], [], [], []
    for _ in range(repeats):
        slice_t.append(read_slices())
        feat_t.append(read_features())
        ft_t.append(step(finetune, lambda: finetune(x)))
        fr_t.append(step(frozen, lambda: frozen.decode(f, x)))
    # Loader time as a share of the step it feeds; the cheapest steps (linear decoder) are the hardest case.
    b.report.ratio("data", "slice batch read / finetune-linear step", slice_t, ft_t, goal="≤ 0.10")
    both = [s + t for s, t in zip(slice_t, feat_t, strict=True)]
    b.report.ratio("data", "slice+feature read / frozen-linear step", both, fr_t, goal="≤ 0.10")
