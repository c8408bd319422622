"""bench/gpu.py's output: the markdown tables of its rows, the environment line (card, versions, date) and the dated
section it appends to bench/RESULTS.md."""

from __future__ import annotations

import datetime as dt
import math
import platform
from pathlib import Path


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def rows_table(rows: list[dict], peak: float | None) -> str:
    head = (
        "| model | mode | batch | img/s | step ms | ViT GFLOP/img analytic | ViT GFLOP/img counted | counted/analytic "
        "| step GFLOP/img | TFLOP/s | MFU | peak GiB | status |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ("—" if peak else "unknown peak")
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch']} | {_fmt(r.get('img_s'), '.1f')} | "
            f"{_fmt(r.get('step_ms'), '.1f')} | {_fmt(r.get('vit_gflop_analytic'), '.4g')} | "
            f"{_fmt(r.get('vit_gflop_counted'), '.4g')} | {_fmt(r.get('flop_ratio'), '.3f')} | "
            f"{_fmt(r.get('step_gflop'), '.4g')} | {_fmt(r.get('tflops'), '.3g')} | {mfu} | "
            f"{_fmt(r.get('peak_gib'), '.2f')} | {r['status']} |"
        )
    return "\n".join(lines)


def cached_table(rows: list[dict]) -> str:
    head = (
        "| model | feed | batch | img/s | step ms | fp16 MB copied/step | vs backbone every step (frozen row) "
        "| peak GiB | status |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ratio = f"{r['vs_frozen']:.2f}×" if r.get("vs_frozen") else "—"
        lines.append(
            f"| {r['model']} | {r['feed']} | {r['batch']} | {_fmt(r.get('img_s'), '.1f')} | "
            f"{_fmt(r.get('step_ms'), '.2f')} | {_fmt(r.get('copy_mb'), '.3g')} | {ratio} | "
            f"{_fmt(r.get('peak_gib'), '.2f')} | {r['status']} |"
        )
    return "\n".join(lines)


def packing_table(rows: list[dict]) -> str:
    alone = next((r["img_s"] for r in rows if r["k"] == 1 and r["img_s"]), None)
    lines = ["| trials on one device | batch | total img/s | vs one at a time | status |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['img_s'] / alone:.2f}×" if alone and r["img_s"] else "—"
        lines.append(f"| {r['k']} | {r['batch']} | {_fmt(r['img_s'], '.1f')} | {ratio} | {r['status']} |")
    return "\n".join(lines)


def environment(device) -> dict:
    """The card's name (or the CPU's), the torch, CUDA and transformers versions and the date, for the results."""
    # deferred: heavy (torch, transformers): the tables are written without them
    import torch
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    return {
        "device": name, "torch": torch.__version__, "cuda": torch.version.cuda or "none",
        "transformers": transformers.__version__, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip


def write_results(path: Path, env: dict, command: str, tables: list[str]) -> None:
    """Append one dated section with the card's name and the versions to the results file."""
    if not path.exists():
        path.write_text("# GPU benchmark results\n\nAppended by `python bench/gpu.py --write-results`.\n")
    section = (
        f"\n## {env['device']} · {env['date']}\n\n"
        f"torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']} · `{command}`\n\n"
        + "\n\n".join(tables)
        + "\n"
    )
    with path.open("a") as fh:
        fh.write(section)
