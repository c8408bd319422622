"""The benchmark harness's plumbing: the naive baseline trains what lasegseg trains, grids, rows and fixed costs."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import pytest

from bench import bench_fixed, bench_floor, common, harness, naive, run


def test_naive_two_trials_train_the_same_slices_as_lasegseg(phantom_dir, tmp_path, capsys):
    from lasegseg.config import Config
    from lasegseg.train.trial_data import prepare_data

    out = tmp_path / "naive.json"
    argv = ["--data", str(phantom_dir), "--decoders", "linear", "--modes", "frozen,finetune", "--patients", "2",
            "--epochs", "1", "--image-size", "28", "--json", str(out), "--out", str(tmp_path / "models")]  # fmt: skip
    assert naive.main(argv) == 0
    result = json.loads(out.read_text())
    assert [t["mode"] for t in result["trials"]] == ["frozen", "finetune"]
    cfg = Config().replace(**{"data.path": str(phantom_dir), "data.image_size": 28, "data.patients": 2})
    expected = len(prepare_data(cfg).train_rows)
    for trial in result["trials"]:
        assert trial["n_train_slices"] == expected
        assert 0.0 <= trial["test_dice"] <= 1.0 and 0.0 <= trial["val_dice"] <= 1.0
        assert 0 < trial["first_step_s"] < trial["seconds"] <= result["total_s"]
    assert len(list((tmp_path / "models").glob("*/model.pt"))) == 2
    assert "naive total" in capsys.readouterr().out


def test_the_plain_loop_trains_every_epoch_without_validation_and_scores_the_test_slices(phantom_dir, tmp_path):
    from lasegseg.config import Config
    from lasegseg.train.trial_data import prepare_data

    out = tmp_path / "plain.json"
    argv = ["--variant", "plain", "--data", str(phantom_dir), "--decoders", "linear", "--modes", "finetune",
            "--patients", "2", "--epochs", "2", "--image-size", "28", "--json", str(out)]  # fmt: skip
    calls = []
    real = naive.dice_3d
    naive.dice_3d = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        assert naive.main(argv) == 0
    finally:
        naive.dice_3d = real
    (trial,) = json.loads(out.read_text())["trials"]
    assert calls == []  # no per-epoch validation on whole volumes
    cfg = Config().replace(**{"data.path": str(phantom_dir), "data.image_size": 28, "data.patients": 2})
    assert trial["n_train_slices"] == len(prepare_data(cfg).train_rows)
    assert 0.0 <= trial["test_dice"] <= 1.0 and trial["val_dice"] != trial["val_dice"]  # NaN: never validated


def test_the_plain_grid_is_the_issues_grid_on_both_sides(tmp_path):
    from lasegseg.sweep.spec import load_spec

    grid = harness.grids(quick=True)["plain"]
    path = tmp_path / "plain.yaml"
    path.write_text(grid.yaml())
    trials = load_spec(path).trials()
    assert len(trials) == grid.size == 16
    cells = {(t["model.decoder"], t["model.mode"], t["data.patients"], t["seed"]) for t in trials}
    assert len(cells) == 16 and {t["train.epochs"] for t in trials} == {15}
    args = naive.build_parser().parse_args(["--data", "x", *grid.naive_args()])
    assert args.modes == "frozen,finetune" and args.decoders == "linear,conv" and args.seeds == "0,1"


def test_grid_yaml_and_naive_arguments_describe_the_same_trials(tmp_path):
    from lasegseg.sweep.spec import load_spec

    grid = harness.grids(quick=True)["frozen"]
    path = tmp_path / "grid.yaml"
    path.write_text(grid.yaml())
    trials = load_spec(path).trials()
    assert len(trials) == grid.size == 12
    assert {t["model.mode"] for t in trials} == {"frozen"}
    assert {t["train.epochs"] for t in trials} == {grid.epochs}
    args = naive.build_parser().parse_args(["--data", "x", *grid.naive_args()])
    assert sorted(args.decoders.split(",")) == sorted({t["model.decoder"] for t in trials})
    assert {float(v) for v in args.lrs.split(",")} == {t["optim.lr"] for t in trials}
    assert {int(v) for v in args.patients.split(",")} == {t["data.patients"] for t in trials}
    assert args.image_size == trials[0]["data.image_size"] and args.epochs == grid.epochs
    assert harness.grids(quick=False)["frozen"].size == 36
    assert {g.epochs for g in harness.grids(quick=True, epochs=1).values()} == {1}


def test_vit_s_shaped_backbone_reaches_both_sides_through_from_pretrained(tmp_path, monkeypatch):
    """--backbone vit-s-shape: one random DINOv2 folder of ViT-S's shape, named by the sweep YAML and naive.py alike."""
    from lasegseg.models.segmenter import load_backbone
    from lasegseg.sweep.spec import load_spec

    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path / "cache"))  # Bench points it at its own folder
    bench = harness.Bench(tmp_path, True, common.Report(), backbone="vit-s-shape")
    folder = tmp_path / "base-cache" / "backbones" / "vit-s-shape"
    for grid in bench.grids.values():
        assert grid.backbone == str(folder)
        path = tmp_path / f"{grid.name}.yaml"
        path.write_text(grid.yaml())
        assert {t["model.backbone"] for t in load_spec(path).trials()} == {str(folder)}
        assert naive.build_parser().parse_args(["--data", "x", *grid.naive_args()]).backbone == str(folder)
    backbone = load_backbone(str(folder))
    assert backbone.embed_dim == 384 and backbone.model.config.num_hidden_layers == 12
    # Made once, then reused.
    assert harness.make_random_backbone(folder, harness.BENCH_BACKBONES["vit-s-shape"]) == folder
    assert harness.Bench(tmp_path / "t", True, common.Report()).grids["frozen"].backbone == "tiny"


