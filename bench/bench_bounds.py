"""8. bounds — what no Ray-based sweep on this machine can go below, measured beside the sweep's own rows 2 and 6.

- **Start-up floor** (row 2's goal is ≤ 5 s from the driver's start to the first optimizer step): a fresh Python
  process imports Ray, starts a private local cluster as the sweep does (loopback, no dashboard, one CPU) and runs
  one task that imports torch and does one AdamW step on a small conv net (which imports ``torch._dynamo``, as every
  torch optimizer does). Measured from the process's launch to that step, wall clock. Nothing of lasegseg, Tune,
  MLflow or the data is in it: a sweep's start-up can only be longer.
- **Worker memory floor** (row 6's goal is ≤ 300 MiB per added concurrent trial): the USS of that task's worker
  process after its step, alone and after ``import mlflow.tracking`` as well. A concurrent trial is one more such
  process (Tune runs each trial in its own actor), so it adds at least this.

Each is the minimum over ``REPEATS`` fresh processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.common import ROOT, child_env
from bench.harness import Bench

REPEATS = 2
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the node on 127.0.0.1, as the sweep's (sweep/cluster.py)
START_UP_GOAL_S = 5.0
MEMORY_GOAL_MIB = 300.0

PROBE = r"""
import json, sys, time
launched = float(sys.argv[1])
import ray

@ray.remote(num_cpus=1)
def first_step(extra):
    import importlib, psutil, torch
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 8, 32, 32)).mean().backward()
    opt.step()
    stepped = time.time()
    uss = psutil.Process().memory_full_info().uss
    for name in extra:
        importlib.import_module(name)
    return stepped, uss, psutil.Process().memory_full_info().uss

ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
         configure_logging=False, log_to_driver=False)
try:
    stepped, uss, with_mlflow = ray.get(first_step.remote(["mlflow.tracking"]))
finally:
    ray.shutdown()
print(json.dumps({"first_step_s": stepped - launched, "uss": uss, "uss_mlflow": with_mlflow}))
"""


def probe() -> dict[str, float]:
    """One fresh process: its launch → the first optimizer step of a torch task on a new local Ray cluster."""
    launched = time.time()
    out = subprocess.run([sys.executable, "-c", PROBE, repr(launched)], env=child_env(**LOOPBACK_ENV), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"bounds probe failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(b: Bench) -> None:
    """The start-up and worker-memory floors (minimum over ``REPEATS`` fresh processes)."""
    runs = [probe() for _ in range(REPEATS)]
    steps = [r["first_step_s"] for r in runs]
    floor = min(steps)
    b.report.add("bounds", "start-up floor: new local Ray → a torch task's 1st step", floor, unit="s",
                 detail=f"no Tune, MLflow, data or lasegseg; row 2's goal ≤ {START_UP_GOAL_S:g} s; "
                        f"runs {', '.join(f'{s:.1f}' for s in steps)} s")  # fmt: skip
    uss, uss_mlflow = min(r["uss"] for r in runs) / 2**20, min(r["uss_mlflow"] for r in runs) / 2**20
    b.report.add("bounds", "USS of a Ray worker after one torch step", uss, unit=" MiB",
                 detail=f"{uss_mlflow:.0f} MiB with mlflow.tracking imported too; row 6's goal ≤ "
                        f"{MEMORY_GOAL_MIB:g} MiB per added concurrent trial")  # fmt: skip
