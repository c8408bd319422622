"""The sweep's own files, which ``--resume`` reads back: its state, the learning rates screening chose, the trials'
timings, and the copies of them kept in an object-store root.

Each is written whole through :func:`lasegseg.fsio.atomic_write`, so a driver killed mid-write leaves the previous
version, never a part that a resume would fail to read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lasegseg.errors import LasegsegError
from lasegseg.fsio import atomic_write, write_json_atomic
from lasegseg.sweep.plan import SweepPlan

STATE_FILE = "sweep_state.json"
SCREENING_FILE = "screening.json"
TIMINGS_FILE = "trial_timings.csv"
# A local sweep's record of which feature cache serves each frozen backbone (caches.publish_features).
FEATURE_INDEX = ".feature_index"
# Never copied to an object store: the pseudonym key and salt, the local MLflow database.
PRIVATE_FILES = {".pseudonym_salt", "pseudonyms.csv", "mlflow.db"}


def load_state(plan: SweepPlan, resume: bool) -> dict[str, Any]:
    """The sweep's own state file (parent run, tracking URI, pseudonymisation) from an earlier run, if any."""
    if plan.root.remote:
        pull_files(plan)
    path = plan.sweep_dir / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    if resume and not state:
        raise LasegsegError(f"{plan.root.uri}: nothing to resume (no earlier sweep named '{plan.name}' there)")
    if not resume and state.get("status") == "running":
        print(f"note: an earlier run of '{plan.name}' did not finish; starting a new sweep (--resume continues it)")
    return state


def save_state(plan: SweepPlan, state: dict[str, Any]) -> None:
    """Write the state file, and its copy in an object-store root."""
    write_json_atomic(plan.sweep_dir / STATE_FILE, state)
    if plan.root.remote:
        plan.root.write_bytes(STATE_FILE, (plan.sweep_dir / STATE_FILE).read_bytes())


def pull_files(plan: SweepPlan) -> None:
    """An object-store sweep's own files (state, screening, timings) into the local working folder, for --resume."""
    for name in (STATE_FILE, SCREENING_FILE, TIMINGS_FILE):
        data = plan.root.read_bytes(name)
        if data is not None:
            atomic_write(plan.sweep_dir / name, data)


def push_files(plan: SweepPlan) -> None:
    """The sweep's own files and summary to its object-store root; the pseudonym key and salt never leave."""
    if not plan.root.remote:
        return
    for path in sorted(plan.sweep_dir.iterdir()):
        if path.is_file() and path.name not in PRIVATE_FILES and not path.name.startswith(("mlflow.db", ".")):
            plan.root.write_bytes(path.name, path.read_bytes())


def load_screening(sweep_dir: Path) -> dict[str, float]:
    """The learning rate screening chose for each cell so far, by the cell's JSON key ({} before any)."""
    path = Path(sweep_dir) / SCREENING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_screening(sweep_dir: Path, chosen: dict[str, float]) -> None:
    """Record the learning rates chosen so far (after each screened cell, so a resume skips the cells done)."""
    write_json_atomic(Path(sweep_dir) / SCREENING_FILE, chosen)
