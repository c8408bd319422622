"""Metrics waiting for the tracking store: in memory, in logging order, mirrored to a node-local JSON-lines file that
the trial's next attempt reads back."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from mlflow.entities import Metric

from lasegseg.fsio import atomic_write
from lasegseg.paths import pending_metrics_dir


def pending_path(experiment_id: str, trial_id: str) -> Path:
    """Where a trial's unsent metrics wait (``$LASEGSEG_CACHE`` or ``~/.cache/lasegseg``, under mlflow-pending).

    A node-local file that outlives the trial's process, and the sweep's, for the trial's next attempt. Not the
    Tune trial folder: Tune copies that to the sweep's storage, where a stale copy would look like lost metrics.
    """
    return pending_metrics_dir() / f"{experiment_id}-{trial_id}.jsonl"


class MetricBuffer:
    """Metrics waiting for the tracking store, in logging order, mirrored to a JSON-lines file.

    One line per logging call (one epoch, or the final results), so a line cut short by a killed process loses
    that whole call, never part of it. The next attempt of the trial reads the file back and re-sends the lines
    with their original timestamps.

    Args:
        path: the file; ``None`` keeps the buffer in memory only.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._items: list[tuple[str, Metric]] = []  # (kind, metric)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def load(self, run_id: str, kinds: tuple[str, ...] = ("epoch",)) -> list[Metric]:
        """Read back the file's metrics of ``run_id`` and of the given kinds; other lines are dropped."""
        if self.path is None or not self.path.is_file():
            return []
        restored = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
                if row["run_id"] == run_id and row["kind"] in kinds:
                    kind = row["kind"]
                    restored += [(kind, Metric(k, float(v), int(ts), int(st))) for k, v, ts, st in row["metrics"]]
            except (ValueError, KeyError, TypeError):
                continue  # the last line of a killed process
        with self._lock:
            self._items = restored
            self._rewrite(run_id)
            return [m for _, m in self._items]

    def extend(self, run_id: str, metrics: list[Metric], kind: str = "epoch") -> None:
        """Queue ``metrics`` (one logging call) behind everything already waiting."""
        if not metrics:
            return
        with self._lock:
            self._items.extend((kind, m) for m in metrics)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Appended, not rewritten: one whole line per call, and a line cut short is skipped by load().
                with open(self.path, "a") as fh:
                    fh.write(_buffer_line(run_id, metrics, kind) + "\n")

    def head(self, n: int) -> list[Metric]:
        """The first ``n`` metrics waiting, oldest first."""
        with self._lock:
            return [m for _, m in self._items[:n]]

    def drop(self, run_id: str, n: int) -> None:
        """Forget the first ``n`` metrics: the store has them."""
        with self._lock:
            del self._items[:n]
            self._rewrite(run_id)

    def _rewrite(self, run_id: str) -> None:
        if self.path is None:
            return
        if not self._items:
            self.path.unlink(missing_ok=True)
            return
        lines, start = [], 0
        for i in range(1, len(self._items) + 1):  # one line per run of equal kinds, in order
            if i == len(self._items) or self._items[i][0] != self._items[start][0]:
                lines.append(_buffer_line(run_id, [m for _, m in self._items[start:i]], self._items[start][0]))
                start = i
        atomic_write(self.path, "".join(line + "\n" for line in lines))


def _buffer_line(run_id: str, metrics: list[Metric], kind: str) -> str:
    rows = [[m.key, m.value, m.timestamp, m.step] for m in metrics]
    return json.dumps({"run_id": run_id, "kind": kind, "metrics": rows})
