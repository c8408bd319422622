"""Early stopping per screening cell: ASHA compares a cell's trials with each other only, and never stops the grid."""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from lasegseg.sweep.scheduler import StudyScheduler
from lasegseg.sweep.spec import parse_spec
from lasegseg.sweep.study_table import ROW, StudyTable
from tests.sweep.conftest import sweep_spec

STOP, GO = TrialScheduler.STOP, TrialScheduler.CONTINUE


def _setup(scheduler: str):
    spec = parse_spec(sweep_spec(screen={"low": 1e-4, "high": 1e-2, "trials": 3, "scheduler": scheduler,
                                         "grace_period": 1}))  # fmt: skip
    table = StudyTable.of(spec)
    sched = StudyScheduler(table, spec.screen, max_t=3)

    def trial(tid, row):
        t = SimpleNamespace(trial_id=tid, config={ROW: row}, status="RUNNING")
        sched.on_trial_add(None, t)
        return t

    def report(t, score, it=1):
        return sched.on_trial_result(None, t, {"val_dice": score, "training_iteration": it})

    return table, trial, report


def test_asha_stops_a_poor_trial_against_its_own_cell_only_and_never_a_grid_trial():
    table, trial, report = _setup("asha")
    a1, a2, b1 = trial("a1", 0), trial("a2", 0), trial("b1", 1)
    assert report(a1, 0.9) == GO
    assert report(a2, 0.1) == STOP  # below cell 0's rung
    assert report(b1, 0.1) == GO  # cell 1's first result: not compared with cell 0
    grid = trial("g1", table.cells)
    assert all(report(grid, 0.0, it) == GO for it in (1, 2, 3))
    assert report(a1, 0.95, 2) == GO


def test_fifo_screens_stop_nothing():
    _, trial, report = _setup("fifo")
    a1, a2 = trial("a1", 0), trial("a2", 0)
    assert [report(a1, 0.9), report(a2, 0.1), report(a2, 0.0, 2)] == [GO, GO, GO]
