"""The study's order: screens side by side, a cell's grid as soon as its own screen ends, failed cells skipped."""

from __future__ import annotations

import math

import pytest
from ray.tune.search import Searcher

from lasegseg.sweep.search import CellSearch, StudySearcher
from lasegseg.sweep.spec import Screen, parse_spec
from lasegseg.sweep.study_table import LR, ROW, StudyTable, log_grid
from tests.sweep.conftest import sweep_spec

SCREEN = {"low": 1e-4, "high": 1e-2, "trials": 3, "scheduler": "fifo"}


def _searcher(**screen):
    spec = parse_spec(sweep_spec(grid={"model.decoder": ["linear", "conv"]}, screen={**SCREEN, **screen}))
    table = StudyTable.of(spec)
    ended = []
    return StudySearcher(table, spec.screen, lambda c, r: ended.append((c, r))), table, ended


def _suggest_all(searcher, prefix):
    out = {}
    while isinstance(s := searcher.suggest(f"{prefix}{len(out)}"), dict):
        out[f"{prefix}{len(out)}"] = s
    return out, s


def test_every_cell_screens_at_once_and_a_grid_starts_when_its_own_screen_ends():
    searcher, table, ended = _searcher()
    screen, after = _suggest_all(searcher, "s")
    assert after is None  # the grid waits on the screens
    assert [c[ROW] for c in screen.values()] == [0, 0, 0, 1, 1, 1]
    assert [c[LR] for c in screen.values()][:3] == log_grid(1e-4, 1e-2, 3)  # the same rates for every cell
    for tid, config in screen.items():  # cell 0's screen ends; cell 1's is still running
        if config[ROW] == 0:
            searcher.on_trial_result(tid, {"val_dice": {1e-4: 0.2, 1e-3: 0.6, 1e-2: 0.4}[config[LR]]})
            searcher.on_trial_complete(tid, {"val_dice": 0.1})  # the best report counts, not the last
    assert ended == [(0, 1e-3)]
    grid, after = _suggest_all(searcher, "g")
    assert after is None and len(grid) == len([r for r in table.grid_rows if table.cell_of[r] == 0]) == 4
    assert all(table.cell_of[c[ROW]] == 0 and c[LR] == 1e-3 for c in grid.values())
    for tid, config in screen.items():
        if config[ROW] == 1:
            searcher.on_trial_complete(tid, {"val_dice": 0.5})
    rest, after = _suggest_all(searcher, "h")
    assert ended[-1] == (1, 1e-4)  # a tie goes to the smaller rate
    assert {table.cell_of[c[ROW]] for c in rest.values()} == {1} and len(rest) == 4 and after == Searcher.FINISHED


def test_a_cell_whose_screen_all_failed_is_failed_and_its_grid_never_runs():
    searcher, table, ended = _searcher()
    screen, _ = _suggest_all(searcher, "s")
    for tid, config in screen.items():
        searcher.on_trial_complete(tid, None, error=True) if config[ROW] == 0 else searcher.on_trial_complete(
            tid, {"val_dice": 0.3}
        )
    assert (0, None) in ended and searcher.failed_cells() == [0] and searcher.chosen() == {1: 1e-4}
    grid, after = _suggest_all(searcher, "g")
    assert {table.cell_of[c[ROW]] for c in grid.values()} == {1} and after == Searcher.FINISHED


def test_without_a_screen_the_grid_is_handed_out_in_order():
    spec = parse_spec(sweep_spec())
    table = StudyTable.of(spec)
    searcher = StudySearcher(table, None, lambda c, r: None)
    grid, after = _suggest_all(searcher, "g")
    assert [c for c in grid.values()] == [{ROW: r} for r in table.grid_rows] and after == Searcher.FINISHED


def test_its_state_survives_a_save_and_restore(tmp_path):
    searcher, table, _ = _searcher()
    screen, _ = _suggest_all(searcher, "s")
    first = next(iter(screen))
    searcher.on_trial_complete(first, {"val_dice": 0.7})
    searcher.save(str(tmp_path / "state.json"))
    again, _, ended = _searcher()
    again.restore(str(tmp_path / "state.json"))
    assert again.suggest("x") is None  # every screening trial was handed out already
    for tid in list(screen)[1:3]:
        again.on_trial_complete(tid, {"val_dice": 0.1})
    assert ended == [(0, log_grid(1e-4, 1e-2, 3)[0])]


def _tpe(seed: int, startup: int = 3, trials: int = 12, sampler: str = "optuna") -> list[float]:
    """Rates a cell's search proposes, told a smooth score that peaks at lr = 1e-3, one at a time."""
    cell = CellSearch(Screen(1e-5, 1e-1, trials=trials, search=sampler, startup=startup, parallel=1), seed=seed)
    for _ in range(trials):
        index, rate = cell.ask()
        cell.tell(index, 1.0 - abs(math.log10(rate) + 3.0) / 4.0)
    return cell.asked


def test_tpe_proposals_depart_from_random_ones_after_its_startup_points():
    import optuna

    tpe = _tpe(seed=5)
    random = [optuna.samplers.RandomSampler(seed=5 + i) for i in range(12)]
    rng = [
        optuna.create_study(sampler=s)
        .ask({LR: optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)})
        .params[LR]
        for s in random
    ]
    assert tpe[:3] == pytest.approx(rng[:3])  # the start-up points are random draws, seeded per ask
    model_based = [abs(math.log10(r) + 3.0) for r in tpe[3:]]
    at_random = [abs(math.log10(r) + 3.0) for r in rng[3:]]
    assert tpe[3:] != pytest.approx(rng[3:])
    assert sorted(model_based)[len(model_based) // 2] < sorted(at_random)[len(at_random) // 2]  # closer to the peak
    assert _tpe(seed=6)[:3] != pytest.approx(tpe[:3])  # cells are seeded apart


def test_tpe_holds_back_a_cells_trials_beyond_its_parallel_limit():
    cell = CellSearch(Screen(1e-5, 1e-1, trials=8, search="optuna", startup=3, parallel=2), seed=0)
    cell.ask(), cell.ask()
    assert not cell.can_ask()
    cell.tell(0, 0.5)
    assert cell.can_ask()
    grid = CellSearch(Screen(1e-5, 1e-1, trials=8), seed=0)
    assert all(grid.can_ask() and grid.ask() for _ in range(8)) and not grid.can_ask()


def test_a_cells_rate_is_chosen_once_even_when_a_restored_trial_reports_again():
    """A resumed study re-reports a finished screening trial (restored from its marker, scored from MLflow): the
    cell's rate, which its grid may already run at, stays the one chosen, and it is announced once."""
    searcher, table, ended = _searcher()
    screen, _ = _suggest_all(searcher, "s")
    scores = {1e-4: 0.2, 1e-3: 0.6, 1e-2: 0.4}
    for tid, config in screen.items():
        searcher.on_trial_complete(tid, {"val_dice": scores[config[LR]] if config[ROW] == 0 else 0.5})
    assert ended == [(0, 1e-3), (1, 1e-4)]
    again = next(tid for tid, c in screen.items() if c[ROW] == 0 and c[LR] == 1e-3)
    searcher.live[again] = [0, 1, None]  # Tune restores the trial; it reports a lower score this time
    searcher.on_trial_complete(again, {"val_dice": 0.1})
    assert ended == [(0, 1e-3), (1, 1e-4)] and searcher.chosen()[0] == 1e-3
