"""2. data — slice-cache (and frozen-feature-cache) batch reads vs the model's step (loader never the bottleneck),
one cache build per dataset however many trials open it, and a cold build of full-size scans in 1 and in 2 worker
threads (goal: speed-up ≥ 0.7× linear).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.harness import IMAGE_SIZE, Bench

if TYPE_CHECKING:
    from lasegseg.config import Config
    from lasegseg.data.cache_read import SliceCache
    from lasegseg.models.segmenter import Segmenter
    from lasegseg.train.features import FeatureCache

# A LASC 2018 LGE-MRI scan (uint8 voxels, gzip-compressed), sliced at the size the full-resolution sweeps use.
FULL_SHAPE = (576, 576, 88)
FULL_IMAGE_SIZE = 448
BUILD_WORKERS = 2


def measure(b: Bench) -> None:
    """Cache builds per dataset, and batch reads from the caches vs the cheapest training steps they feed."""
    from lasegseg.config import Config

    cache_dir = b.fresh_cache("data")
    base = Config().replace(**{"data.path": str(b.phantom), "data.image_size": IMAGE_SIZE,
                               "data.cache_dir": str(cache_dir), "train.batch_size": 16})  # fmt: skip
    cache = _slice_cache_builds(b, base, cache_dir)
    frozen, feats = _feature_cache_builds(b, base, cache, cache_dir)
    _reads_vs_steps(b, base, cache, frozen, feats)
    measure_cache_build(b)


def _slice_cache_builds(b: Bench, base: Config, cache_dir: Path) -> SliceCache:
    """One slice-cache build, then three more trials' views of the same dataset that should only reopen it."""
    from lasegseg.train.trial_data import prepare_data

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
    from lasegseg.train.feature_build import get_or_build_features

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


def measure_cache_build(b: Bench, cases: int | None = None) -> None:
    """Cold slice-cache builds of full-size scans (576×576×88 → 448 px) in 1 and in 2 worker threads.

    The row is the speed-up per worker (1 = linear). Each build lists the cases and lets the workers read them, as
    :func:`lasegseg.data.cache.get_or_build_cache` does once the dataset is fingerprinted.

    Args:
        b: the benchmark run (scratch folder, quick mode, report).
        cases: how many scans (default 4 with ``--quick``, else 24).
    """
    from lasegseg.data.cache_write import build_cache
    from lasegseg.data.layouts import list_cases
    from lasegseg.data.preprocess import Preprocessing

    n = cases or (4 if b.quick else 24)
    name = f"cache build speed-up / linear, {BUILD_WORKERS} workers"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores < BUILD_WORKERS:
        b.report.add("data", name, None, goal="≥ 0.7", detail=f"needs {BUILD_WORKERS} usable cores")
        return
    root = write_full_size_dataset(Path(tempfile.mkdtemp(prefix="fullsize-", dir=b.tmp)), n)
    prep = Preprocessing(FULL_IMAGE_SIZE, 0.5, 99.5)
    seconds, loads = {}, []
    for workers in (1, BUILD_WORKERS):
        cache_dir = Path(tempfile.mkdtemp(prefix=f"cache-build-w{workers}-", dir=b.tmp))
        before, t0 = os.getloadavg()[0], time.perf_counter()
        build_cache(lambda: list_cases(root, "generic"), cache_dir, "fullsize", prep, workers=workers)
        seconds[workers] = time.perf_counter() - t0
        loads.append(f"{before:.1f}→{os.getloadavg()[0]:.1f}")
        shutil.rmtree(cache_dir)  # about 1.3 GB for 24 scans
    shutil.rmtree(root)
    speedup = seconds[1] / seconds[BUILD_WORKERS]
    shape = "×".join(map(str, FULL_SHAPE))
    b.report.add("data", name, speedup / BUILD_WORKERS, goal="≥ 0.7",
                 detail=f"{n} scans {shape} → {FULL_IMAGE_SIZE} px: 1 worker {seconds[1]:.1f}s, {BUILD_WORKERS} "
                        f"workers {seconds[BUILD_WORKERS]:.1f}s, speed-up {speedup:.2f}×, load average "
                        f"{' / '.join(loads)}")  # fmt: skip


def write_full_size_dataset(folder: Path, cases: int) -> Path:
    """``cases`` synthetic full-size scans as a generic-layout NIfTI dataset (``images/`` + ``labels/``).

    Each is a seeded uint8 volume of :data:`FULL_SHAPE` (an ellipsoid 'atrium' over uniform noise), about 21 MB
    gzip-compressed, written in about 2 s; the phantom generator takes some 40 s and 6 GB per scan at this size.

    Args:
        folder: the dataset folder (created).
        cases: number of scans.
    """
    import nibabel as nib
    import numpy as np

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    axes = [np.arange(n, dtype=np.float32) for n in FULL_SHAPE]
    affine = np.diag([0.625, 0.625, 1.25, 1.0])
    for i in range(cases):
        rng = np.random.default_rng(i)
        centre = np.array(FULL_SHAPE) * rng.uniform(0.4, 0.6, 3)
        radii = np.array(FULL_SHAPE) * np.array([0.12, 0.12, 0.25])
        d = [((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii, strict=True)]
        label = (d[0][:, None, None] + d[1][None, :, None] + d[2][None, None, :] < 1).astype(np.uint8)
        image = rng.integers(0, 48, FULL_SHAPE, dtype=np.uint8) + np.uint8(60) + np.uint8(100) * label
        nib.save(nib.Nifti1Image(image, affine), folder / "images" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labels" / f"case_{i:03d}.nii.gz")
    return folder
