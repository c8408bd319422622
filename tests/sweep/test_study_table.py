"""The study's trials as one table: screening cells first, each grid row knowing its cell."""

from __future__ import annotations

import math

import pytest

from lasegseg.sweep.spec import cell_key, parse_spec
from lasegseg.sweep.study_table import LR, ROW, StudyTable, log_grid
from tests.sweep.conftest import sweep_spec


def _screened(**screen):
    return parse_spec(sweep_spec(screen={"low": 1e-5, "high": 1e-2, "trials": 4, **screen}))


def test_screening_cells_come_first_and_every_grid_row_names_its_cell():
    spec = _screened()
    table = StudyTable.of(spec)
    cells, grid = spec.screening_cells(), spec.trials()
    assert table.cells == len(cells) == 4 and len(table) == 4 + len(grid) == 4 + 16
    assert list(table.rows[:4]) == cells and list(table.rows[4:]) == grid
    for row in table.grid_rows:
        assert cell_key(table.rows[table.cell_of[row]]) == cell_key(table.rows[row])
    assert [table.is_screen(r) for r in (0, 3, 4)] == [True, True, False]


def test_a_tune_config_of_two_numbers_is_the_whole_flat_config():
    table = StudyTable.of(_screened())
    row = table.cells + 5
    flat = table.flat({ROW: row, LR: 0.004})
    assert flat == {**table.rows[row], LR: 0.004}
    assert table.flat({ROW: row}) == dict(table.rows[row])  # no screen: the grid's own rate
    assert table.name({ROW: row, LR: 0.004}).startswith(f"{flat['model.decoder']}·{flat['model.mode']}·")
    assert "lr0.004" in table.name({ROW: row, LR: 0.004})
    assert table.cell_name(0) == f"{flat['model.backbone']}/linear/frozen"


def test_without_a_screen_the_table_is_the_grid():
    spec = parse_spec(sweep_spec())
    table = StudyTable.of(spec)
    assert table.cells == 0 and list(table.rows) == spec.trials() and set(table.cell_of) == {-1}


def test_the_digest_changes_with_any_trial():
    a, b = StudyTable.of(_screened()), StudyTable.of(_screened())
    assert a.digest() == b.digest()
    assert StudyTable.of(_screened(trials=5)).digest() == a.digest()  # the rates are the search's, not rows
    more_seeds = parse_spec(sweep_spec(seeds=[0, 1, 2], screen={"low": 1e-5, "high": 1e-2, "trials": 4}))
    assert StudyTable.of(more_seeds).digest() != a.digest()


def test_log_grid_is_evenly_spaced_in_log_and_includes_both_ends():
    rates = log_grid(1e-5, 3e-3, 8)
    assert rates[0] == pytest.approx(1e-5) and rates[-1] == pytest.approx(3e-3) and len(rates) == 8
    ratios = [b / a for a, b in zip(rates, rates[1:], strict=False)]
    assert all(r == pytest.approx(300 ** (1 / 7), rel=0.01) for r in ratios)
    assert log_grid(1e-4, 1e-2, 1) == [pytest.approx(1e-3)]
    assert all(math.isfinite(r) and len(f"{r:.3g}") <= 8 for r in rates)
