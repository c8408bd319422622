"""The naive baseline: a per-trial PyTorch script written the way a researcher would, for bench/run.py to time.

    python bench/naive.py --data runs/phantom --decoders linear,conv --modes frozen --lrs 1e-3 --patients 2,4 \
        --seeds 0 --epochs 20 --image-size 56

A for-loop over the grid; every trial reads all volumes with nibabel again, reorients, normalises and resizes its
slices, trains in fp32 with AdamW and a Dice + cross-entropy loss, runs the backbone on every batch of every epoch
(under ``no_grad`` when frozen), validates every epoch on whole val volumes (3D Dice at native resolution) and tests
the best weights at the end. Nothing is cached between trials. From lasegseg it borrows only what makes the
comparison fair: the model builder (identical architecture and tiny backbone folder) and the seeded patient split
(identical training slices). The loss is plain torch rather than MONAI so the baseline does not pay MONAI's import.
Prints one line per trial and ``naive total <seconds>``; ``--json`` writes the per-trial timings.

``--variant plain`` is the loop a new user writes first: the same reading and model, BCE plus soft Dice, no
validation at all (the last epoch is the model), and the test patients scored on their resized slices.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lasegseg.config import ModelConfig  # noqa: E402
from lasegseg.data.splits import fewshot_patients, split_patients  # noqa: E402
from lasegseg.models.segmenter import build_segmenter  # noqa: E402


def read_dataset(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every case of an MSD-layout folder as canonical (RAS+) float32 image and bool label, keyed by case id."""
    listing = json.loads((root / "dataset.json").read_text())["training"]
    cases = {}
    for entry in listing:
        image = nib.as_closest_canonical(nib.load(root / entry["image"]))
        label = nib.as_closest_canonical(nib.load(root / entry["label"]))
        case_id = Path(entry["image"]).name.removesuffix(".gz").removesuffix(".nii")
        cases[case_id] = (image.get_fdata(dtype=np.float32), np.asarray(label.dataobj) == 1)
    return cases


def to_slices(image: np.ndarray, label: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, Y, Z) volume → (Z, 1, S, S) image in [0, 1] (0.5/99.5 percentile clip) and (Z, 1, S, S) int64 label."""
    lo, hi = np.percentile(image, [0.5, 99.5])
    norm = np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(norm, 2, 0)))[:, None].float()
    y = torch.from_numpy(np.ascontiguousarray(np.moveaxis(label, 2, 0)))[:, None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = F.interpolate(y, size=(size, size), mode="nearest-exact").long()
    return x, y


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The plain loop's loss: BCE plus soft Dice on the foreground logit (class 1 against class 0)."""
    fg = logits[:, 1] - logits[:, 0]
    y = target[:, 0].float()
    prob = fg.sigmoid()
    dice = (2 * (prob * y).sum() + 1e-5) / (prob.sum() + y.sum() + 1e-5)
    return F.binary_cross_entropy_with_logits(fg, y) + 1 - dice


@torch.no_grad()
def slice_dice(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Dice over a patient's resized slices (the plain loop scores at the training resolution)."""
    model.eval()
    pred = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]) == 1
    model.train()
    truth = y[:, 0] == 1
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def _set_up(args: argparse.Namespace, decoder: str, mode: str, lr: float, patients: int, seed: int) -> tuple:
    """Every volume read and resized again, the seeded split and few-shot patients, the model and AdamW."""
    cases = read_dataset(Path(args.data))
    slices = {cid: to_slices(image, label, args.image_size) for cid, (image, label) in cases.items()}
    split = split_patients(cases, 0, 0.2, 0.2)
    train_ids = fewshot_patients(split.train, seed, patients)
    train_x = torch.cat([slices[c][0] for c in train_ids])
    train_y = torch.cat([slices[c][1] for c in train_ids])
    torch.manual_seed(seed)
    model = build_segmenter(ModelConfig(backbone=args.backbone, decoder=decoder, mode=mode))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    return cases, slices, split, train_x, train_y, model, optimizer


