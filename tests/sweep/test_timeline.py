"""How priced trials fill N GPUs: packing by GPU share, a cell's grid after its screen, the concurrency limit and the
training state held at once."""

from __future__ import annotations

import math

import pytest

from lasegseg.sweep.estimate import TrialCost
from lasegseg.sweep.timeline import schedule


def _trial(stage: str, cell: str, share: float, seconds: float, state: int = 0) -> TrialCost:
    return TrialCost(stage, "b", "m", "d", (cell,), share, seconds * share, "FLOPs", state_bytes=state)


def test_quarter_shares_pack_four_to_a_card():
    trials = [_trial("grid", "c", 0.25, 10.0) for _ in range(8)]
    assert schedule(trials, 1).seconds == 20.0  # four at a time, two rounds
    assert schedule(trials, 2).seconds == 10.0
    assert schedule(trials, 2).busy_gpu_s == pytest.approx(8 * 2.5)


def test_a_cells_grid_waits_for_its_own_screen_only():
    trials = [_trial("screen", "a", 1.0, 10.0), _trial("screen", "b", 1.0, 30.0),
              _trial("grid", "a", 1.0, 5.0), _trial("grid", "b", 1.0, 5.0)]  # fmt: skip
    # Two cards: both screens at 0; a's grid trial at 10 on a's card; b's grid trial at 30: 35 in all.
    assert schedule(trials, 2).seconds == 35.0
    # One card: screen a (10), screen b (40), then the two grid trials: 50.
    assert schedule(trials, 1).seconds == 50.0


def test_a_trial_that_does_not_fit_lets_a_smaller_one_go_first():
    trials = [_trial("grid", "c", 0.5, 10.0), _trial("grid", "c", 1.0, 10.0), _trial("grid", "c", 0.5, 10.0)]
    # One card: the two halves run together (0-10), the whole-card trial after them (10-20).
    assert schedule(trials, 1).seconds == 20.0


def test_max_concurrent_limits_the_trials_at_once_and_state_peaks_with_them():
    trials = [_trial("grid", "c", 0.25, 10.0, state=100) for _ in range(4)]
    limited = schedule(trials, 1, max_concurrent=2)
    assert limited.seconds == 20.0 and limited.peak_state_bytes == 200
    assert schedule(trials, 1).peak_state_bytes == 400


def test_unpriced_trials_take_no_time():
    trials = [_trial("grid", "c", 1.0, 4.0), TrialCost("grid", "x", "m", "d", ("c",), 1.0, math.nan, "unpriced")]
    assert schedule(trials, 1).seconds == 4.0 and schedule(trials, 1).busy_gpu_s == 4.0