def test_report_rows_judge_goals_and_print_a_summary(capsys):
    report = common.Report()
    assert report.ratio("step", "slow", [1.2, 1.1], [1.0, 1.0], goal="≤ 1.05").verdict == "MISS"
    fast = report.ratio("naive", "speed-up", [2.0, 3.0], [10.0, 12.0], goal="≥ 5", invert=True)
    assert fast.value == pytest.approx(5.0) and fast.verdict == "PASS"
    assert report.add("sweep", "scaling", 1.7).verdict == "info"
    assert report.add("fixed", "cold", None, unit="s", goal="≤ 3").verdict == "n/a"
    printed = capsys.readouterr().out
    assert "MISS" in printed and "5.000×" in printed and "median ratio" in printed
    table = report.summary().splitlines()
    assert len(table) == 2 + 4
    assert table[3].split()[-1] == "PASS" and table[-1].split()[-1] == "n/a"


def test_only_accepts_each_benchmark_and_refuses_others():
    assert run.parse_only(None) == [n for n in run.BENCHMARKS if n != "scale"]  # the rehearsal runs when named
    assert run.parse_only("scale,bounds") == ["bounds", "scale"]  # after the rows whose floors it judges
    assert run.parse_only("fixed, naive") == ["naive", "fixed"]
    for name in run.BENCHMARKS:
        assert run.parse_only(name) == [name]
    with pytest.raises(SystemExit, match="unknown benchmark 'gpu'"):
        run.parse_only("step,gpu")


def _timings_csv(sweep_dir: Path, rows: list[tuple], tune_started: float | None = None) -> None:
    """Rows ``(trial_id, started, cost)`` or ``(…, worker_started_at, prewarmed)``; the columns the driver writes."""
    sweep_dir.mkdir(parents=True)
    with open(sweep_dir / "trial_timings.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial_id", "run_name", "tune_started_at", "scheduled_at", "started_at", "first_step_at",
                         "fixed_cost_s", "worker_pid", "worker_started_at", "worker_prewarmed"])  # fmt: skip
        for trial_id, started, cost, *worker in rows:
            worker_started, prewarmed = worker or ("", "")
            writer.writerow([trial_id, trial_id, "" if tune_started is None else tune_started, started, started,
                             started + cost, cost, 1, worker_started, prewarmed])  # fmt: skip


