"""Paired comparison of a sweep's cells against a reference cell, from MLflow alone (``lasegseg compare``).

Each finished trial run's ``per_patient.csv`` artifact gives per-patient test metrics; seeds are averaged within
(cell, patient), and every other cell is compared with the reference over the patients both have (see
:mod:`lasegseg.stats`). The reference is picked on validation (best mean validation Dice), never on test.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lasegseg import metric_table, stats
from lasegseg.errors import LasegsegError
from lasegseg.fsio import atomic_write
from lasegseg.results.aggregate import summarize
from lasegseg.results.comparison_tables import comparison_notes, format_markdown
from lasegseg.results.per_patient import PER_PATIENT_FILE, artifact_uris, fetch_tables, patient_matrix, write_table
from lasegseg.results.trials import (
    cell_keys,
    experiment_id,
    latest_sweep_run,
    load_trials,
    log_to_sweep_run,
    ranking_column,
    tracking,
)

log = logging.getLogger(__name__)

AGAINST = ("best", "baseline")
BASELINE_BACKBONE = "none"
FEWSHOT_KEYS = ("data.patients", "data.fraction")
"""What a few-shot size is: a sweep's baselines are trained at each one, and each cell is compared with its own."""


# --------------------------------------------------------------------------------------------------- reference


def pick_reference(summary: pd.DataFrame, trials: pd.DataFrame, against: str = "best") -> tuple[str, str]:
    """The reference cell and why it was chosen.

    Args:
        summary: :func:`lasegseg.results.aggregate.summarize` (best validation Dice first).
        trials: the trials it summarises (for run names and ids).
        against: ``best`` (highest mean validation Dice — never test), ``baseline`` (the cell whose
            ``model.backbone`` is ``none``, the UNet), a cell hash or a unique prefix of one, a run name or run id.

    Raises:
        LasegsegError: the choice matches no cell, or several.
    """
    if against == "best":
        best, rank, name = summary.iloc[0], ranking_column(), metric_table.primary().display
        if pd.isna(best[rank]):
            raise LasegsegError(f"no cell has a validation {name} to pick the reference by; pass --against CELL")
        return best["cell"], f"best mean validation {name} ({best[rank]:.4f} over {best['n']} seed(s))"
    if against == "baseline":
        if "model.backbone" not in summary.columns:
            raise LasegsegError("the trials did not log model.backbone; cannot find the baseline cell")
        hits = summary[summary["model.backbone"] == BASELINE_BACKBONE]
        if len(hits) != 1:
            found = "none" if hits.empty else ", ".join(hits["cell"])
            raise LasegsegError(
                f"--against baseline needs exactly one cell with model.backbone={BASELINE_BACKBONE} (found: {found});"
                " pass --against CELL"
            )
        return hits["cell"].iloc[0], f"the baseline (model.backbone={BASELINE_BACKBONE})"
    hits = sorted(set(summary["cell"][summary["cell"].str.startswith(against)]))
    by_run = trials[(trials["run_name"] == against) | (trials["run_id"] == against)]
    hits = hits or sorted(set(by_run["cell"]))
    if len(hits) == 1:
        return hits[0], f"chosen with --against {against}"
    if len(hits) > 1:
        raise LasegsegError(f"--against {against} matches {len(hits)} cells ({', '.join(hits)}); give more of the hash")
    raise LasegsegError(
        f"--against {against}: not best, baseline, a cell hash or a run name of these trials "
        f"(cells: {', '.join(summary['cell'])})"
    )


def baseline_groups(summary: pd.DataFrame) -> list[tuple[str, list[str]]] | None:
    """``[(baseline cell, the cells compared with it)]``, one per few-shot size, when a sweep has one UNet baseline
    cell per few-shot size (as ``baselines:`` crossed with ``fewshot:`` gives); None when it has at most one.

    A cell is compared with the baseline trained on the same few-shot subset (same ``data.patients`` and
    ``data.fraction``): against a baseline that saw more or fewer patients, a difference would mix the two effects.

    Raises:
        LasegsegError: two baseline cells share a few-shot size (e.g. baselines at two learning rates).
    """
    if "model.backbone" not in summary.columns:
        return None
    is_base = summary["model.backbone"] == BASELINE_BACKBONE
    if is_base.sum() <= 1:
        return None
    keys = [k for k in FEWSHOT_KEYS if k in summary.columns]
    groups = []
    for _, cells in summary.groupby(keys, dropna=False, sort=False) if keys else [(None, summary)]:
        bases = cells[cells["model.backbone"] == BASELINE_BACKBONE]
        if len(bases) > 1:
            raise LasegsegError(
                f"--against baseline: {len(bases)} baseline cells share a few-shot size ({', '.join(bases['cell'])}); "
                "pass --against CELL"
            )
        if len(bases) == 1:
            groups.append((bases["cell"].iloc[0], list(cells["cell"])))
    return groups


