"""The study's trials as one table, so that Tune carries a trial as two numbers, not its whole config.

A study is its screening trials (one base config per (backbone, decoder, mode) cell) and its seeded grid. Both run
in one Tune run (:mod:`lasegseg.sweep.tune_runner`): a Tune trial's config is ``{"i": row, "optim.lr": rate}``,
and the row's full flat config lives here, in the :class:`StudyTable` every worker is handed once. Tune's experiment
state, which it rewrites and syncs to storage for the whole sweep, then holds ~40 bytes of config per trial instead
of the ~1.5 KB of a flat config (twice: as the config and as the grid value it came from).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lasegseg.config import from_flat, run_name
from lasegseg.sweep.spec import SweepSpec, cell_key

ROW = "i"
LR = "optim.lr"
METRIC = "val_dice"  # what Tune sees of a trial's validation: ASHA's rungs and the screen's choice


@dataclass(frozen=True)
class StudyTable:
    """Every trial of a study as a flat config, screening cells first.

    Args:
        rows: the flat configs: rows ``[0, cells)`` are the screening cells' base configs (their learning rate comes
            from the search), the rest the seeded grid (their rate from their cell's screen, when there is one).
        cells: how many rows are screening cells (0 when the study does not screen).
        cell_of: for every row, the index of its screening cell (-1 when the study does not screen).
    """

    rows: tuple[Mapping[str, Any], ...]
    cells: int
    cell_of: tuple[int, ...]

    @classmethod
    def of(cls, spec: SweepSpec) -> StudyTable:
        """The table of ``spec``: its screening cells (if it screens), then its grid in the spec's order."""
        screening = spec.screening_cells()
        grid = spec.trials()
        index = {cell_key(flat): i for i, flat in enumerate(screening)}
        cell_of = [*range(len(screening)), *(index.get(cell_key(flat), -1) for flat in grid)]
        if screening and -1 in cell_of:
            raise AssertionError("a grid trial has no screening cell")  # spec.screening_cells() covers every cell
        return cls(tuple(screening) + tuple(grid), len(screening), tuple(cell_of))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def grid_rows(self) -> range:
        return range(self.cells, len(self.rows))

    def is_screen(self, row: int) -> bool:
        return row < self.cells

    def flat(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The flat config of the Tune trial config ``config`` (``{"i": row}``, plus the rate when it has one)."""
        flat = dict(self.rows[int(config[ROW])])
        if LR in config:
            flat[LR] = float(config[LR])
        return flat

    def name(self, config: Mapping[str, Any]) -> str:
        """The readable name of a Tune trial config (its MLflow run's name)."""
        return run_name(from_flat(self.flat(config), validate=False))

    def cell_name(self, cell: int) -> str:
        """``backbone/decoder/mode`` of screening cell ``cell`` (its key without a False registers flag)."""
        return "/".join(str(k) for k in cell_key(self.rows[cell]) if k is not False)

    def digest(self) -> str:
        """A hash of every row: a resumed study must expand to the same table, or its trials' rows mean others."""
        text = json.dumps([sorted(r.items()) for r in self.rows], default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def log_grid(low: float, high: float, n: int) -> list[float]:
    """``n`` learning rates evenly spaced in log scale from ``low`` to ``high`` (both included), 3 significant
    figures: the same rates for every cell, as in a linear-probe evaluation's fixed grid."""
    if n == 1:
        return [float(f"{math.sqrt(low * high):.3g}")]
    step = (math.log(high) - math.log(low)) / (n - 1)
    return [float(f"{math.exp(math.log(low) + i * step):.3g}") for i in range(n)]
