"""1. step — the training loop's step time vs a bare PyTorch loop on the same model and batch (goal ≤ 1.05×)."""

from __future__ import annotations

import time

from bench.harness import IMAGE_SIZE, Bench


def measure(b: Bench) -> None:
    """The lasegseg epoch loop (memory-mapped fp16 slices, LR schedule) vs a bare loop over ready tensors.

    --quick uses the grids' 56 px (a step there is ~4× cheaper, so fixed per-step costs weigh more, not less).
    """
    size = IMAGE_SIZE if b.quick else 112
    for decoder, mode in (("multiscale", "finetune"), ("linear", "frozen")):
        _measure_one(b, decoder, mode, size)


def _measure_one(b: Bench, decoder: str, mode: str, size: int) -> None:
    import numpy as np
    import torch

    from lasegseg.config import Config
    from lasegseg.models.segmenter import build_segmenter, param_groups
    from lasegseg.train.fit import lr_factor, train_one_epoch
    from lasegseg.train.losses import build_loss
    from lasegseg.train.trial_data import prepare_data

    cfg = Config().replace(**{"data.path": str(b.phantom), "data.image_size": size, "model.decoder": decoder,
                              "model.mode": mode, "train.batch_size": 16})  # fmt: skip
    data = prepare_data(cfg)
    steps = 6 if b.quick else 20
    order = np.resize(data.train_rows, steps * cfg.train.batch_size)
    torch.manual_seed(0)
    model = build_segmenter(cfg.model)
    groups = param_groups(model, cfg.optim.lr, cfg.model.backbone_lr_mult, cfg.optim.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 1000, 10, 0.01))
    loss_fn = build_loss(cfg.train.loss)
    device = torch.device("cpu")
    idx = np.sort(order[: cfg.train.batch_size])
    x = torch.from_numpy(data.cache.images[idx].astype(np.float32))[:, None]
    y = torch.from_numpy(data.cache.labels[idx].astype(np.int64))[:, None]

    def bare() -> float:
        t = time.perf_counter()
        for _ in range(steps):
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t) / steps

    def ours() -> float:
        t = time.perf_counter()
        train_one_epoch(model, opt, loss_fn, data.cache.images, data.cache.labels, order,
                        batch_size=cfg.train.batch_size, device=device, amp="auto",
                        scheduler=schedule)  # fmt: skip
        return (time.perf_counter() - t) / steps

    model.train()
    bare(), ours()  # warm-up
    repeats = 3 if b.quick else 7
    a, r = [], []
    for _ in range(repeats):  # interleaved so machine noise hits both alike
        r.append(bare())
        a.append(ours())
    b.report.ratio("step", f"train step {decoder}/{mode} {size}px b16", a, r, goal="≤ 1.05")
