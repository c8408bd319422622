"""Early stopping in a study: ASHA per screening cell, never in the grid.

One Tune run holds every cell's screen and the seeded grid (:mod:`lasegseg.sweep.search`). Validation scores of
different cells are not comparable (a linear decoder on frozen features and a fine-tuned UNETR live on different
scales), so each cell's screening trials get an ASHA of their own, as when each cell was its own Tune run; grid trials
always run to the end.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from lasegseg.sweep.spec import Screen
from lasegseg.sweep.study_table import METRIC, ROW, StudyTable


class StudyScheduler(FIFOScheduler):
    """FIFO for the grid; a per-cell ASHA (``screen.scheduler: asha``) for screening trials.

    Args:
        table: the study's trials (which rows are screening cells).
        screen: the screening settings (None: no early stopping at all).
        max_t: the screening trials' epochs (ASHA's last rung).
    """

    def __init__(self, table: StudyTable, screen: Screen | None, max_t: int) -> None:
        super().__init__()
        self.table, self.max_t = table, max_t
        self.asha = screen is not None and screen.scheduler == "asha"
        self.grace = screen.grace_period if screen is not None else 1
        self._cells: dict[int, ASHAScheduler] = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # fixed: val_dice, max

    def _cell(self, trial) -> ASHAScheduler | None:
        row = int(trial.config.get(ROW, -1))
        if not self.asha or row < 0 or not self.table.is_screen(row):
            return None
        if row not in self._cells:
            self._cells[row] = ASHAScheduler(
                time_attr="training_iteration", metric=METRIC, mode="max", max_t=self.max_t,
                grace_period=min(self.grace, self.max_t),
            )  # fmt: skip
        return self._cells[row]

    def on_trial_add(self, tune_controller, trial) -> None:
        if (asha := self._cell(trial)) is not None:
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        asha = self._cell(trial)
        if asha is None or METRIC not in result:
            return TrialScheduler.CONTINUE
        if trial.trial_id not in asha._trial_info:  # a restored trial, added before this scheduler knew it
            asha.on_trial_add(tune_controller, trial)
        return asha.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict[str, Any]) -> None:
        asha = self._cell(trial)
        if asha is not None and trial.trial_id in asha._trial_info and METRIC in result:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        asha = self._cell(trial)
        if asha is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"study scheduler: {len(self._cells)} screening cells under ASHA"
