"""Pieces every benchmark shares: result rows and their formatting, child-process environment and memory, timings.

Nothing here imports lasegseg, torch, ray or mlflow at module level, so ``bench/run.py --help`` stays instant.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Rows: every measurement is one row (printed at once, summarised and written as JSON at the end)


@dataclass
class Row:
    """One measured ratio (or value) with its goal.

    Args:
        bench: benchmark name.
        name: what was measured.
        value: the ratio (or seconds for fixed cost); None when it could not be measured.
        unit: ``×`` or ``s``.
        goal: e.g. ``≤ 1.05``; empty for information only.
        verdict: PASS, MISS, info or n/a.
        detail: the raw numbers behind the ratio.
    """

    bench: str
    name: str
    value: float | None
    unit: str = "×"
    goal: str = ""
    verdict: str = "info"
    detail: str = ""


@dataclass
class Report:
    """The rows of one invocation, in the order they were measured."""

    rows: list[Row] = field(default_factory=list)

    def add(self, bench: str, name: str, value: float | None, *, unit: str = "×", goal: str = "",
            detail: str = "", note: str = "") -> Row:  # fmt: skip
        """Record and print one row; ``goal`` is ``≤ x`` or ``≥ x`` and decides PASS/MISS."""
        if value is None:
            verdict = "n/a"
        elif not goal:
            verdict = "info"
        else:
            op, threshold = goal.split()
            ok = value <= float(threshold) if op == "≤" else value >= float(threshold)
            verdict = "PASS" if ok else "MISS"
        row = Row(bench, name, value, unit, goal, verdict, detail + (f"  {note}" if note else ""))
        self.rows.append(row)
        shown = format_value(value, unit)
        goal_text = f"(goal {goal}{unit})" if goal else ""
        print(f"  {name:<46} {shown:>9} {goal_text:<14} {verdict:<5} {row.detail}", flush=True)
        return row

    def ratio(self, bench: str, name: str, ours: list[float], ref: list[float], *, goal: str = "",
              invert: bool = False) -> Row:  # fmt: skip
        """A ratio of two timed lists: ours/ref (or ref/ours with ``invert``, a speed-up), judged on the minima.

        The minimum is the least noise-affected estimate on a shared machine; the median ratio is shown beside it.
        """
        a, b = (ref, ours) if invert else (ours, ref)
        r_min = min(a) / min(b)
        r_med = statistics.median(a) / statistics.median(b)
        detail = (f"lasegseg {format_secs(min(ours))} (med {format_secs(statistics.median(ours))})  reference "
                  f"{format_secs(min(ref))} (med {format_secs(statistics.median(ref))})  median ratio {r_med:.3f}×  "
                  f"n={len(ours)}")  # fmt: skip
        return self.add(bench, name, r_min, goal=goal, detail=detail)

    def summary(self) -> str:
        """Every row as one line of a table, for the end of the run."""
        lines = [f"{'benchmark':<8} {'measure':<46} {'value':>9} {'goal':>8}  verdict", "-" * 86]
        for r in self.rows:
            shown = format_value(r.value, r.unit)
            goal = f"{r.goal}{r.unit}" if r.goal else ""
            lines.append(f"{r.bench:<8} {r.name:<46} {shown:>9} {goal:>8}  {r.verdict}")
        return "\n".join(lines)


def format_secs(seconds: float) -> str:
    """Milliseconds below a second, seconds above."""
    return f"{seconds * 1000:.2f}ms" if seconds < 1 else f"{seconds:.2f}s"


def format_value(value: float | None, unit: str) -> str:
    """A row's value as printed: three decimals with its unit, ``n/a`` when it could not be measured."""
    if value is None:
        return "n/a"
    return f"{value:g}" if not unit else f"{value:.3f}{unit}"


def machine() -> str:
    """One line naming the CPU, cores, Python and torch, for the header and the JSON."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))  # fmt: skip
        cpu = model
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"OMP_NUM_THREADS=1, load average {os.getloadavg()[0]:.1f}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Child processes: environment, peak memory of a process tree, the sweep driver's timings


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with one intra-op thread and no network, plus ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def peak_memory_of_tree(proc: subprocess.Popen, interval: float = 0.25) -> tuple[int, int]:
    """Poll a process tree until its root exits; returns (peak summed RSS, peak summed PSS) in bytes.

    RSS counts a memory-mapped page once per process that touches it; PSS splits shared pages between them, so its
    sum is the tree's real footprint. Read from /proc (Linux), no extra dependency.
    """
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss = pss = 0
        for pid in _tree(proc.pid):
            r, p = _rss_pss(pid)
            rss, pss = rss + r, pss + p
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(interval)
    return peak_rss, peak_pss


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss_pss(pid: int) -> tuple[int, int]:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in text.splitlines()[1:] if "kB" in line}
    return values.get("Rss", 0), values.get("Pss", 0)


def read_timings(sweep_dir: Path) -> list[dict[str, str]] | None:
    """The rows of a sweep's trial_timings.csv (the driver writes one per trial), None when it wrote none."""
    path = sweep_dir / "trial_timings.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
