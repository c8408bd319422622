"""Sweep YAML → trial list: grid expansion, overrides, and refusal of bad definitions before any trial."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lasegseg.errors import ConfigError
from lasegseg.sweep.spec import MAX_TRIALS, load_spec, parse_spec
from tests.sweep.conftest import sweep_spec

ROOT = Path(__file__).resolve().parents[2]


def test_grid_expands_to_full_cross_product_with_seeds():
    spec = parse_spec(sweep_spec())
    trials = spec.trials()
    assert len(trials) == 2 * 2 * 2 * 2
    combos = {(t["model.decoder"], t["model.mode"], t["data.patients"], t["data.fraction"], t["seed"]) for t in trials}
    assert len(combos) == 16
    assert all(t["train.epochs"] == 2 and t["data.image_size"] == 56 for t in trials)
    # the patients axis and the fraction axis never mix within one trial
    assert all(t["data.patients"] == 0 or t["data.fraction"] == 1.0 for t in trials)


def test_baselines_join_the_grid_and_overrides_win():
    spec = parse_spec(
        sweep_spec(baselines=[{"model.backbone": "none", "model.decoder": "unet"}]),
        overrides={"train.epochs": 1, "model.mode": "frozen"},
    )
    trials = spec.trials()
    assert {t["train.epochs"] for t in trials} == {1}
    assert {t["model.mode"] for t in trials} == {"frozen"}  # the mode axis collapsed to the override
    assert sum(t["model.decoder"] == "unet" for t in trials) == 2 * 2
    assert len(trials) == (2 + 1) * 2 * 2


def test_screening_cells_are_one_per_backbone_decoder_mode_on_all_data():
    spec = parse_spec(sweep_spec(screen={"low": 1e-5, "high": 1e-2, "trials": 3, "set": {"train.epochs": 3}}))
    cells = spec.screening_cells()
    assert len(cells) == 4
    assert all(c["data.patients"] == 0 and c["data.fraction"] == 1.0 and c["train.epochs"] == 3 for c in cells)
    lr = {
        ("tiny", False, d, m): 0.01 * (i + 1)
        for i, (d, m) in enumerate([(d, m) for d in ("linear", "multiscale") for m in ("frozen", "finetune")])
    }
    trials = spec.trials(lr_by_cell=lr)
    assert {(t["model.decoder"], t["model.mode"], t["optim.lr"]) for t in trials} == {
        (k[2], k[3], v) for k, v in lr.items()
    }


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"grid": {"model.decodr": ["linear"]}}, "unknown config key 'model.decodr'"),
        ({"grid": {"model.decoder": []}}, "'grid.model.decoder' must be a non-empty list"),
        ({"grid": {"optim.lr": [0.0, 1e-3]}}, "'optim.lr' must be > 0"),
        ({"grid": {"train.epochs": ["many"]}}, "'train.epochs' expects int"),
        ({"fewshot": [{"data.fraction": 1.5}]}, "'data.fraction' must be in (0, 1]"),
        ({"seeds": []}, "'seeds' must be a non-empty list"),
        ({"seeds": [0, 0]}, "duplicates"),
        ({"colour": "red"}, "unknown sweep key 'colour'"),
        ({"resources": {"gpus": 1}}, "unknown sweep key 'resources.gpus'"),
        ({"resources": {"max_concurrent": 1.5}}, "'resources.max_concurrent' expects a int"),
        ({"screen": {"low": 1e-2, "high": 1e-5}}, "0 < low < high"),
        ({"name": "../escape"}, "'name' must be a plain non-empty name"),
        ({"grid": {"model.decoder": ["linear"] * 2, "seed": list(range(MAX_TRIALS))}}, "more than the limit"),
    ],
)
def test_bad_sweeps_are_refused_naming_the_key(change, needle):
    with pytest.raises(ConfigError) as info:
        parse_spec(sweep_spec(**change))
    assert needle in str(info.value)


def test_shipped_sweep_files_parse():
    demo = load_spec(ROOT / "sweeps" / "configs" / "demo.yaml")
    trials = demo.trials()
    decoders = {t["model.decoder"] for t in trials}
    modes = {t["model.mode"] for t in trials}
    sizes = {(t["data.patients"], t["data.fraction"]) for t in trials}
    assert len(trials) >= 8 and len(decoders) >= 2 and len(modes) >= 2 and len(sizes) >= 2 and len(demo.seeds) >= 2
    paper = load_spec(ROOT / "sweeps" / "configs" / "paper.yaml")
    assert paper.screen is not None and len(paper.seeds) >= 3
    by_mode = {
        t["model.mode"]: paper.resources.for_trial(t)["gpu"] for t in paper.trials() if t["model.backbone"] != "none"
    }
    assert by_mode == {"frozen": 0.25, "finetune": 1, "lora": 1}  # frozen trials on cached features share a GPU
    assert {
        t["data.image_size"]
        for t in paper.trials(
            lr_by_cell={
                c: 1e-4
                for c in map(
                    lambda f: tuple(f[k] for k in ("model.backbone", "model.registers", "model.decoder", "model.mode")),
                    paper.trials(),
                )
            }
        )
    } == {448}


UNET_NEEDS_NONE = (
    "config key 'model.backbone' must be 'none' for model.decoder=unet (it reads only the image), got 'tiny'"
)
WHY = "(base and --set values apply to every cell, baselines included)"
PAPER = ROOT / "sweeps" / "configs" / "paper.yaml"


def test_a_set_that_breaks_the_baseline_cell_is_refused_naming_it():
    """--set model.backbone=tiny reaches the UNet baseline too: the model would refuse it, so the sweep does, up
    front, naming that cell and why a value it never set reached it."""
    with pytest.raises(ConfigError) as info:
        load_spec(PAPER, overrides={"model.backbone": "tiny"})
    message = str(info.value)
    assert message.startswith("trial {'model.decoder': 'unet', 'model.mode': 'finetune'} {'data.fraction': 0.01}")
    assert UNET_NEEDS_NONE in message and message.endswith(WHY) and "\n" not in message
    # A cell's own bad pairing, and a registers flag its family refuses, are caught the same way.
    with pytest.raises(ConfigError, match=r"trial \{'model.backbone': 'none', 'model.decoder': 'linear'\}"):
        parse_spec(sweep_spec(baselines=[{"model.backbone": "none", "model.decoder": "linear"}]))
    dinov3 = {"model.backbone": "tiny-dinov3", "model.registers": True, "data.image_size": 64}
    with pytest.raises(ConfigError, match="config key 'model.registers' must be false for backbone 'tiny-dinov3'"):
        parse_spec(sweep_spec(), overrides=dinov3)


def test_the_dry_run_refuses_it_at_once_in_one_line():
    cmd = [sys.executable, str(ROOT / "sweeps" / "fewshot.py"), "--config", str(PAPER), "--set", "model.backbone=tiny",
           "--dry-run"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stdout + out.stderr
    assert "trial {'model.decoder': 'unet'" in lines[0] and UNET_NEEDS_NONE in lines[0] and WHY in lines[0]


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read sweep file"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(bad)


def _packed(**resources):
    raw = sweep_spec(baselines=[{"model.backbone": "none", "model.decoder": "unet"}], resources=resources)
    raw["base"] = {**raw["base"], "model.mode": "frozen"}  # the baseline ignores the mode: it has no backbone
    return parse_spec(raw)


def test_frozen_backbone_trials_request_their_gpu_share():
    spec = _packed(gpus_per_trial=1, frozen_gpus_per_trial=0.25, cpus_per_trial=2)
    requests = {(t["model.backbone"], t["model.mode"]): spec.resources.for_trial(t)["gpu"] for t in spec.trials()}
    assert requests == {("tiny", "frozen"): 0.25, ("tiny", "finetune"): 1.0, ("none", "frozen"): 1.0}
    assert {spec.resources.for_trial(t)["cpu"] for t in spec.trials()} == {2.0}


@pytest.mark.parametrize("resources", [{"gpus_per_trial": 0, "frozen_gpus_per_trial": 0.25}, {"gpus_per_trial": 0.5}])
def test_frozen_share_changes_nothing_on_cpus_or_when_unset(resources):
    spec = _packed(**resources)
    gpus = resources["gpus_per_trial"]
    assert {spec.resources.for_trial(t)["gpu"] for t in spec.trials()} == {gpus}


@pytest.mark.parametrize("value", [0, -0.25, 1.5, "half", True, None])
def test_bad_frozen_gpu_share_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError) as info:
        _packed(gpus_per_trial=1, frozen_gpus_per_trial=value)
    message = str(info.value)
    assert "'resources.frozen_gpus_per_trial'" in message and "(0, 1]" in message and "\n" not in message
