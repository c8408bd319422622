"""Whole sweeps on a local Ray with a sqlite MLflow store: the bar of the sweep issue, faults and resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import quick_demo_yaml, sweep_env, sweep_runs

ROOT = Path(__file__).resolve().parents[2]
FEWSHOT = ROOT / "sweeps" / "fewshot.py"

pytestmark = pytest.mark.slow


def _sweep_cmd(data: Path, storage: Path, uri: str, *extra: str) -> list[str]:
    """The demo sweep (its DINOv3 cell included, at its own image size), 1 epoch on small slices."""
    storage.parent.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable, str(FEWSHOT), "--config", str(quick_demo_yaml(storage.parent)),
        "--data", str(data), "--tracking-uri", uri, "--storage-path", str(storage), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def demo_sweep(phantom_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    # --pseudonymize: what MLflow receives must hold aliases only (checked below); results are otherwise unchanged.
    proc = subprocess.run(
        _sweep_cmd(phantom_dir, tmp / "runs", uri, "--pseudonymize"), env=sweep_env(), capture_output=True, text=True,
        timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, uri, proc


def test_demo_sweep_logs_one_parent_and_every_trial(demo_sweep):
    tmp, uri, proc = demo_sweep
    client, exp, parents, trials = sweep_runs(uri, "lasegseg-demo")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert len(parents) == 1
    parent = parents[0]
    assert len(trials) == 20  # (2 decoders × 2 modes + the DINOv3 cell) × 2 patient counts × 2 seeds
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert all(t.info.status == "FINISHED" for t in trials)
    sizes = {(t.data.params["model.backbone"], t.data.params["data.image_size"]) for t in trials}
    assert sizes == {("tiny", "28"), ("tiny-dinov3", "32")}  # one sweep, two image sizes, two slice caches
    for t in trials:
        assert {"test_dice_mean", "test_nsd_mean", "best_val_dice"} <= set(t.data.metrics)
        assert t.data.params["model.decoder"] in ("linear", "multiscale")
        assert t.data.params["train.epochs"] == "1"
        assert "·s" in t.info.run_name
        artifacts = {a.path for a in client.list_artifacts(t.info.run_id)}
        assert {"model", "metrics.json", "per_patient.csv", "overlays.png"} <= artifacts
        steps = [m.step for m in client.get_metric_history(t.info.run_id, "train_loss")]
        assert steps == [0]
    assert len({t.data.tags["lasegseg.trial_id"] for t in trials}) == 20


def test_trials_run_on_the_warm_workers_the_cluster_started(demo_sweep):
    """No trial paid a process start: every one ran in a worker that Ray started with the local cluster (and that
    imported torch & co. while the driver built its caches), two of them for max_concurrent 2."""
    tmp, uri, proc = demo_sweep
    sweep_dir = tmp / "runs" / "lasegseg-demo"
    with open(sweep_dir / "trial_timings.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 20
    assert all(r["worker_prewarmed"] == "true" for r in rows)
    assert all(0 < float(r["worker_started_at"]) < float(r["tune_started_at"]) for r in rows)
    assert len({r["worker_pid"] for r in rows}) == 2
    # One machine, two frozen backbones (tiny at 28 px, tiny-dinov3 at 32 px): each one's features are computed at
    # most once (by its first frozen trial, under the lock, since this sweep's workers import transformers for its
    # fine-tuned trials anyway; not at all when an earlier sweep over the same phantom left them in the cache).
    built = [r["run_name"] for r in rows if r["features_built"] == "true"]
    assert len(built) <= 2 and len({name.split("·")[0] for name in built}) == len(built), built
    # Trials that run a backbone load it; the U-Net baseline has none; a frozen trial loads it only when no earlier
    # frozen trial of its backbone had published the features (at most 2 backbones × 2 concurrent trials).
    loaded = {r["run_name"]: r["backbone_loaded"] == "true" for r in rows}
    frozen = [n for n in loaded if "·frozen·" in n]
    assert all(loaded[n] for n in loaded if n not in frozen and not n.startswith("unet")), loaded
    assert not any(loaded[n] for n in loaded if n.startswith("unet"))
    assert sum(loaded[n] for n in frozen) <= 4 < len(frozen), loaded


def test_finished_trials_keep_no_training_state(demo_sweep):
    """Tune keeps one checkpoint per trial; once a trial has finished it is the run-id marker, not the weights and
    optimizer moments of its last epoch."""
    tmp, uri, proc = demo_sweep
    client, exp, parents, trials = sweep_runs(uri, "lasegseg-demo")
    kept = sorted((tmp / "runs" / "lasegseg-demo" / "tune").glob("*/trial_*/checkpoint_*"))
    assert len(kept) == 20
    assert {sorted(p.name for p in c.iterdir()) == ["mlflow_run.json"] for c in kept} == {True}
    assert {json.loads((c / "mlflow_run.json").read_text())["run_id"] for c in kept} == {t.info.run_id for t in trials}


def test_pseudonymized_sweep_sends_no_patient_id_to_mlflow(demo_sweep, phantom_dir):
    tmp, uri, proc = demo_sweep
    ids = sorted(p.name.removesuffix(".nii.gz") for p in (phantom_dir / "imagesTr").glob("*.nii.gz"))
    sweep_dir = tmp / "runs" / "lasegseg-demo"
    database = (tmp / "mlflow.db").read_bytes()
    assert not [i for i in ids if i.encode() in database]  # params, tags, metrics, run names
    texts = [p for p in (sweep_dir / "mlartifacts").rglob("*") if p.suffix in (".json", ".csv", ".md", ".yaml")]
    assert any(p.name == "per_patient.csv" for p in texts)
    for path in texts:
        assert not [i for i in ids if i in path.read_text()], path
    key = (sweep_dir / "pseudonyms.csv").read_text()
    assert all(i in key for i in ids)  # the local key maps every alias back


def test_demo_sweep_summary_has_one_row_per_cell(demo_sweep):
    tmp, uri, proc = demo_sweep
    sweep_dir = tmp / "runs" / "lasegseg-demo"
    summary = pd.read_parquet(sweep_dir / "summary.parquet")
    assert len(summary) == 10
    assert set(summary["n"]) == {2}
    for col in (
        "test_dice_mean_mean",
        "test_dice_mean_std",
        "test_iou_mean_mean",
        "test_nsd_mean_mean",
        "val_dice_mean",
    ):
        assert col in summary.columns
    assert (sweep_dir / "summary.csv").is_file() and (sweep_dir / "summary.md").is_file()
    plots = list(sweep_dir.glob("fewshot_patients_*.png"))
    assert len(plots) == 2 and all(p.stat().st_size > 5000 for p in plots)


def test_aggregate_command_rebuilds_the_summary_from_mlflow_alone(demo_sweep, tmp_path):
    from lasegseg.cli import main

    tmp, uri, proc = demo_sweep
    assert main(["aggregate", "--experiment", "lasegseg-demo", "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    ours = pd.read_parquet(tmp_path / "summary.parquet").sort_values("cell").reset_index(drop=True)
    theirs = pd.read_parquet(tmp / "runs" / "lasegseg-demo" / "summary.parquet").sort_values("cell")
    pd.testing.assert_frame_equal(ours, theirs.reset_index(drop=True))


def test_sweep_prints_and_logs_the_paired_comparison(demo_sweep):
    tmp, uri, proc = demo_sweep
    sweep_dir = tmp / "runs" / "lasegseg-demo"
    comparison = pd.read_parquet(sweep_dir / "comparison.parquet")
    assert len(comparison) == 10 and comparison["n_pairs"].isna().sum() == 1  # the reference, then 9 cells
    assert "tiny-dinov3" in set(comparison["model.backbone"])
    assert "Δ median [95% CI]" in proc.stdout and "p Holm" in proc.stdout and "W/T/L" in proc.stdout
    # The comparison follows the summary in the sweep's output.
    assert proc.stdout.index("Dice mean ± std") < proc.stdout.index("Δ median [95% CI]")
    client, _, parents, _ = sweep_runs(uri, "lasegseg-demo")
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "summary")}
    assert {"summary/comparison.parquet", "summary/comparison.md"} <= logged


def test_report_page_of_the_demo_sweep_renders_in_chromium(demo_sweep, tmp_path):
    import matplotlib.image as mpimg

    from lasegseg.cli import main
    from tests.helpers import headless_chromium

    tmp, uri, proc = demo_sweep
    page = tmp_path / "report.html"
    assert main(["report", "--experiment", "lasegseg-demo", "--tracking-uri", uri, "--out", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert "Paired comparison" in text and "Best model (chosen on validation)" in text and 'id="notes"' not in text
    client, _, parents, _ = sweep_runs(uri, "lasegseg-demo")
    assert "report/report.html" in {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    shot = tmp_path / "report.png"
    dom = headless_chromium(page, tmp_path, screenshot=shot)
    for table in ("summary-table", "comparison-table"):
        assert f'id="{table}"' in dom
    # Two few-shot curves, the per-patient dots and the best run's overlays, all embedded.
    assert dom.count('src="data:image/png;base64,') >= 4
    image = mpimg.imread(shot)[..., :3]
    non_white = (image < 0.9).any(axis=-1).mean()
    assert image.std() > 0.05 and non_white > 0.03, (image.std(), non_white)


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--set", "model.decodr=linear"], "unknown config key 'model.decodr'"),
        (["--set", "optim.lr=0"], "'optim.lr' must be > 0"),
        (["--set", "data.fraction=2"], "'data.fraction' must be in (0, 1]"),
        (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    ],
)
def test_bad_sweeps_are_refused_before_any_trial(phantom_dir, tmp_path, extra, needle):
    cmd = _sweep_cmd(phantom_dir, tmp_path / "runs", f"sqlite:///{tmp_path / 'db.sqlite'}") + extra
    proc = subprocess.run(cmd, env=sweep_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "lasegseg-demo" / "tune").exists()


def test_missing_data_folder_is_refused(tmp_path):
    cmd = _sweep_cmd(tmp_path / "nowhere", tmp_path / "runs", f"sqlite:///{tmp_path / 'db.sqlite'}")
    proc = subprocess.run(cmd, env=sweep_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr


def _one_trial_yaml(tmp_path: Path, epochs: int) -> Path:
    cfg = tmp_path / "one.yaml"
    cfg.write_text(
        f"name: fault\nbase: {{data.image_size: 28, train.epochs: {epochs}, model.decoder: linear, "
        "model.mode: finetune}\nseeds: [0]\nresources: {cpus_per_trial: 1, max_concurrent: 1, max_failures: 2}\n"
    )
    return cfg


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_the_sweep_on_a_started_cluster(phantom_dir, tmp_path):
    """`ray start --head` (token auth) then `ray job submit --working-dir . -- python sweeps/fewshot.py …`."""
    ray_bin = Path(sys.executable).parent / "ray"
    env = sweep_env()
    env["RAY_AUTH_MODE"] = "token"
    gcs, dash = _free_port(), _free_port()
    start = subprocess.run(
        [str(ray_bin), "start", "--head", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        submit = subprocess.run(
            [str(ray_bin), "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={ROOT}", "--",
             "python", "sweeps/fewshot.py", "--config", str(_one_trial_yaml(tmp_path, 2)), "--data", str(phantom_dir),
             "--tracking-uri", uri, "--storage-path", str(tmp_path / "runs")],
            env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in (submit.stdout + submit.stderr).lower()
        _, _, parents, trials = sweep_runs(uri, "fault")
        assert len(parents) == 1 and len(trials) == 1 and trials[0].info.status == "FINISHED"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_a_screened_study_goes_on_past_a_failed_cell_and_names_it(phantom_dir, tmp_path):
    """Two cells screen side by side: one on a stand-in of a named backbone, one whose backbone folder exists on no
    node (the config is valid; the model fails in every screening trial). The good cell's grid runs at its chosen
    rate; the failed cell's grid never starts; the exit names it in one line; the parent run carries the tags."""
    sweep = tmp_path / "study.yaml"
    sweep.write_text(json.dumps({
        "name": "cells", "base": {"data.image_size": 28, "train.epochs": 1, "train.batch_size": 8},
        "grid": {"model.backbone": ["dinov2-small"], "model.decoder": ["linear"], "model.mode": ["frozen"]},
        "fewshot": [{"data.patients": 2}], "seeds": [0, 1],
        "baselines": [{"model.backbone": str(tmp_path / "no-such-backbone"), "model.decoder": "linear",
                       "model.mode": "finetune"}],
        "screen": {"low": 1e-4, "high": 1e-2, "trials": 2, "scheduler": "fifo", "set": {"train.epochs": 1}},
        "resources": {"max_concurrent": 2, "max_failures": 0},
    }))  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, str(FEWSHOT), "--config", str(sweep), "--data", str(phantom_dir), "--tracking-uri", uri,
           "--storage-path", str(tmp_path / "runs"), "--stand-in-backbones"]  # fmt: skip
    proc = subprocess.run(cmd, env=sweep_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed cell ")]
    assert failed == [f"failed cell {tmp_path / 'no-such-backbone'}/linear/finetune: every screening trial failed, "
                      "so its grid did not run"]  # fmt: skip
    assert "screened dinov2-small/linear/frozen: lr " in proc.stdout
    client, exp, parents, grid = sweep_runs(uri, "cells")
    (parent,) = parents
    assert parent.data.tags["lasegseg.failed_cells"].endswith("no-such-backbone/linear/finetune")
    assert parent.data.tags["lasegseg.stand_in_backbones"] == "true"
    chosen = float(parent.data.params["screen.lr.dinov2-small/linear/frozen"])
    assert len(grid) == 2 and all(r.info.status == "FINISHED" for r in grid)  # the good cell's 2 seeds
    assert [float(r.data.params["optim.lr"]) for r in grid] == pytest.approx([chosen, chosen])
    runs = client.search_runs([exp.experiment_id], "tags.`lasegseg.role` = 'screen'")
    screens = [r for r in runs if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    assert sorted(r.info.status for r in screens) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