def _train_epoch(args, model, optimizer, loss_fn, train_x, train_y, seed: int, epoch: int, schedule=None) -> float:
    """One epoch in the order seeded by (seed, epoch); returns ``time.perf_counter()`` after its first step."""
    order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(train_x)))
    first = None
    for i in range(0, len(order), args.batch_size):
        idx = order[i : i + args.batch_size]
        loss = loss_fn(model(train_x[idx]), train_y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        first = first or time.perf_counter()
    return first


def run_plain_trial(args: argparse.Namespace, decoder: str, mode: str, lr: float, patients: int, seed: int) -> dict:
    """The plain loop's trial: read, train every epoch without validation, score the test patients' slices."""
    t0 = time.perf_counter()
    cases, slices, split, train_x, train_y, model, optimizer = _set_up(args, decoder, mode, lr, patients, seed)
    model.train()
    first_step = _train_epoch(args, model, optimizer, bce_dice_loss, train_x, train_y, seed, 0) - t0
    for epoch in range(1, args.epochs):
        _train_epoch(args, model, optimizer, bce_dice_loss, train_x, train_y, seed, epoch)
    test = np.mean([slice_dice(model, *slices[c], args.batch_size) for c in split.test])
    return {"decoder": decoder, "mode": mode, "lr": lr, "patients": patients, "seed": seed, "val_dice": float("nan"),
            "test_dice": float(test), "n_train_slices": len(train_x), "first_step_s": first_step,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice over both classes, Dice pooled over the batch."""
    ce = F.cross_entropy(logits, target[:, 0])
    prob = logits.softmax(1)
    onehot = F.one_hot(target[:, 0], logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (prob * onehot).sum((0, 2, 3))
    denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return ce + (1 - (2 * inter + 1e-5) / (denom + 1e-5)).mean()


@torch.no_grad()
def dice_3d(model, x: torch.Tensor, label: np.ndarray, batch_size: int) -> float:
    """3D Dice of one volume: predict every slice, resize probabilities back to the native grid, threshold."""
    model.eval()
    probs = torch.cat([model(x[i : i + batch_size]).softmax(1)[:, 1:] for i in range(0, len(x), batch_size)])
    model.train()
    native = F.interpolate(probs, size=label.shape[:2], mode="bilinear", align_corners=False)[:, 0]
    pred = native.permute(1, 2, 0).numpy() >= 0.5
    total = pred.sum() + label.sum()
    return 1.0 if total == 0 else float(2 * (pred & label).sum() / total)


def run_trial(args: argparse.Namespace, decoder: str, mode: str, lr: float, patients: int, seed: int) -> dict:
    """One trial from the raw files to the test Dice of its best epoch."""
    t0 = time.perf_counter()
    cases, slices, split, train_x, train_y, model, optimizer = _set_up(args, decoder, mode, lr, patients, seed)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total = steps_per_epoch * args.epochs

    def warmup_cosine(step: int) -> float:  # one epoch of linear warm-up, then cosine to 1 % of the rate
        if step < steps_per_epoch:
            return (step + 1) / steps_per_epoch
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - steps_per_epoch) / max(1, total - steps_per_epoch)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    best, best_state = -1.0, None
    first_step = None
    model.train()
    for epoch in range(args.epochs):
        stepped = _train_epoch(args, model, optimizer, dice_ce_loss, train_x, train_y, seed, epoch, schedule)
        first_step = first_step or stepped - t0
        val = np.mean([dice_3d(model, slices[c][0], cases[c][1], args.batch_size) for c in split.val])
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test = np.mean([dice_3d(model, slices[c][0], cases[c][1], args.batch_size) for c in split.test])
    if args.out:
        out = Path(args.out) / f"{decoder}-{mode}-lr{lr:g}-p{patients}-s{seed}"
        out.mkdir(parents=True, exist_ok=True)
        torch.save(best_state, out / "model.pt")
    return {"decoder": decoder, "mode": mode, "lr": lr, "patients": patients, "seed": seed, "val_dice": float(best),
            "test_dice": float(test), "n_train_slices": len(train_x), "first_step_s": first_step,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MSD-layout dataset folder (dataset.json, imagesTr, labelsTr)")
    p.add_argument("--decoders", default="linear,conv,multiscale")
    p.add_argument("--modes", default="frozen")
    p.add_argument("--lrs", default="1e-3")
    p.add_argument("--patients", default="2,4")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--backbone", default="tiny", help="model.backbone: tiny, a size name, a hub id or a local folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--out", default="", help="save each trial's best weights here")
    p.add_argument("--json", default="", help="write per-trial results and timings here")
    p.add_argument("--variant", default="naive", choices=("naive", "plain"),
                   help="naive: validates every epoch on whole volumes, keeps the best epoch; plain: a for-loop "
                        "with no validation, BCE + soft Dice, test Dice on the resized slices")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    trial = run_plain_trial if args.variant == "plain" else run_trial
    results = []
    for decoder in args.decoders.split(","):
        for mode in args.modes.split(","):
            for lr in (float(v) for v in args.lrs.split(",")):
                for patients in (int(v) for v in args.patients.split(",")):
                    for seed in (int(v) for v in args.seeds.split(",")):
                        r = trial(args, decoder, mode, lr, patients, seed)
                        results.append(r)
                        print(f"{decoder}/{mode} lr={lr:g} patients={patients} seed={seed}: val {r['val_dice']:.3f} "
                              f"test {r['test_dice']:.3f}  {r['seconds']:.1f}s", flush=True)  # fmt: skip
    total = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps({"total_s": total, "trials": results}, indent=1))
    print(f"naive total {total:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
