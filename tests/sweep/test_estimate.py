"""The study's plan priced against a hand computation: a small sweep's FLOPs, GPU-hours, training state, artifacts
and MLflow points; measured rows win over FLOPs; bad --plan-* flags are refused in one line."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from lasegseg.errors import ConfigError
from lasegseg.sweep.estimate import (
    CARDS,
    DEFAULT_CARD,
    DEFAULT_CASES,
    DEFAULT_MFU,
    DEFAULT_SLICES,
    Measured,
    PlanOptions,
    dataset,
    image_flops,
    kinds,
    metric_points,
    plan_options,
    price_study,
    trial_work,
    validation_slices,
)
from lasegseg.sweep.runner import main
from lasegseg.sweep.spec import parse_spec
from lasegseg.sweep.timeline import schedule

DEMO = Path(__file__).resolve().parents[2] / "sweeps" / "configs" / "demo.yaml"
# 2 cells (finetune, frozen) × 3 seeds of DINOv2-S at 224 px with the linear head, 10 patients, 20 epochs.
HAND = {
    "name": "hand",
    "base": {"model.backbone": "dinov2-small", "data.image_size": 224, "train.epochs": 20,
             "data.val_fraction": 0.2, "data.test_fraction": 0.2},
    "grid": {"model.decoder": ["linear"], "model.mode": ["finetune", "frozen"]},
    "fewshot": [{"data.patients": 10}],
    "seeds": [0, 1, 2],
    "resources": {"gpus_per_trial": 1, "frozen_gpus_per_trial": 0.5},
}  # fmt: skip
# 100 cases × 100 slices on A100s (312 TFLOP/s) at MFU 0.5: 1.56e14 FLOP/s.
OPTS = PlanOptions(gpus=2, card="a100", mfu=0.5, cases=100, slices=100)

# By hand. DINOv2-S: width 384, 12 blocks, MLP 1536, patch 14; at 224 px 16 × 16 = 256 patches, 257 tokens.
BLOCK = 2 * 257 * (4 * 384**2 + 2 * 384 * 1536) + 4 * 257**2 * 384  # matmuls + attention, per block
EMBED = 2 * 256 * 3 * 14 * 14 * 384  # the patch embedding
HEAD = 2 * 384 * 2 * 256  # the linear head: 1×1 conv 384 → 2 on 256 patches
FINETUNE_STEP = 2 * EMBED + 3 * 12 * BLOCK + 3 * HEAD
FORWARD = EMBED + 12 * BLOCK + HEAD
# Split of 100: test 20, val 20, train 60 patients. 10 patients × 100 slices = 1000 training slices × 20 epochs.
# Validation: 2000 slices over a budget of 0.2 × 1000 = 200 → every 10th slice (from the 5th): 10 per volume × 20
# volumes = 200 per epoch × 20 epochs = 4000; then the chosen epoch on all 2000, the test's 2000 and 6 overlay panels.
TRAIN_IMAGES, INFER_IMAGES = 20 * 1000, 4000 + 2000 + 2000 + 6
FINETUNE_FLOPS = TRAIN_IMAGES * FINETUNE_STEP + INFER_IMAGES * FORWARD
FROZEN_FLOPS = TRAIN_IMAGES * 3 * HEAD + INFER_IMAGES * HEAD  # the decoder alone, on cached features
FEATURE_PASS_FLOPS = 100 * 100 * (EMBED + 12 * BLOCK)  # every slice once through the frozen backbone
RATE = 312e12 * 0.5


def test_the_hand_computation_itself():
    assert (BLOCK, EMBED, HEAD) == (1_010_959_872, 115_605_504, 393_216)
    assert (FINETUNE_FLOPS, FROZEN_FLOPS, FEATURE_PASS_FLOPS) == (830_592_543_535_104, 26_741_047_296,
                                                                 122_471_239_680_000)  # fmt: skip


def test_a_small_sweep_costs_what_the_hand_computation_says():
    spec = parse_spec(HAND)
    cost = price_study(spec, spec.trials(), OPTS)
    ds = cost.dataset
    assert (ds.train, ds.val, ds.test) == (60, 20, 20)
    groups = kinds(cost.trials)
    assert list(groups) == [("features", "dinov2-small", "frozen"), ("grid", "dinov2-small", "finetune"),
                            ("grid", "dinov2-small", "frozen")]  # fmt: skip
    (feature_pass,), tuned, frozen = groups.values()
    assert len(tuned) == len(frozen) == 3
    assert tuned[0].gpu_s == pytest.approx(FINETUNE_FLOPS / RATE, rel=1e-12)  # 5.32 s
    assert frozen[0].gpu_s == pytest.approx(FROZEN_FLOPS / RATE, rel=1e-12)
    assert feature_pass.gpu_s == pytest.approx(FEATURE_PASS_FLOPS / RATE, rel=1e-12)  # 0.785 s
    assert {t.source for t in cost.trials} == {"FLOPs"}
    gpu_hours = sum(t.gpu_s for t in cost.trials) / 3600
    assert f"{gpu_hours:.3g}" == "0.00466"  # (3 × 5.3243 + 3 × 0.000171 + 0.7851) s = 16.76 s
    # Two GPUs: the feature pass (0.5 GPU, 1.57 s at that share) and a fine-tuned trial start; the frozen trials fill
    # the pass's other half; the second and third fine-tuned trials follow on the two cards: 2 × 5.324 s.
    timeline = schedule(cost.trials, OPTS.gpus)
    assert timeline.seconds == pytest.approx(2 * FINETUNE_FLOPS / RATE, rel=1e-9)
    # DINOv2-S has 22,056,576 parameters, the linear head 1,538 (BatchNorm 2 × 384, conv 384 × 2 + 2).
    assert tuned[0].state_bytes == (22_056_576 + 1_538) * 16 and frozen[0].state_bytes == 1_538 * 16
    assert timeline.peak_state_bytes == 2 * tuned[0].state_bytes
    assert tuned[0].artifact_bytes == (22_056_576 + 1_538) * 4 + 900_000 + 50_000
    assert tuned[0].metric_points == 20 * 4 + 16


def test_a_measured_row_replaces_the_flops_of_its_phase():
    spec = parse_spec(HAND)
    row = Measured("a100", "dinov2-small", "finetune", "linear", 224, "train", 500.0, "a test row")
    cost = price_study(spec, spec.trials(), OPTS, measured=(row,))
    tuned = kinds(cost.trials)[("grid", "dinov2-small", "finetune")][0]
    assert tuned.gpu_s == pytest.approx(TRAIN_IMAGES / 500.0 + INFER_IMAGES * FORWARD / RATE, rel=1e-12)
    assert tuned.source == "measured+FLOPs"
    other_card = price_study(spec, spec.trials(), PlanOptions(card="h100", cases=100, slices=100), measured=(row,))
    assert {t.source for t in other_card.trials} == {"FLOPs"}


def test_trial_work_follows_few_shot_size_fraction_and_validation_budget():
    ds = dataset(130, 88, 0.1, 0.2)
    assert (ds.train, ds.val, ds.test) == (91, 13, 26)
    flat = {"data.patients": 0, "data.fraction": 0.5, "train.epochs": 50, "train.eval_every": 1,
            "train.val_budget": 0.2}  # fmt: skip
    # Half of 91 × 88: 4004 training slices. The 1144 validation slices exceed the budget of 0.2 × 4004 = 800.8, so
    # every 2nd slice is read: 44 per volume × 13 = 572.
    work = trial_work(flat, ds)
    assert work.train == 50 * 4004 and work.infer == 50 * 572 + 1144 + 26 * 88 + 6
    full = trial_work({**flat, "data.fraction": 1.0, "train.eval_every": 4}, ds)  # 1601.6 ≥ 1144: every slice
    assert full.infer == 13 * 1144 + 26 * 88 + 6  # epochs 4, 8, …, 48 and the last: 13 validations


def test_unpriced_architectures_say_so():
    spec = parse_spec({**HAND, "base": {**HAND["base"], "model.backbone": "tiny"}})
    flat = {**spec.trials()[0], "model.backbone": "org/custom-vit"}
    assert image_flops(flat) is None
    cost = price_study(spec, [flat], OPTS)
    assert [t.source for t in cost.trials if t.stage == "grid"] == ["unpriced"]
    assert math.isnan(cost.trials[-1].gpu_s) and schedule(cost.trials, 1).busy_gpu_s >= 0


def test_metric_points_count_the_tracked_series_and_final_values():
    from lasegseg.tracking.tracker import final_metrics

    flat = {"train.epochs": 10, "train.eval_every": 3}
    # train_loss and lr every epoch, val_dice and val_iou on epochs 3, 6, 9 and the last, the final values once.
    assert metric_points(flat) == 2 * 10 + 2 * 4 + len(final_metrics({}))


def _args(**flags) -> argparse.Namespace:
    base = {"plan_gpus": None, "plan_card": None, "plan_mfu": None, "plan_cases": None, "plan_slices": None,
            "list": False}  # fmt: skip
    return argparse.Namespace(**{**base, **flags})


def test_plan_flags_default_to_the_stated_values():
    assert plan_options(_args()) == PlanOptions(None, "h100", 0.35, 130, 88, False)
    assert plan_options(_args(plan_gpus=16, plan_card="H200", list=True)) == PlanOptions(16, "h200", list_all=True)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("plan_gpus", 0, "--plan-gpus must be >= 1, got 0"),
        ("plan_gpus", -2, "--plan-gpus must be >= 1, got -2"),
        ("plan_card", "tpu", f"--plan-card: unknown card 'tpu' (known: {', '.join(CARDS)})"),
        ("plan_mfu", 1.5, "--plan-mfu must be in (0, 1], got 1.5"),
        ("plan_cases", 2, "--plan-cases must be >= 3 (a train/val/test split), got 2"),
        ("plan_slices", 0, "--plan-slices must be >= 1, got 0"),
    ],
)
def test_bad_plan_flags_are_refused_naming_the_flag(flag, value, message):
    with pytest.raises(ConfigError) as info:
        plan_options(_args(**{flag: value}))
    assert str(info.value) == message


def test_the_command_line_refuses_a_bad_plan_flag_in_one_line(tmp_path, capsys):
    argv = ["--config", str(DEMO), "--storage-path", str(tmp_path), "--dry-run", "--plan-gpus", "16"]
    assert main([*argv, "--plan-card", "v100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fewshot.py: error: --plan-card: unknown card 'v100' (known: {', '.join(CARDS)})"]
    assert main([*argv[:-1], "-3"]) == 2
    assert capsys.readouterr().err.strip() == "fewshot.py: error: --plan-gpus must be >= 1, got -3"
    assert not any(tmp_path.iterdir())  # refused before the sweep folder or a phantom was made


def test_the_card_table_has_bench_gpu_peaks():
    from bench.gpu_shapes import peak_tflops

    for card in CARDS.values():
        assert peak_tflops(f"NVIDIA {card.name}", None) == card.peak_tflops


@pytest.mark.parametrize(
    ("budget", "val", "train"), [(0.2, 1144, 4004), (0.2, 1144, 8008), (0.2, 1144, 88), (0.0, 500, 10), (0.5, 2000, 1)]
)
def test_validation_slices_are_the_ones_the_trial_reads(budget, val, train):
    from lasegseg.train.evaluation import strided_slices, validation_stride

    per_volume = 88 if val == 1144 else 100
    stride = validation_stride(budget, val, train)
    read = len(strided_slices(per_volume, stride)) * (val // per_volume) if stride > 1 else val
    assert validation_slices(budget, val, train, per_volume) == read


def test_the_flags_help_states_the_plans_defaults():
    from lasegseg.sweep.flags import build_parser

    text = " ".join(build_parser().format_help().split())
    for default in ("h100 (default)", f"(default {DEFAULT_MFU:g})", f"(default {DEFAULT_CASES})",
                    f"(default {DEFAULT_SLICES})"):  # fmt: skip
        assert default in text
    assert DEFAULT_CARD == "h100"
