"""bench/gpu.py on the CPU: the smoke run's table, FLOP cross-check, results file and failure handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu, gpu_shapes

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.py"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def test_smoke_run_reports_every_row_and_flops_agree(tmp_path):
    results, numbers = tmp_path / "RESULTS.md", tmp_path / "rows.json"
    proc = _run("--device", "cpu", "--smoke", "--write-results", "--results", str(results), "--json", str(numbers))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ViT-")]
    table, cached = lines[:8], lines[8:]
    assert [tuple(cell.strip() for cell in line.split("|")[1:3]) for line in table] == [
        (name, mode) for name in ("ViT-S/14", "ViT-B/14", "ViT-L/14", "ViT-g/14") for mode in ("frozen", "e2e")
    ]
    assert [tuple(cell.strip() for cell in line.split("|")[1:3]) for line in cached] == [
        (name, feed) for name in ("ViT-S/14", "ViT-B/14", "ViT-L/14", "ViT-g/14")
        for feed in ("host", "resident", "prefetch")
    ]  # fmt: skip
    assert all("| ok" in line for line in cached), "\n".join(cached)
    assert all("| ok" in line for line in table), "\n".join(table)
    assert "unknown peak" in table[0]  # no MFU without a known card or --peak-tflops

    data = json.loads(numbers.read_text())
    for row in data["rows"]:
        assert row["img_s"] > 0 and row["step_ms"] > 0
        # The analytic ViT count (×3 for e2e, patch-embedding input gradient left out) against FlopCounterMode.
        assert row["flop_ratio"] == pytest.approx(1.0, abs=0.1), row
        assert row["step_gflop"] > row["vit_gflop_analytic"]  # the decoder adds its own FLOPs
    by_mode = {(r["model"], r["mode"]): r for r in data["rows"]}
    assert (
        by_mode[("ViT-S/14", "e2e")]["vit_gflop_analytic"] > 2.5 * by_mode[("ViT-S/14", "frozen")]["vit_gflop_analytic"]
    )
    assert "grad ckpt" in by_mode[("ViT-g/14", "e2e")]["status"]
    assert [(p["k"], p["status"]) for p in data["packing"]] == [(1, "ok"), (2, "ok")]
    for row in data["cached"]:  # the same decoder steps on stored features, compared with the frozen row
        frozen = by_mode[(row["model"], "frozen")]
        assert row["img_s"] > 0 and row["vs_frozen"] == pytest.approx(row["img_s"] / frozen["img_s"])
        assert row["slices"] == 4 * row["batch"] and (row["copy_mb"] == 0) == (row["feed"] == "resident")

    text = results.read_text()
    assert text.startswith("# GPU benchmark results") and "## CPU" in text and text.count("| ViT-") == 8 + 12
    assert "| 2 | 2 |" in text  # the packed sweep's second row: 2 trials at batch 2


def test_analytic_flops_of_the_official_sizes():
    # Forward GFLOP per 448-px image (1024 patches + cls); DINOv2-g's SwiGLU MLP is 4096 wide.
    expected = {"S": 63.36, "B": 213.8, "L": 723.6, "g": 2581.6}
    for key, gflop in expected.items():
        assert gpu_shapes.vit_flops(gpu_shapes.SHAPES[key], 448) / 1e9 == pytest.approx(gflop, rel=1e-3)
    assert gpu_shapes.SHAPES["g"].ffn_hidden == 4096


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA A10G", 125.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("NVIDIA T4", None),
    ],
)
def test_peak_table_by_device_name(name, peak):
    assert gpu_shapes.peak_tflops(name, None) == peak
    assert gpu_shapes.peak_tflops(name, 123.0) == 123.0


def test_out_of_memory_row_is_retried_at_half_batch_then_reported(monkeypatch):
    import torch

    from bench import gpu_rows

    tried = []

    def oom(seg, forward, batch, image_size, device):
        tried.append(batch)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gpu_rows, "build_segmenter", lambda shape, **kw: object())
    monkeypatch.setattr(gpu_rows, "count_flops", lambda seg, device, image_size, checkpointing: (1.0, 2.0))
    monkeypatch.setattr(gpu_rows, "make_step", oom)
    args = gpu.build_parser().parse_args(["--device", "cpu", "--smoke"])
    gpu._settings(args)
    row = gpu_rows.measure_row(gpu_shapes.SMOKE_SHAPES["S"], "frozen", args, torch.device("cpu"), None)
    assert tried == [2, 1]
    assert row["status"] == "OOM at batch 1" and row["batch"] == 1


def test_full_sizes_on_the_cpu_are_refused_in_one_line():
    proc = _run("--device", "cpu")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["bench/gpu.py: error: full sizes need a GPU; on the CPU run --smoke"]
