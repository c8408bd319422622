"""How a study's trials fill N GPUs over time, for its plan: greedy list scheduling of priced trials, a cell's grid
trials after its screen. Pure arithmetic on :class:`~lasegseg.sweep.estimate.TrialCost`: no torch, no ray."""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from lasegseg.sweep.estimate import TrialCost


@dataclass(frozen=True)
class Schedule:
    """How trials filled the GPUs.

    Args:
        seconds: wall time from the first start to the last end.
        busy_gpu_s: card-seconds of work done (the sum of the trials' ``gpu_s``).
        peak_state_bytes: the most training state the running trials held at once.
    """

    seconds: float
    busy_gpu_s: float
    peak_state_bytes: int


@dataclass
class _Cards:
    """Free capacity per card, the running trials by end time, and the training state they hold."""

    free: list[float]
    limit: int
    running: list[tuple[float, int, int, TrialCost]] = field(default_factory=list)
    state: int = 0
    peak: int = 0

    def start(self, now: float, order: int, trial: TrialCost) -> bool:
        """Start ``trial`` on the fullest card it fits on; False when none has room (or the limit is reached)."""
        if self.limit and len(self.running) >= self.limit:
            return False
        fits = [g for g, room in enumerate(self.free) if room >= trial.share - 1e-9]
        if not fits:
            return False
        card = min(fits, key=lambda g: (self.free[g], g))
        self.free[card] -= trial.share
        heapq.heappush(self.running, (now + _finite(trial.seconds), order, card, trial))
        self.state += trial.state_bytes
        self.peak = max(self.peak, self.state)
        return True

    def end_next(self) -> tuple[float, TrialCost]:
        """The next trial to end: its end time, its card's room given back."""
        end, _, card, trial = heapq.heappop(self.running)
        self.free[card] += trial.share
        self.state -= trial.state_bytes
        return end, trial


def schedule(trials: Sequence[TrialCost], gpus: int, max_concurrent: int = 0) -> Schedule:
    """Greedy list scheduling of ``trials`` on ``gpus`` cards of capacity 1.

    Feature passes and screen trials are ready at once; a cell's grid trials once the last of its screen trials
    ends (screening cells side by side, each cell's grid free to start as soon as its own screen is done). Ready
    trials start in order on the fullest card with room; one that does not fit lets a later one of another GPU
    share go first, as Tune starts whatever pending trial the free resources fit.

    Args:
        trials: priced trials (an unpriced one counts 0 s).
        gpus: cards.
        max_concurrent: at most this many trials at once (0: as many as fit).
    """
    screens: dict[tuple, int] = {}
    for t in trials:
        if t.stage == "screen":
            screens[t.cell] = screens.get(t.cell, 0) + 1
    waiting: dict[tuple, list[tuple[int, TrialCost]]] = {}
    ready: dict[float, deque[tuple[int, TrialCost]]] = {}  # by GPU share: the queue's head is its earliest
    for i, t in enumerate(trials):
        if t.stage == "grid" and screens.get(t.cell):
            waiting.setdefault(t.cell, []).append((i, t))
        else:
            ready.setdefault(t.share, deque()).append((i, t))
    cards = _Cards([1.0] * gpus, max_concurrent)
    now = busy = 0.0
    while True:
        _start_ready(cards, ready, now)
        if not cards.running:
            return Schedule(now, busy, cards.peak)
        now, done = cards.end_next()
        busy += _finite(done.gpu_s)
        if done.stage == "screen":
            screens[done.cell] -= 1
            if screens[done.cell] == 0:
                for item in waiting.pop(done.cell, []):
                    ready.setdefault(item[1].share, deque()).append(item)


def _start_ready(cards: _Cards, ready: dict[float, deque[tuple[int, TrialCost]]], now: float) -> None:
    """Start ready trials, earliest first, until none of the queues' heads fits."""
    while True:
        heads = sorted((queue[0][0], share) for share, queue in ready.items() if queue)
        for _, share in heads:
            order, trial = ready[share][0]
            if cards.start(now, order, trial):
                ready[share].popleft()
                break
        else:
            return


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0
