"""One rehearsal of the study at one size: the stack up, the sweep driver joined to it (killed at about half and
resumed when asked), everything measured while the stack is still up, then the stack down and checked gone.

The driver is ``sweeps/fewshot.py`` in a session of its own, timed with ``os.wait4`` (its CPU seconds and peak RSS
as the kernel accounts them; ``ru_maxrss`` is KiB on Linux) and with ``$LASEGSEG_TUNE_STATE_LOG`` set, so that it
logs every save of Tune's experiment state.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import scale_probe
from bench.common import ROOT
from bench.scale_stack import BUCKET, CPUS_PER_TRIAL, Stack, port_free
from bench.scale_study import write_study

EXPERIMENT = "la-dinov2-fewshot"  # paper.yaml's name: the sweep's experiment and storage folder
RESUME_AT = 0.5  # share of the trials ended when the driver is killed


@dataclass
class DriverRun:
    """One driver process, as ``os.wait4`` saw it.

    Args:
        launched: wall clock at its launch; wall_s: its lifetime; cpu_s: user + system CPU seconds (its own and its
            reaped children's); maxrss: its peak resident set in bytes; returncode; killed: SIGKILLed by the bench.
    """

    launched: float
    wall_s: float
    cpu_s: float
    maxrss: int
    returncode: int
    killed: bool = False


@dataclass
class Rehearsal:
    """What one rehearsal measured (see :mod:`bench.bench_scale` for the table)."""

    size: str
    trials: int
    changes: list[str]
    runs: list[DriverRun] = field(default_factory=list)
    timings: list[dict[str, str]] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


def run_driver(
    cmd: list[str], env: dict[str, str], log: Path, stop_when: Callable[[], bool] | None = None, poll: float = 0.5,
    watch: Callable[[], None] | None = None, every: float = 5.0,
) -> DriverRun:  # fmt: skip
    """Run ``cmd`` in a session of its own until it exits; SIGKILL its process group once ``stop_when()`` holds;
    call ``watch()`` every ``every`` seconds meanwhile (e.g. to list the listeners of the stack's processes).

    A Ctrl-C (or any error) here kills the driver's group too, so nothing it started outlives the bench.
    """
    with open(log, "ab") as fh:
        launched, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        killed, watched = False, 0.0
        try:
            while True:
                if watch is not None and time.monotonic() - watched >= every:
                    watch()
                    watched = time.monotonic()
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if stop_when is not None and not killed and stop_when():
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
                time.sleep(poll)
        except BaseException:
            _kill_group(proc.pid)
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return DriverRun(launched, time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024,
                     proc.returncode, killed)  # fmt: skip


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a trial_timings.csv ([] while it does not exist yet)."""
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return []


def ended(rows: list[dict[str, str]]) -> int:
    """How many distinct trials have an attempt that ended."""
    return len({r["trial_id"] for r in rows if r.get("ended_at")})


def rehearse(
    work: Path, size: str, phantom: Path, *, resume: bool = False, postgres: str | None = None,
    checks: Callable[[Stack, Rehearsal], None] | None = None, light: bool = False,
    watch: Callable[[Stack], None] | None = None, driver_env: dict[str, str] | None = None,
) -> Rehearsal:  # fmt: skip
    """Rehearse the study of ``size`` under ``work``: stack up, sweep (killed at ~50 % and resumed with
    ``resume``), every measurement of :mod:`bench.scale_probe` taken while the stack is up, ``checks(stack, r)``
    too, then the stack down; the result holds whether anything was left running.

    Args:
        light: measure only what the test asserts (runs, bucket, report), not the other commands and the UI.
        watch: called with the stack every few seconds while a driver runs.
        driver_env: extra variables of the driver (a diagnosis, e.g. one of Tune's own settings).
    """
    t0 = time.perf_counter()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    config, trials, changes = write_study(work, size)
    r = Rehearsal(size, trials, changes)
    prefix = f"scale-{size}{'-resume' if resume else ''}"
    state_log = work / "tune_state.csv"
    stack = Stack(work / "stack", postgres=postgres)
    with stack:
        env = stack.driver_env(LASEGSEG_TUNE_STATE_LOG=str(state_log), **(driver_env or {}))
        cmd = [sys.executable, str(ROOT / "sweeps" / "fewshot.py"), "--config", str(config), "--stand-in-backbones",
               "--storage-path", f"s3://{BUCKET}/{prefix}", "--tracking-uri", stack.tracking_uri, "--data",
               str(phantom), "--gpus-per-trial", "1", "--frozen-gpus-per-trial", "1", "--cpus-per-trial",
               str(CPUS_PER_TRIAL)]  # fmt: skip
        sweep_dir = stack.head_cache / "sweeps" / EXPERIMENT
        timings = sweep_dir / "trial_timings.csv"
        log = work / "driver.log"
        look = (lambda: watch(stack)) if watch is not None else None
        if resume:
            half = max(1, int(trials * RESUME_AT))
            first = run_driver(cmd, env, log, stop_when=lambda: ended(read_rows(timings)) >= half, watch=look)
            r.runs.append(first)
            before = scale_probe.runs(stack, EXPERIMENT)
            r.values["resume_rows_before"] = len(read_rows(timings))
            r.runs.append(run_driver([*cmd, "--resume"], env, log, watch=look))
            r.values.update(scale_probe.resume_checks(before, scale_probe.runs(stack, EXPERIMENT), first))
        else:
            r.runs.append(run_driver(cmd, env, log, watch=look))
        r.timings = read_rows(timings)
        r.values["log"] = str(log)
        r.values["returncode"] = r.runs[-1].returncode
        scale_probe.measure_all(stack, r, prefix, state_log, work, light=light)
        if checks is not None:
            checks(stack, r)
        r.values["pids"] = stack.pids()
        ports = stack.ports()
    deadline = time.monotonic() + 20  # a node's agents may outlive its raylet by a few seconds
    while (stack.pids() or not all(port_free(p) for p in ports)) and time.monotonic() < deadline:
        time.sleep(0.5)
    r.values["left_running"] = stack.pids()
    r.values["ports_open"] = [p for p in ports if not port_free(p)]
    r.values["rehearsal_s"] = time.perf_counter() - t0
    return r
