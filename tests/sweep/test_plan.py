"""What a sweep will run, checked before anything starts: flags over the sweep file, storage root, data, pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lasegseg.errors import ConfigError, DataError
from lasegseg.sweep.flags import build_parser
from lasegseg.sweep.plan import apply_resource_flags, check_pool, plan_sweep, print_trials, screen_note, storage_root
from lasegseg.sweep.runner import main

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "sweeps" / "configs" / "demo.yaml"


def _job(monkeypatch, runtime_env: dict) -> None:
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": runtime_env, "metadata": {}}))


def test_the_plan_holds_the_trials_their_data_and_their_folder(phantom_dir, tmp_path, capsys):
    args = build_parser().parse_args(
        ["--config", str(DEMO), "--data", str(phantom_dir), "--storage-path", str(tmp_path), "--experiment", "x",
         "--max-concurrent", "3", "--set", "train.epochs=2"]
    )  # fmt: skip
    plan = plan_sweep(args)
    assert plan.name == "x" and plan.sweep_dir == tmp_path / "x" and plan.root.uri == str(tmp_path / "x")
    assert len(plan.trials) == 20 and plan.overrides == {"train.epochs": 2}
    assert {(t["data.path"], t["train.epochs"]) for t in plan.trials} == {(str(phantom_dir), 2)}
    assert plan.spec.resources.max_concurrent == 3 and screen_note(plan.spec) == ""
    assert print_trials(plan) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("  linear·frozen·p2·lr0.001·s") and all(line.startswith("  ") for line in lines[:20])
    assert lines[20] == "trials: 20 = grid 20"  # then the study's plan


def test_a_long_list_of_trials_is_cut_unless_asked_for(phantom_dir, tmp_path, capsys):
    argv = ["--config", str(DEMO), "--data", str(phantom_dir), "--storage-path", str(tmp_path)]
    sweep = plan_sweep(build_parser().parse_args(argv))
    trials = sweep.trials
    sweep.trials = trials * 2  # 40 trials: listed in full
    print_trials(sweep)
    assert capsys.readouterr().out.splitlines()[40].startswith("trials: ")
    sweep.trials = trials * 3  # 60: the first 20, then how many more
    print_trials(sweep)
    lines = capsys.readouterr().out.splitlines()
    assert lines[20] == "  … and 40 more (--list lists every trial)" and lines[21].startswith("trials: ")
    listed = plan_sweep(build_parser().parse_args([*argv, "--list"]))
    listed.trials = trials * 3
    print_trials(listed)
    assert capsys.readouterr().out.splitlines()[60].startswith("trials: ")


def test_a_missing_data_folder_is_refused(tmp_path):
    args = build_parser().parse_args(["--config", str(DEMO), "--data", str(tmp_path / "nowhere")])
    with pytest.raises(DataError, match="nowhere: dataset folder does not exist"):
        plan_sweep(args)


def test_a_negative_resource_flag_is_refused():
    args = build_parser().parse_args(["--cpus-per-trial", "-1"])
    with pytest.raises(ConfigError, match="--cpus-per-trial must be >= 0, got -1.0"):
        apply_resource_flags(args, object())


def test_few_shot_sizes_beyond_the_training_pool_are_refused():
    trial = {"data.split_seed": 0, "data.val_fraction": 0.2, "data.test_fraction": 0.2, "data.patients": 3}
    cases = [f"c{i}" for i in range(5)]  # 3 train, 1 val, 1 test
    check_pool([trial], cases)
    with pytest.raises(ConfigError, match="asks for 4 patients but the training pool has 3"):
        check_pool([{**trial, "data.patients": 4}], cases)


def test_results_of_a_submitted_job_land_outside_its_temporary_working_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("LASEGSEG_STORAGE", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert storage_root(None).path == str(tmp_path / "runs")  # by hand: ./runs
    _job(monkeypatch, {"working_dir": "gcs://_ray_pkg_x.zip"})
    assert storage_root(None).path == str(tmp_path / "lasegseg" / "runs")
    assert storage_root("out").path == str(tmp_path / "lasegseg" / "out")
    assert storage_root(str(tmp_path / "abs")).path == str(tmp_path / "abs")
    assert storage_root("s3://bucket/runs").uri == "s3://bucket/runs"


def test_cli_frozen_gpu_share_is_checked_in_one_line(capsys):
    assert main(["--config", str(ROOT / "sweeps" / "configs" / "demo.yaml"), "--frozen-gpus-per-trial", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fewshot.py: error: --frozen-gpus-per-trial must be a GPU share in (0, 1] (e.g. 0.25 packs 4 trials per GPU), "
        "got 2.0"
    ]
