"""The sweep's own files that --resume reads: written whole, read back, copied to and from an object-store root."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lasegseg.errors import LasegsegError
from lasegseg.sweep import state
from lasegseg.sweep.plan import SweepPlan


class _Bucket:
    """An object-store root that keeps its objects in a dict."""

    remote = True
    uri = "s3://bucket/runs/demo"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def read_bytes(self, name: str) -> bytes | None:
        return self.objects.get(name)

    def write_bytes(self, name: str, data: bytes) -> None:
        self.objects[name] = data


def _plan(sweep_dir: Path, root=None) -> SweepPlan:
    root = root or SimpleNamespace(remote=False, uri=str(sweep_dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return SweepPlan(spec=None, name="demo", root=root, sweep_dir=sweep_dir, trials=[], overrides={})


def test_the_state_round_trips_and_a_resume_needs_one(tmp_path, capsys):
    plan = _plan(tmp_path / "demo")
    with pytest.raises(LasegsegError, match="nothing to resume \\(no earlier sweep named 'demo' there\\)"):
        state.load_state(plan, resume=True)
    assert state.load_state(plan, resume=False) == {}
    state.save_state(plan, {"status": "running", "parent_run_id": "p1"})
    assert state.load_state(plan, resume=True) == {"status": "running", "parent_run_id": "p1"}
    assert capsys.readouterr().out == ""
    state.load_state(plan, resume=False)
    assert "an earlier run of 'demo' did not finish" in capsys.readouterr().out


def test_the_screening_file_is_written_whole(tmp_path, monkeypatch):
    assert state.load_screening(tmp_path) == {}
    state.save_screening(tmp_path, {'["tiny", false, "linear", "frozen"]': 0.001})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    # Written beside the file, then renamed over it: a write that fails before the rename leaves the old file.
    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        state.save_screening(tmp_path, {"another": 0.1})
    monkeypatch.undo()
    assert state.load_screening(tmp_path) == {'["tiny", false, "linear", "frozen"]': 0.001}
    assert [p.name for p in tmp_path.iterdir()] == [state.SCREENING_FILE]  # no temporary file left


def test_an_object_store_sweep_copies_its_own_files_but_never_the_key(tmp_path):
    bucket = _Bucket()
    plan = _plan(tmp_path / "demo", root=bucket)
    state.save_state(plan, {"status": "running"})
    for name in ("summary.csv", "pseudonyms.csv", ".pseudonym_salt", "mlflow.db", "mlflow.db-wal"):
        (plan.sweep_dir / name).write_text(name)
    state.save_screening(plan.sweep_dir, {"cell": 0.01})
    state.push_files(plan)
    assert sorted(bucket.objects) == [state.SCREENING_FILE, "summary.csv", state.STATE_FILE]
    resumed = _plan(tmp_path / "elsewhere", root=bucket)  # another machine's working copy
    assert state.load_state(resumed, resume=True) == {"status": "running"}
    assert state.load_screening(resumed.sweep_dir) == {"cell": 0.01}