# --------------------------------------------------------------------------------------------------- comparing


def compare_cells(
    matrix: pd.DataFrame,
    summary: pd.DataFrame,
    reference: str,
    *,
    metric: str,
    resamples: int = stats.DEFAULT_RESAMPLES,
    seed: int = 0,
    tie: float = stats.DEFAULT_TIE,
) -> pd.DataFrame:
    """One row per cell of ``summary``: the reference first, then every other cell compared with it.

    Args:
        matrix: patients × cells (:func:`patient_matrix`).
        summary: :func:`lasegseg.results.aggregate.summarize` (config columns, ``cell``, ``val_dice_mean``).
        reference: the reference cell.
        metric: the metric's name in :mod:`lasegseg.metric_table` (which decides the direction).
        resamples: bootstrap samples (CI and rank stability).
        seed: bootstrap seed.
        tie: ``|difference| <= tie`` is a tie.

    Returns:
        columns: the summary's config columns, ``cell``, ``reference``, ``metric``, ``lower_is_better``,
        ``n_seeds``, ``n_patients``, ``mean`` (over patients of the seed-averaged values), ``val_dice_mean``,
        ``n_pairs``, ``median_diff``/``ci_low``/``ci_high`` (cell − reference), ``p`` (Wilcoxon), ``p_holm``,
        ``wins``/``ties``/``losses``, ``small_sample`` (no p < 0.05 reachable), ``p_first`` (rank stability).
        ``attrs["rank_stability"]`` holds :class:`lasegseg.stats.RankStability`.
    """
    lower = not metric_table.metric(metric).higher_is_better
    order = [reference] + [c for c in summary["cell"] if c != reference]
    matrix = matrix.reindex(columns=order)
    ref_values = matrix[reference].to_numpy(float)
    rows = []
    for cell in order:
        values = matrix[cell].to_numpy(float)
        row: dict[str, Any] = {"cell": cell, "n_patients": int(np.isfinite(values).sum())}
        row["mean"] = float(np.nanmean(values)) if row["n_patients"] else math.nan
        if cell != reference:
            result = stats.paired_comparison(
                values, ref_values, lower_is_better=lower, resamples=resamples, seed=seed, tie=tie
            )
            row.update({k: getattr(result, k) for k in ("n_pairs", "median_diff", "ci_low", "ci_high", "p")})
            row.update(wins=result.wins, ties=result.ties, losses=result.losses, small_sample=result.small_sample)
        rows.append(row)
    table = pd.DataFrame(rows)
    table["p_holm"] = stats.holm(table["p"].to_numpy(float)) if "p" in table else math.nan

    # A cell without any value (it did not record the metric) would leave no complete patient for the others.
    complete = matrix.dropna(axis=1, how="all").dropna(axis=0, how="any")
    stability = stats.rank_stability(complete.to_numpy(float), lower_is_better=lower, resamples=resamples, seed=seed)
    table["p_first"] = pd.Series(stability.p_first, index=complete.columns).reindex(order).to_numpy()

    keys = cell_keys(summary)
    info = summary.set_index("cell").reindex(order)
    out = pd.DataFrame({k: info[k].to_numpy() for k in keys})
    out["cell"] = order
    out["reference"] = reference
    out["metric"] = metric
    out["lower_is_better"] = lower
    out["n_seeds"] = info["n"].to_numpy()
    out[ranking_column()] = info[ranking_column()].to_numpy()
    for column in ("n_patients", "mean", "n_pairs", "median_diff", "ci_low", "ci_high", "p", "p_holm"):
        out[column] = table[column].to_numpy() if column in table else math.nan
    for column in ("wins", "ties", "losses"):
        out[column] = table[column].astype("Int64").array if column in table else pd.NA
    out["n_pairs"] = out["n_pairs"].astype("Int64")
    out["small_sample"] = table["small_sample"].astype("boolean").array if "small_sample" in table else pd.NA
    out["p_first"] = table["p_first"].to_numpy()
    out.attrs["rank_stability"] = stability
    return out


