"""3. sweep — the frozen grid through the Ray Tune sweep vs the same trials called in a plain loop (goal ≤ 1.15× at
concurrency 1), and the speed-up at concurrency 2 on 2 cores.
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.common import ROOT, child_env
from bench.harness import Bench


def measure(b: Bench) -> None:
    """The frozen grid through the sweep (concurrency 1 and 2) vs run_trial in a plain loop in one process."""
    from lasegseg.sweep.spec import load_spec

    g = b.grids["frozen"]
    config = b.tmp / "loop.yaml"
    config.write_text(g.yaml())
    trials = load_spec(config, overrides={"data.path": str(b.phantom)}).trials()
    # The same trials in one fresh process: imports, cache build and backbone loads included, as in the sweep.
    loop = (
        "import sys, time; t=time.perf_counter(); import torch; torch.set_num_threads(1);"
        "from lasegseg.config import from_flat; from lasegseg.data.cache import open_cache; "
        "from lasegseg.train.trial import run_trial; from lasegseg.train.trial_data import prepare_data;"
        f"trials={trials!r};"
        "cache=open_cache(from_flat(trials[0]));"
        "[run_trial(from_flat(f), data=prepare_data(from_flat(f), cache=cache)) for f in trials]"
    )
    t0 = time.perf_counter()
    env = child_env(LASEGSEG_CACHE=str(b.fresh_cache("loop")))
    subprocess.run([sys.executable, "-c", loop], env=env, check=True, capture_output=True, cwd=ROOT)
    loop_s = time.perf_counter() - t0
    c1, c2 = b.sweep("frozen", 1), b.sweep("frozen", 2)
    b.report.ratio("sweep", f"sweep/loop, {g.size} frozen trials, conc 1", [c1.seconds], [loop_s], goal="≤ 1.15")
    b.report.add("sweep", "speed-up at concurrency 2 on 2 cores", c1.seconds / c2.seconds,
                 detail=f"conc 1 {c1.seconds:.1f}s, conc 2 {c2.seconds:.1f}s (ideal 2×)")  # fmt: skip
