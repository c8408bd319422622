"""The metric table: every per-patient metric lasegseg tracks, declared once.

Each entry says what a metric is called, which way is better, its range, how it is shown, how it aggregates and
what it is when a mask is empty. Everything that handles metrics reads this table: the per-case scores of a trial
(:mod:`lasegseg.train.metrics`, which holds each metric's function), the names a trial logs to MLflow, the sweep
summary, the paired comparison, the export's selection and model card, the study report and the command line's
``--metric`` choices. Adding a metric is one :class:`Metric` entry here (or :func:`METRICS.add` from a plugin) plus
its function (``@case_metric(name)`` in :mod:`lasegseg.train.metrics`).

Names derived from an entry ``m`` (``dice`` below):

==============================  =================================================================================
``dice``                        the column of ``per_patient.csv`` (one value per test patient)
``test_dice_mean`` / ``_std``   a trial's mean and population std over its test patients (NaN values skipped)
``test_hd95_n_undefined``       with ``count_undefined``: the test patients whose value was undefined (NaN)
``val_dice``                    with ``validation``: scored each epoch on the validation patients; the best
                                epoch's value is the trial's ``val_dice``, a metric a model may be chosen on
``test_dice_mean_mean`` …       the summary over a cell's seeds (``over_seeds``: ``interval`` = mean, sample std
                                and Student-t 95% interval; ``mean`` = mean only; ``none`` = not summarised)
==============================  =================================================================================

This module is imported by the command line at start-up: it needs nothing but the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lasegseg.errors import ConfigError
from lasegseg.registry import Registry

OverSeeds = Literal["interval", "mean", "none"]
NAN = math.nan


@dataclass(frozen=True)
class Metric:
    """One tracked per-patient metric.

    Args:
        name: the per-patient column and the stem of every tracked name (``dice`` → ``test_dice_mean``).
        display: its name for people (``Dice``).
        higher_is_better: the direction (False for distances: a win is then a negative difference).
        low, high: its range (``high`` may be ``inf``); a value outside it is a bug, and plots of a bounded metric
            use the range as their axis.
        fmt: format of one value in tables (``.3f``).
        unit: the unit for people (``mm``), or ``""``.
        empty_both, empty_pred, empty_ref: the value when both masks are empty, when only the prediction is empty,
            and when only the reference is empty (Metrics Reloaded's conventions; NaN = undefined, which means skip;
            None = no rule: the metric's function is called on the empty mask too, as for a volume difference).
        count_undefined: log beside the mean how many test patients had no value (``test_<name>_n_undefined``),
            summed over a cell's seeds in the summary, so a mean over fewer patients is visible as such.
        over_seeds: how the summary shows it over a cell's seeds (see the module notes). Metrics shown ``interval``
            or ``mean`` are also the ones the paired comparison, the export's model card and the report offer.
        validation: also scored on the validation patients each epoch (``val_<name>``); the first such metric of
            the table ranks the summary and picks the reference cell and the exported model by default.
        curves: drawn as few-shot curves (test value against training size).
        dots: drawn as per-patient dot plots in the report.
    """

    name: str
    display: str
    higher_is_better: bool = True
    low: float = 0.0
    high: float = 1.0
    fmt: str = ".3f"
    unit: str = ""
    empty_both: float | None = 1.0
    empty_pred: float | None = 0.0
    empty_ref: float | None = 0.0
    count_undefined: bool = False
    over_seeds: OverSeeds = "interval"
    validation: bool = False
    curves: bool = False
    dots: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"metric name '{self.name}' must be a lower-case identifier")
        if self.over_seeds not in ("interval", "mean", "none"):
            raise ValueError(f"metric '{self.name}': over_seeds must be interval, mean or none, got {self.over_seeds}")
        if self.validation and not self.higher_is_better:
            raise ValueError(f"metric '{self.name}': validation ranks cells best first, so higher must be better")
        if not self.low < self.high:
            raise ValueError(f"metric '{self.name}': low {self.low} must be below high {self.high}")

    @property
    def test_mean(self) -> str:
        """A trial's mean over its test patients (``test_dice_mean``)."""
        return f"test_{self.name}_mean"

    @property
    def test_std(self) -> str:
        """A trial's population std over its test patients (``test_dice_std``)."""
        return f"test_{self.name}_std"

    @property
    def n_undefined(self) -> str:
        """A trial's count of test patients without a value (``test_hd95_n_undefined``)."""
        return f"test_{self.name}_n_undefined"

    @property
    def val(self) -> str:
        """The validation value (``val_dice``)."""
        return f"val_{self.name}"

    @property
    def summarised(self) -> bool:
        """Shown in the summary, and offered by the comparison, the model card and the report."""
        return self.over_seeds != "none"

    @property
    def bounded(self) -> bool:
        """A finite range (an overlap score in [0, 1]): plots use it as their axis."""
        return math.isfinite(self.low) and math.isfinite(self.high)

    def label(self) -> str:
        """``Dice``, ``HD95 (mm)``."""
        return f"{self.display} ({self.unit})" if self.unit else self.display

    def format(self, value: float) -> str:
        """One value for a table, ``–`` when missing."""
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, self.fmt)


METRICS: Registry[Metric] = Registry("metric", "metrics", ConfigError)
"""The table, in the order tables and files show the metrics."""

METRICS.add("dice", Metric("dice", "Dice", validation=True, curves=True, dots=True))
METRICS.add("iou", Metric("iou", "IoU", validation=True, curves=True))
METRICS.add("nsd", Metric("nsd", "NSD", dots=True))
METRICS.add(
    "hd95",
    Metric(
        "hd95", "HD95", higher_is_better=False, high=math.inf, fmt=".2f", unit="mm", empty_both=0.0, empty_pred=NAN,
        empty_ref=NAN, count_undefined=True, over_seeds="mean",
    ),
)  # fmt: skip
METRICS.add(
    "slice_dice", Metric("slice_dice", "slice Dice", empty_both=NAN, empty_ref=NAN, over_seeds="none")
)  # fmt: skip


def add_metric(metric: Metric) -> Metric:
    """Add ``metric`` to the table (its function goes to :func:`lasegseg.train.metrics.case_metric`)."""
    return METRICS.add(metric.name, metric)


def metric(name: str) -> Metric:
    """The entry of ``name``; a ConfigError listing the valid names when there is none."""
    return METRICS.get(name)


def metrics() -> list[Metric]:
    """Every entry, in table order."""
    return list(METRICS.values())


def summarised() -> list[Metric]:
    """The metrics the summary shows over seeds (and the comparison, model card and report offer)."""
    return [m for m in METRICS.values() if m.summarised]


def validation() -> list[Metric]:
    """The metrics scored on validation, the first of them the default ranking."""
    return [m for m in METRICS.values() if m.validation]


def primary() -> Metric:
    """The table's first validation metric: it ranks the summary and picks the reference and the exported model."""
    return validation()[0]


def selection_metrics() -> list[str]:
    """The names a model may be chosen on (``val_dice``, ``val_iou``): validation values, never test ones."""
    return [m.val for m in validation()]


def trial_metrics() -> list[str]:
    """The final values a trial logs (besides its counts): for every metric ``test_<m>_mean``/``_std``, with
    ``count_undefined`` ``test_<m>_n_undefined``."""
    names = []
    for m in METRICS.values():
        names += [m.test_mean, m.test_std] + ([m.n_undefined] if m.count_undefined else [])
    return names


def epoch_metrics() -> list[str]:
    """The per-epoch series of a trial: the training loss, each validation metric and the learning rate."""
    return ["train_loss", *(m.val for m in validation()), "lr"]