def compare_groups(
    matrix: pd.DataFrame, summary: pd.DataFrame, groups: list[tuple[str, list[str]]], **kwargs: Any
) -> pd.DataFrame:
    """:func:`compare_cells` for each ``(reference, cells)`` group, one table; Holm runs over every comparison of
    every group, while ``P(first)`` stays within a group.

    Args:
        matrix: patients × cells (:func:`patient_matrix`).
        summary: the summary of all cells.
        groups: from :func:`baseline_groups`, or one group holding every cell.
        kwargs: ``metric``, ``resamples``, ``seed``, ``tie`` of :func:`compare_cells`.
    """
    tables = [compare_cells(matrix, summary[summary["cell"].isin(cells)], ref, **kwargs) for ref, cells in groups]
    if len(tables) == 1:
        return tables[0]
    for part in tables:
        part.attrs = {}  # pandas compares the parts' attrs on concat; each part's rank stability is its own
    table = pd.concat(tables, ignore_index=True)
    table["p_holm"] = stats.holm(table["p"].to_numpy(float))
    table.attrs.update(rank_stability=None, grouped=True)
    return table


# --------------------------------------------------------------------------------------------------- writing


def output_names(metric: str) -> tuple[str, str]:
    """``comparison.parquet``/``.md`` for the primary metric (Dice); ``comparison_<metric>.*`` for others, so they
    never overwrite."""
    stem = "comparison" if metric == metric_table.primary().name else f"comparison_{metric}"
    return f"{stem}.parquet", f"{stem}.md"


def write_comparison(comparison: pd.DataFrame, notes: list[str], out_dir: str | Path) -> dict[str, Path]:
    """Write the comparison's parquet and Markdown files atomically; returns ``{"parquet": …, "md": …}``.

    Args:
        comparison: :func:`compare_cells`.
        notes: :func:`comparison_notes`.
        out_dir: the folder (created when missing).
    """
    out = Path(out_dir)
    parquet, md = output_names(comparison["metric"].iloc[0])
    frame = comparison.copy()
    frame.attrs = {}  # the dataclass in attrs is for this process; the notes travel in the .md
    text = f"# Paired comparison against the reference ({comparison['metric'].iloc[0]})\n\n"
    text += format_markdown(comparison, notes)
    return {
        "parquet": atomic_write(out / parquet, lambda p: frame.to_parquet(p, engine="pyarrow", index=False)),
        "md": atomic_write(out / md, lambda p: p.write_text(text, encoding="utf-8")),
    }


@dataclass
class Comparison:
    """A paired comparison and what it was made from.

    Args:
        table: :func:`compare_cells` (one row per cell, the reference first).
        notes: :func:`comparison_notes`.
        tables: ``{run_id: per_patient table}`` of the runs read, for other metrics (the report's dot plots).
        one_by_one: how many of them were read from their own runs, not from the parent run's table.
    """

    table: pd.DataFrame
    notes: list[str]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    one_by_one: int = 0

    def markdown(self) -> str:
        """:func:`format_markdown` of the table and notes."""
        return format_markdown(self.table, self.notes)