def test_fixed_costs_split_cold_first_trials_of_each_worker_from_warm(tmp_path, capsys):
    two = tmp_path / "c2"
    _timings_csv(two, [("c", 12.0, 0.3), ("a", 10.0, 4.0), ("d", 13.0, 0.5), ("b", 10.5, 2.5)])
    one = tmp_path / "c1"
    # The driver recorded Tune's start itself (7.0); its worker started warm before that, the second one did not.
    _timings_csv(one, [("x", 8.0, 1.5, 2.0, "true"), ("y", 9.0, 0.2, 7.5, "true")], tune_started=7.0)
    missing = tmp_path / "none"
    runs = [harness.SweepRun("g", 2, 1.0, 0, 0, two, tmp_path), harness.SweepRun("g", 1, 1.0, 0, 0, one, tmp_path),
            harness.SweepRun("g", 1, 1.0, 0, 0, missing, tmp_path)]  # fmt: skip
    # Tune's experiment state of the 2-worker sweep: it started 5 s before trial "a" (started 10.0, first step 14.0).
    (two / "tune" / "study").mkdir(parents=True)
    (two / "tune" / "study" / "experiment_state-x.json").write_text(json.dumps({"stats": {"start_time": 5.0}}))
    cold, cold_from_start, warm = bench_fixed.fixed_costs(runs)
    assert sorted(cold) == [1.5, 2.5, 4.0] and sorted(warm) == [0.2, 0.3, 0.5]
    assert sorted(cold_from_start) == [2.5, 8.0, 9.0]  # c1: first step 9.5 - 7.0 (the driver's record)
    assert bench_fixed.fixed_costs(runs[2:]) is None

    bench = harness.Bench.__new__(harness.Bench)
    bench.report, bench.sweeps = common.Report(), {("g", 1): runs[2]}
    bench_fixed.measure(bench)
    assert [r.verdict for r in bench.report.rows] == ["n/a"] * 3
    assert "driver did not write trial_timings.csv" in capsys.readouterr().out
    bench.report, bench.sweeps = common.Report(), {("g", 2): runs[0], ("g", 1): runs[1]}
    bench_fixed.measure(bench)
    assert [(r.value, r.verdict) for r in bench.report.rows] == [
        (2.5, "PASS"), (8.0, "MISS"), (0.3, "PASS"), (1, "info"),  # 1 of 6 trials on a worker started warm
        (None, "n/a"),  # these files predate the bookkeeping columns
    ]  # fmt: skip
    # Bookkeeping: MLflow run start + scored → complete, per completed trial (an attempt without end cost is skipped).
    with open(one / "trial_timings.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row, start, end in zip(rows, ("0.05", "0.02"), ("0.10", "0.40"), strict=True):
        row.update(tracking_start_s=start, end_cost_s=end)
    rows.append({**rows[0], "trial_id": "z", "end_cost_s": ""})
    with open(one / "trial_timings.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    total, end = bench_fixed.bookkeeping([runs[1]])
    assert total == pytest.approx([0.15, 0.42]) and end == pytest.approx([0.10, 0.40])
    bench.report = common.Report()
    bench_fixed.measure(bench)
    assert (bench.report.rows[-1].value, bench.report.rows[-1].verdict) == (pytest.approx(0.285), "MISS")


def test_peak_memory_of_a_process_tree_counts_its_children(tmp_path):
    import subprocess

    child = "import time; x = bytearray(64 << 20); time.sleep(1.0)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    proc = subprocess.Popen([sys.executable, "-c", parent])
    rss, pss = common.peak_memory_of_tree(proc, interval=0.05)
    assert proc.returncode == 0
    assert rss >= 64 << 20 and 0 < pss <= rss


def test_the_floor_counts_every_step_and_evaluation_batch_of_the_grids_trials(tmp_path, monkeypatch):
    """2 epochs of linear × 2/4 patients: every epoch's steps, every epoch's validation batches (every k-th slice
    within the validation budget, then all of them once for the chosen epoch) and one test pass."""
    from lasegseg.config import Config
    from lasegseg.train.evaluation import validation_stride
    from lasegseg.train.trial_data import prepare_data

    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path / "cache"))  # Bench points it at its own folder
    monkeypatch.setattr(bench_floor, "REPEATS", 1)
    monkeypatch.setattr(bench_floor, "WARMUP", 0)
    bench = harness.Bench(tmp_path, True, common.Report(), epochs=2)
    grid = bench.grids["frozen"]
    grid.decoders, grid.lrs = ["linear"], [1e-3]
    floor = bench_floor.grid_floor(bench, tmp_path / "sweep-cache")
    steps = evals = 0
    for patients in grid.patients:
        cfg = Config().replace(**{"data.path": str(bench.phantom), "data.patients": patients, "data.image_size": 56,
                                  "data.cache_dir": str(tmp_path / "sweep-cache")})  # fmt: skip
        data = prepare_data(cfg)
        steps += 2 * -(-len(data.train_rows) // 16)
        sizes = {c: len(data.cache.rows_for([c])) for c in (*data.split.val, *data.split.test)}
        k = validation_stride(cfg.train.val_budget, sum(sizes[c] for c in data.split.val), len(data.train_rows))
        assert k > 1  # 2 validation patients against 2 or 4 training ones: over the budget
        evals += 2 * sum(-(-len(range((k - 1) // 2, sizes[c], k)) // 16) for c in data.split.val)
        evals += sum(-(-sizes[c] // 16) for c in (*data.split.val, *data.split.test))
    assert (floor.steps, floor.evals, floor.slices) == (steps, evals, len(data.cache))
    assert floor.total == pytest.approx(floor.backbone_s + floor.steps_s + floor.evals_s)
    assert floor.backbone_s > 0 and floor.steps_s > 0 and floor.evals_s > 0
    assert {k[:2] for k in floor.per_batch} == {("linear", "train"), ("linear", "eval")}
    assert "backbone pass" in floor.describe()


def test_the_bounds_probe_times_a_new_clusters_first_torch_step_and_its_workers_memory():
    from bench import bench_bounds

    launched = time.time()
    out = bench_bounds.probe()
    assert 0 < out["first_step_s"] < time.time() - launched  # launch → step, within the probe's own lifetime
    assert 100 * 2**20 < out["uss"] < out["uss_mlflow"]  # torch is in the worker; MLflow's client adds to it


# ---------------------------------------------------------------------------------------------------------------
# scale: the rehearsal's study and arithmetic


def test_the_rehearsal_study_is_paper_yaml_with_only_per_trial_sizes_changed_and_its_grid_cut_to_a_prefix(tmp_path):
    from bench import scale_study
    from lasegseg.sweep.spec import load_spec

    paper = scale_study.paper_spec()
    full, changes = scale_study.derive(paper, scale_study.SIZES["full"])
    assert paper == scale_study.paper_spec()  # untouched
    screen = {**paper["screen"], "grace_period": 1, "set": {**paper["screen"]["set"], "train.epochs": 2}}
    sized = {**paper, "base": {**paper["base"], **scale_study.SHRUNK}, "screen": screen}
    assert full == sized and len(changes) == 5 and changes[0] == "base.data.image_size: 448 -> 112"
    counts = {}
    for size in scale_study.SIZES:
        path, n, _ = scale_study.write_study(tmp_path, size)
        spec = load_spec(path)  # the driver's own reading of the derived file
        counts[size] = n
        assert n == len(spec.trials()) + len(spec.screening_cells()) * spec.screen.trials
        assert spec.resources == load_spec(scale_study.PAPER).resources and spec.seeds[0] == 0
    assert counts == {"16": 16, "128": 128, "full": 1406}
    cut, changes = scale_study.derive(paper, scale_study.SIZES["128"])
    assert cut["grid"]["model.mode"] == paper["grid"]["model.mode"] and cut["grid"]["model.backbone"] == [
        "dinov2-giant"
    ]
    assert cut["fewshot"] == paper["fewshot"][:8] and cut["baselines"] == paper["baselines"]
    assert "fewshot: 10 entries -> the first 8" in " ".join(changes)


def _attempt(tid, sched, first, end, **kw):
    row = {"trial_id": tid, "tune_started_at": "100.0", "scheduled_at": str(sched), "started_at": str(sched + 0.1),
           "first_step_at": str(first), "ended_at": str(end), "tracking_start_s": "0.1", "end_cost_s": "0.4",
           "fit_s": "2.0"}  # fmt: skip
    return {**row, **{k: str(v) for k, v in kw.items()}}


def test_slots_are_rebuilt_from_the_attempts_and_each_overhead_is_measured_on_its_own_slot():
    from bench import scale_metrics as sm

    assert sm.assign_slots([(0, 5), (1, 3), (3.5, 6), (5, 9)]) == [(0, None), (1, None), (1, 3), (0, 5)]
    rows = [_attempt("a", 101, 102, 105), _attempt("b", 103, 104, 106), _attempt("c", 105.5, 106.5, 108),
            {"trial_id": "d", "scheduled_at": "107"}]  # fmt: skip  # d never ended: left out
    over = sm.overheads(rows)
    assert over["scheduling"] == pytest.approx([1.0, 3.0, 0.5])  # a, b from Tune's start (100), c after a's end
    assert over["gap"] == pytest.approx([2.0, 4.0, 1.5])
    assert over["setup"] == pytest.approx([0.9, 0.9, 0.9]) and over["bookkeeping"] == pytest.approx([0.5] * 3)
    assert sm.med_p95([1.0, 2.0, 3.0]) == (2.0, pytest.approx(2.9)) and sm.percentile([], 95) is None


def test_idle_share_counts_free_slots_only_while_trials_are_pending():
    from bench import scale_metrics as sm

    # 2 slots, 3 trials, Tune starts at 100: [100, 101) both idle with 3 pending (2 slot-s), then a and b run;
    # a ends at 104 and c starts at 105 (1 slot-s idle with c pending), b ends at 106 with nothing pending (no
    # idle after), c ends at 108. Wall 8 s × 2 slots.
    rows = [_attempt("a", 101, 101.5, 104), _attempt("b", 101, 101.5, 106), _attempt("c", 105, 105.5, 108)]
    assert sm.idle_share(rows, total=3, slots=2) == pytest.approx(3 / 16)
    # A retried trial (two attempts) finishes once, at its last attempt's end.
    retried = [_attempt("a", 101, 101.5, 102), _attempt("a", 102, 102.5, 104)]
    assert sm.idle_share(retried, total=1, slots=1) == pytest.approx(1 / 4)
    assert sm.idle_share([], total=3, slots=2) is None


def test_state_saves_requests_runs_and_the_bucket_are_summed_as_the_table_prints_them():
    from bench import scale_metrics as sm

    saves = sm.state_saves("1.0,0.25,0\n2.0,1.5,1\n\n")
    assert saves == {"state_saves": 2, "state_save_max_s": 1.5, "state_save_total_s": 1.75, "state_saves_forced": 1}
    log = (
        'INFO: 127.0.0.1:1 - "POST /api/2.0/mlflow/runs/log-batch HTTP/1.1" 200 OK\n'
        'INFO: 127.0.0.1:1 - "GET /api/2.0/mlflow/runs/get?run_id=x HTTP/1.1" 200 OK\n'
        'INFO: 127.0.0.1:2 - "GET /api/2.0/mlflow/runs/get?run_id=y HTTP/1.1" 200 OK\nstartup line\n'
    )
    assert sm.count_requests(log) == {"total": 3, "top": [("GET /api/2.0/mlflow/runs/get", 2),
                                                          ("POST /api/2.0/mlflow/runs/log-batch", 1)]}  # fmt: skip
    run = {"status": "FINISHED", "role": "trial", "end": 5}
    before = [
        {**run, "run_id": "1", "config": "c1"}, {**run, "run_id": "2", "config": "c2"},
        {**run, "run_id": "3", "config": "c3", "status": "RUNNING"},
        {**run, "run_id": "p", "role": "sweep", "config": ""},
    ]  # fmt: skip
    after = [{**before[0]}, {**before[1], "end": 9}, {**before[2], "status": "FINISHED"}, before[3],
             {**run, "run_id": "4", "config": "c3"}]  # fmt: skip
    assert [r["run_id"] for r in sm.rerun(before, after)] == ["2"]  # 1 untouched; 3 was not FINISHED before
    checks = sm.run_checks(after)
    assert checks["runs_doubled"] == 1 and checks["runs_doubled_keys"] == ["trial:c3"]
    assert checks["runs_by_status"] == {"FINISHED": 4} and checks["runs_by_role"] == {"trial": 4, "sweep": 1}
    p = "s/la"
    objects = [(f"{p}/tune/study/experiment_state-2026.json", 900), (f"{p}/tune/study/trial_a/checkpoint_000002/"
               "mlflow_run.json", 40), (f"{p}/tune/study/trial_b/checkpoint_000001/state.json", 300),
               (f"{p}/tune/study/trial_b/checkpoint_000001/model.pt", 5000), (f"{p}/summary.csv", 10),
               ("mlartifacts/1/r/artifacts/model.safetensors", 7000)]  # fmt: skip
    out = sm.bucket_summary(objects, p)
    assert (out["state_json_bytes"], out["training_state_files"], out["training_state_trials"]) == (900, 2, 1)
    assert out["markers"] == 1 and out["summary_in_bucket"] == ["summary.csv"] and out["bucket_bytes"] == 13250
    assert out["bucket_by_part"] == {"s": 6250, "mlartifacts": 7000}


def test_loopback_includes_ipv4_loopback_mapped_into_ipv6_and_the_resume_clock_starts_at_the_launch():
    from bench import scale_metrics as sm

    assert all(sm.loopback(ip) for ip in ("127.0.0.1", "127.0.0.53", "::1", "::ffff:7f00:1", "::ffff:127.0.0.1"))
    assert not any(sm.loopback(ip) for ip in ("0.0.0.0", "::", "192.0.2.2", "::ffff:c000:202"))
    rows = [_attempt("a", 101, 102, 105), _attempt("b", 130, 131, 140)]
    assert sm.first_new(rows, since=120) == 10 and sm.first_new(rows, since=200) is None
    assert sm.driver_tail(rows, launched=90, wall=60) == 10
