"""The study's plan as --dry-run prints it: counts by stage, backbone and mode; GPU time only with --plan-gpus; the
storage and MLflow lines with the small sweep's numbers."""

from __future__ import annotations

from pathlib import Path

from lasegseg.config import Config
from lasegseg.sweep.estimate import PlanOptions
from lasegseg.sweep.plan_report import print_plan
from lasegseg.sweep.spec import load_spec, parse_spec
from tests.sweep.test_estimate import HAND, OPTS


def _lines(capsys, raw: dict, opts: PlanOptions) -> list[str]:
    spec = parse_spec(raw)
    print_plan(spec, spec.trials(), opts)
    return capsys.readouterr().out.splitlines()


def test_the_plan_of_a_small_sweep(capsys):
    out = _lines(capsys, HAND, OPTS)
    assert out[0] == "trials: 6 = grid 6"
    assert out[1].split() == ["stage", "backbone", "frozen", "finetune", "lora", "total"]
    assert out[2].split() == ["grid", "dinov2-small", "3", "3", "0", "6"]
    assert out[3] == "GPU time on 2 × A100 (312 TFLOP/s dense bf16), FLOPs at MFU 0.5; 100 cases × 100 slices"
    assert out[4].startswith("  (train 60 / val 20 / test 20 patients;")
    rows = {tuple(line.split()[:3]): line.split() for line in out if line.startswith("  ") and len(line.split()) > 8}
    assert rows[("features", "dinov2-small", "frozen")][-1] == "FLOPs"
    assert rows[("grid", "dinov2-small", "finetune")][3:5] == ["3", "1"]  # trials, GPU share
    total = next(line for line in out if line.startswith("  total "))
    assert total.startswith("  total 0.00466 GPU-h (features 0.000218, grid 0.00444); the study's wall time 11 s on 2")
    # 100 × 100 slices of 224² pixels at 3 B; DINOv2-S's last level only (the linear head): 256 tokens × 384 × 2 B.
    assert "  slice cache, on every node: 224 px 1.51 GB (10000 slices, fp16 image + uint8 label)" in out
    feature_row = next(line for line in out if line.startswith("    dinov2-small"))
    assert feature_row.split() == ["dinov2-small", "224", "1.97", "GB", "1", "1.97", "GB", "256", "×", "384"]
    state_row = [line for line in out if line.startswith("    dinov2-small")][1]
    assert state_row.split() == ["dinov2-small", "24.6", "KB", "353", "MB", "–"]
    assert "    at most 706 MB at once on 2 GPUs; a finished trial keeps a marker only (6 × 8 KB = 48 KB)" in out
    params = len(Config().to_flat())
    assert out[-1] == f"MLflow: 7 runs (one parent), {params} params each, 576 metric points (96–96 per trial)"


def test_without_plan_gpus_the_plan_says_how_to_get_gpu_time(capsys):
    out = _lines(capsys, HAND, PlanOptions(cases=100, slices=100))
    assert not any(line.startswith("GPU time on") for line in out)
    assert "GPU time: add --plan-gpus N (and --plan-card, --plan-mfu) for GPU-hours and wall time on N GPUs" in out
    assert not any("at once on" in line for line in out)


def test_a_screened_sweep_counts_its_screen_by_cell(capsys):
    raw = {**HAND, "screen": {"low": 1e-4, "high": 1e-2, "trials": 3, "set": {"train.epochs": 5}},
           "baselines": [{"model.backbone": "none", "model.decoder": "unet", "model.mode": "finetune"}]}  # fmt: skip
    out = _lines(capsys, raw, OPTS)
    assert out[0] == "trials: 18 = screen 9 (3 cells × 3) + grid 9"
    table = [line.split() for line in out[2:6]]
    assert table == [
        ["screen", "dinov2-small", "3", "3", "0", "6"],
        ["screen", "none", "(UNet)", "0", "3", "0", "3"],
        ["grid", "dinov2-small", "3", "3", "0", "6"],
        ["grid", "none", "(UNet)", "0", "3", "0", "3"],
    ]


def test_the_readme_shows_the_plan_of_the_paper_grid_on_16_h100s(capsys):
    root = Path(__file__).resolve().parents[2]
    command = "python sweeps/fewshot.py --config sweeps/configs/paper.yaml --dry-run --plan-gpus 16\n"
    shown = (root / "README.md").read_text().split(command, 1)[1].split("```", 1)[0]
    spec = load_spec(root / "sweeps" / "configs" / "paper.yaml")
    print_plan(spec, spec.trials(), PlanOptions(gpus=16))
    assert shown == capsys.readouterr().out
