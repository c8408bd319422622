"""Which trial of the study runs next: screening cells side by side, and a cell's grid as soon as its screen ends.

:class:`StudySearcher` is the one Tune searcher of a study. It hands Tune the screening trials of every cell first
(each gates a cell's grid), then the grid trials of every cell whose screen has ended, at that cell's chosen rate.
When nothing can start yet (the remaining grid waits on screens still running) it says so and Tune asks again, so
a slot is idle only while every pending trial waits on a screen. A cell whose screening trials all fail is a failed
cell: its grid never runs, the other cells go on, and the sweep names it at the end.

How a cell's rates are proposed (``screen.search``):

- ``grid``: ``screen.trials`` rates log-spaced over [low, high], the same for every cell. The default, and the
  paper's: a cell's 8 trials run at once (on a 16-GPU cluster the screen is not serialised behind its own
  results), every cell is compared on the same rates, and ASHA still stops the poor ones early. With 8 points in
  one dimension a model-based search has little room to beat a log grid.
- ``optuna``: Optuna's TPE per cell, seeded per cell: ``screen.startup`` random rates, then model-based ones, at most
  ``screen.parallel`` of a cell's trials at once with the constant liar, so that each proposal sees the results
  before it (all trials at once would leave TPE nothing to model).

The searcher's state is JSON (:meth:`StudySearcher.save`), which Tune keeps beside its experiment state, so a resumed
sweep goes on with the cells' results so far.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from typing import Any

from ray.tune.search import Searcher

from lasegseg.sweep.spec import Screen
from lasegseg.sweep.study_table import LR, METRIC, ROW, StudyTable, log_grid


class CellSearch:
    """The rates of one cell's screen and their results.

    Args:
        screen: the sweep's screening settings.
        seed: the cell's seed (Optuna's sampler; a different one per cell).
    """

    def __init__(self, screen: Screen, seed: int) -> None:
        self.screen, self.seed = screen, seed
        self.asked: list[float] = []  # rates handed out, in order
        self.told: dict[int, float | None] = {}  # ask index → best validation score (None: failed)
        self._study = None

    @property
    def issued(self) -> int:
        return len(self.asked)

    @property
    def done(self) -> bool:
        return len(self.told) == self.screen.trials

    @property
    def failed(self) -> bool:
        return self.done and all(v is None for v in self.told.values())

    def can_ask(self) -> bool:
        if self.issued >= self.screen.trials:
            return False
        if self.screen.search == "optuna":
            return self.issued - len(self.told) < self.screen.parallel
        return True

    def ask(self) -> tuple[int, float]:
        """The next rate and its ask index."""
        if self.screen.search == "grid":
            rate = log_grid(self.screen.low, self.screen.high, self.screen.trials)[self.issued]
        else:
            rate = self._tpe_ask()
        self.asked.append(rate)
        return len(self.asked) - 1, rate

    def tell(self, index: int, value: float | None) -> None:
        value = value if value is not None and math.isfinite(value) else None
        if self.told.get(index) is not None:  # told again (a restored trial): the best of what it reported
            value = self.told[index] if value is None else max(self.told[index], value)
        self.told[index] = value
        self._study = None  # rebuilt from asked/told on the next ask: one source of truth

    def best(self) -> float | None:
        """The rate of the best finished trial (ties: the smaller rate), None before the end or when all failed."""
        scored = [(v, -self.asked[i]) for i, v in self.told.items() if v is not None]
        return -max(scored)[1] if self.done and scored else None

    def _tpe_ask(self) -> float:
        # deferred: heavy (optuna, ~0.3 s): only a study that screens with it
        import optuna
        from optuna.distributions import FloatDistribution
        from optuna.trial import TrialState, create_trial

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        dist = {LR: FloatDistribution(self.screen.low, self.screen.high, log=True)}
        sampler = optuna.samplers.TPESampler(
            n_startup_trials=self.screen.startup, seed=self.seed + len(self.asked), constant_liar=True
        )
        study = optuna.create_study(direction="maximize", sampler=sampler)
        for i, rate in enumerate(self.asked):
            if i not in self.told:
                state, value = TrialState.RUNNING, None  # the constant liar scores these for TPE
            elif self.told[i] is None:
                state, value = TrialState.FAIL, None
            else:
                state, value = TrialState.COMPLETE, self.told[i]
            study.add_trial(create_trial(params={LR: rate}, distributions=dist, state=state, value=value))
        return float(study.ask(dist).params[LR])

    def state(self) -> dict[str, Any]:
        return {"asked": self.asked, "told": {str(k): v for k, v in self.told.items()}}

    def load(self, state: dict[str, Any]) -> None:
        self.asked = [float(r) for r in state["asked"]]
        self.told = {int(k): v for k, v in state["told"].items()}


class StudySearcher(Searcher):
    """The study's trials for Tune: see the module docstring.

    Args:
        table: the study's trials.
        screen: its screening settings (None: no screen, the grid runs at its own rates).
        on_cell: called with (cell index, chosen rate or None when the cell failed) as each screen ends.
    """

    def __init__(self, table: StudyTable, screen: Screen | None, on_cell: Callable[[int, float | None], None]) -> None:
        super().__init__(metric=METRIC, mode="max")
        self.table, self.screen, self.on_cell = table, screen, on_cell
        self.cells = [CellSearch(screen, seed=_cell_seed(table, c)) for c in range(table.cells)] if screen else []
        self.next_grid = [0] * max(1, table.cells)  # per cell, the position in its grid rows handed out
        self.grid_of = _grid_rows_by_cell(table)
        self.live: dict[str, list] = {}  # trial id → [row, ask index (screen) or -1, best score so far]

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the metric is fixed (val_dice, max); the config is this searcher's own

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        for c, cell in enumerate(self.cells):
            if cell.can_ask():
                index, rate = cell.ask()
                self.live[trial_id] = [c, index, None]
                return {ROW: c, LR: rate}
        waiting = False
        for c, rows in enumerate(self.grid_of):
            if self.next_grid[c] >= len(rows):
                continue
            if self.cells and not self.cells[c].done:
                waiting = True
                continue
            if self.cells and self.cells[c].failed:
                continue
            row = rows[self.next_grid[c]]
            self.next_grid[c] += 1
            self.live[trial_id] = [row, -1, None]
            return {ROW: row, LR: self.cells[c].best()} if self.cells else {ROW: row}
        return None if waiting or any(not cell.done for cell in self.cells) else Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        entry = self.live.get(trial_id)
        value = result.get(METRIC)
        if entry is not None and entry[1] >= 0 and isinstance(value, (int, float)) and math.isfinite(value):
            entry[2] = value if entry[2] is None else max(entry[2], value)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        entry = self.live.pop(trial_id, None)
        if entry is None or entry[1] < 0:
            return
        value = (result or {}).get(METRIC)
        if not error and isinstance(value, (int, float)) and math.isfinite(value):
            entry[2] = value if entry[2] is None else max(entry[2], value)
        cell = self.cells[entry[0]]
        was_done = cell.done
        cell.tell(entry[1], None if error else entry[2])
        if cell.done and not was_done:  # a cell's rate is chosen once: its grid may already run at it
            self.on_cell(entry[0], cell.best())

    def failed_cells(self) -> list[int]:
        return [c for c, cell in enumerate(self.cells) if cell.failed]

    def chosen(self) -> dict[int, float]:
        return {c: rate for c, cell in enumerate(self.cells) if (rate := cell.best()) is not None}

    def save(self, checkpoint_path: str) -> None:
        state = {"digest": self.table.digest(), "cells": [c.state() for c in self.cells],
                 "next_grid": self.next_grid, "live": self.live}  # fmt: skip
        with open(checkpoint_path, "w") as fh:
            json.dump(state, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as fh:
            state = json.load(fh)
        if state["digest"] != self.table.digest():
            raise RuntimeError("the study's trials changed since its first run: start a new sweep instead of --resume")
        for cell, saved in zip(self.cells, state["cells"], strict=True):
            cell.load(saved)
        self.next_grid, self.live = list(state["next_grid"]), dict(state["live"])


def _cell_seed(table: StudyTable, cell: int) -> int:
    """A seed per cell (its name's CRC with the sweep's seed): cells do not all draw the same random rates."""
    return (zlib.crc32(table.cell_name(cell).encode()) + int(table.rows[cell].get("seed", 0))) % 2**31


def _grid_rows_by_cell(table: StudyTable) -> list[list[int]]:
    """The grid rows of each screening cell, in table order (one list of all of them without a screen)."""
    if not table.cells:
        return [list(table.grid_rows)]
    out: list[list[int]] = [[] for _ in range(table.cells)]
    for row in table.grid_rows:
        out[table.cell_of[row]].append(row)
    return out