def compare_trials(
    tracking_uri: str,
    experiment: str,
    trials: pd.DataFrame,
    summary: pd.DataFrame,
    parent_run_id: str | None = None,
    *,
    metric: str = "dice",
    against: str = "best",
    seed: int = 0,
    resamples: int = stats.DEFAULT_RESAMPLES,
    tie: float = stats.DEFAULT_TIE,
) -> Comparison:
    """Compare the cells of ``trials`` with the reference, reading their ``per_patient.csv`` artifacts.

    Args:
        tracking_uri: the MLflow URI.
        experiment: the sweep's experiment.
        trials: :func:`lasegseg.results.aggregate.load_trials` of ``experiment`` (and ``parent_run_id``).
        summary: :func:`lasegseg.results.aggregate.summarize` of ``trials``.
        parent_run_id: the sweep run ``trials`` were read for, or None for all of the experiment's.
        metric: a metric of :mod:`lasegseg.metric_table` (``dice``, ``iou``, ``nsd``, ``hd95`` …).
        against: the reference (:func:`pick_reference`).
        seed: bootstrap seed.
        resamples: bootstrap samples.
        tie: ``|difference| <= tie`` is a tie.

    Raises:
        LasegsegError: the store, artifacts or metric column are missing, or ``against`` fits no single cell.
    """
    if resamples < 1:
        raise LasegsegError(f"resamples must be >= 1, got {resamples}")
    groups = baseline_groups(summary) if against == "baseline" else None
    if groups:
        reason = f"for each few-shot size, the baseline (model.backbone={BASELINE_BACKBONE}) trained on it"
    else:
        reference, reason = pick_reference(summary, trials, against)
        groups = [(reference, list(summary["cell"]))]
    with tracking(tracking_uri) as client:
        uris = artifact_uris(client, experiment_id(client, tracking_uri, experiment), parent_run_id)
    uris = {r: uris[r] for r in trials["run_id"] if r in uris}
    tables, missing, one_by_one = fetch_tables(tracking_uri, uris, parent_run_id)
    if missing:
        log.warning(
            "%d of %d finished trial run(s) have no readable %s (first: %s); comparing without them",
            len(missing), len(uris), PER_PATIENT_FILE, next(iter(missing.values())),
        )  # fmt: skip
    if not tables:
        raise LasegsegError(f"none of the {len(uris)} finished trial runs has a readable {PER_PATIENT_FILE}")
    matrix, counts = patient_matrix(trials, tables, metric)
    if counts["without_metric"]:
        log.warning("%d trial run(s) did not record %s; comparing without them", counts["without_metric"], metric)
    for reference, _ in groups:
        if reference not in matrix.columns:
            raise LasegsegError(f"the reference cell {reference} has no per-patient {metric} on the test split")
    table = compare_groups(matrix, summary, groups, metric=metric, resamples=resamples, seed=seed, tie=tie)
    table.attrs["skipped"] = {"missing_file": len(missing), **counts}
    notes = comparison_notes(table, reason, resamples=resamples, seed=seed, tie=tie)
    return Comparison(table, notes, tables, one_by_one)


def compare(
    tracking_uri: str,
    experiment: str,
    out_dir: str | Path,
    parent_run_id: str | None = None,
    *,
    metric: str = "dice",
    against: str = "best",
    seed: int = 0,
    resamples: int = stats.DEFAULT_RESAMPLES,
    tie: float = stats.DEFAULT_TIE,
    log_to_parent: bool = True,
    trials: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Compare every cell of a sweep with a reference cell, paired over patients; write and log the results.

    Args:
        tracking_uri: the MLflow URI.
        experiment: the sweep's experiment.
        out_dir: where ``comparison.parquet``/``comparison.md`` go (``comparison_<metric>.*`` for other metrics).
        parent_run_id: only this sweep run's trials (``latest``: the most recent sweep run's); default: all trials
            of the experiment.
        metric: a metric of :mod:`lasegseg.metric_table` (``dice``, ``iou``, ``nsd``, ``hd95`` …).
        against: the reference (:func:`pick_reference`).
        seed: bootstrap seed.
        resamples: bootstrap samples.
        tie: ``|difference| <= tie`` is a tie.
        log_to_parent: log both files under ``summary/`` of the parent run (the given one, else the most recent
            sweep run of the experiment).
        trials: :func:`lasegseg.results.aggregate.load_trials` of this experiment and parent run, when the caller
            already has them (the sweep's own aggregation).

    Returns:
        ``(comparison, notes)``: :func:`compare_cells` and :func:`comparison_notes`.

    Raises:
        LasegsegError: the store, experiment, trials, artifacts or metric column are missing, or ``against`` fits
            no single cell.
    """
    if parent_run_id == "latest":
        with tracking(tracking_uri) as client:
            parent_run_id = latest_sweep_run(client, experiment_id(client, tracking_uri, experiment))
        if parent_run_id is None:
            raise LasegsegError(f"experiment '{experiment}' has no sweep parent run")
    if trials is None:
        trials = load_trials(tracking_uri, experiment, parent_run_id)
    result = compare_trials(
        tracking_uri, experiment, trials, summarize(trials), parent_run_id, metric=metric, against=against,
        seed=seed, resamples=resamples, tie=tie,
    )  # fmt: skip
    paths = write_comparison(result.table, result.notes, out_dir)
    if result.one_by_one and parent_run_id is not None:  # the next reader fetches one table, not one per run
        paths["per_patient"] = write_table(result.tables, out_dir)
    if log_to_parent:
        log_to_sweep_run(tracking_uri, experiment, parent_run_id, paths.values(), "summary", "the comparison")
    return result.table, result.notes
