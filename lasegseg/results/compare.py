"""Paired comparison of a sweep's cells against a reference cell, from MLflow alone (``lasegseg compare``).

Each finished trial run's ``per_patient.csv`` artifact gives per-patient test metrics; seeds are averaged within
(cell, patient), and every other cell is compared with the reference over the patients both have (see
:mod:`lasegseg.stats`). The reference is picked on validation (best mean validation Dice), never on test.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lasegseg import stats
from lasegseg.errors import LasegsegError, first_line
from lasegseg.fsio import atomic_write

log = logging.getLogger(__name__)

PER_PATIENT_FILE = "per_patient.csv"
METRICS = ("dice", "iou", "nsd", "hd95")
"""The per-patient columns the command line offers; any numeric column of ``per_patient.csv`` works."""
LOWER_IS_BETTER = frozenset({"hd95", "hd", "assd", "masd"})
"""Distances: a lower value is better, so a win is a negative difference."""
AGAINST = ("best", "baseline")
BASELINE_BACKBONE = "none"
FEWSHOT_KEYS = ("data.patients", "data.fraction")
"""What a few-shot size is: a sweep's baselines are trained at each one, and each cell is compared with its own."""
_WORKERS = 8
_NON_METRIC_COLUMNS = ("case_id", "split")


# --------------------------------------------------------------------------------------------------- reading


def _artifact_uris(client: Any, experiment_id: str, parent_run_id: str | None) -> dict[str, str]:
    from lasegseg.results.aggregate import search_all, trial_filter

    runs = search_all(client, experiment_id, trial_filter(parent_run_id))
    return {r.info.run_id: r.info.artifact_uri for r in runs if r.info.status == "FINISHED"}


def _read_one(tracking_uri: str, run_id: str, artifact_uri: str, tmp: Path) -> pd.DataFrame:
    import mlflow.artifacts

    # The artifact URI comes with the search's answer: downloading by URI saves one get_run round trip per run.
    uri = f"{artifact_uri.rstrip('/')}/{PER_PATIENT_FILE}"
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp / run_id), tracking_uri=tracking_uri)
    return pd.read_csv(local, dtype={"case_id": str, "split": str})


def download_per_patient(
    tracking_uri: str, artifact_uris: dict[str, str], workers: int = _WORKERS
) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Fetch every run's ``per_patient.csv`` on a small thread pool.

    Args:
        tracking_uri: the MLflow URI (resolves ``mlflow-artifacts:`` URIs).
        artifact_uris: ``{run_id: artifact root URI}``.
        workers: downloads at once.

    Returns:
        ``({run_id: table}, {run_id: why it was skipped})`` for the runs whose file could not be read.
    """
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tables: dict[str, pd.DataFrame] = {}
    missing: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lasegseg-compare-") as tmp:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(artifact_uris)))) as pool:
            futures = {
                run_id: pool.submit(_read_one, tracking_uri, run_id, uri, Path(tmp))
                for run_id, uri in artifact_uris.items()
            }
            for run_id, future in futures.items():
                try:
                    tables[run_id] = future.result()
                except (MlflowException, OSError, ValueError) as exc:  # absent, unreadable or not a CSV
                    missing[run_id] = first_line(exc)
    return tables, missing


def patient_matrix(
    trials: pd.DataFrame, tables: dict[str, pd.DataFrame], metric: str, split: str = "test"
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Patients × cells of ``metric`` on ``split``, each value the mean over the cell's seeds for that patient.

    Non-finite values (an HD95 of an empty prediction) are left out of the mean; a patient with none in a cell is
    NaN there. Runs whose table lacks ``metric`` are skipped (counted in the second return value).

    Args:
        trials: :func:`lasegseg.results.aggregate.load_trials` rows (``run_id``, ``cell``).
        tables: ``{run_id: per_patient table}``.
        metric: a column of the tables.
        split: the rows kept (the tables hold only the test split today).

    Returns:
        ``(matrix, counts)`` with counts ``without_metric`` (runs) and ``non_finite`` (values dropped).

    Raises:
        LasegsegError: no table has the metric column (runs from before it existed), or none has a row of ``split``.
    """
    with_metric = {r: t for r, t in tables.items() if metric in t.columns}
    if not with_metric:
        columns = sorted({c for t in tables.values() for c in t.columns if c not in _NON_METRIC_COLUMNS})
        raise LasegsegError(
            f"{PER_PATIENT_FILE} of the {len(tables)} trial run(s) has no '{metric}' column (runs from before "
            f"{metric} was recorded?); metrics available: {', '.join(columns) or 'none'}"
        )
    cells = trials.set_index("run_id")["cell"]
    frames = []
    for run_id, table in with_metric.items():
        rows = table[table["split"] == split] if "split" in table.columns else table
        frames.append(pd.DataFrame({"cell": cells.get(run_id), "case_id": rows["case_id"], "value": rows[metric]}))
    long = pd.concat(frames, ignore_index=True).dropna(subset=["cell"])
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    finite = np.isfinite(long["value"].to_numpy(float))
    counts = {"without_metric": len(tables) - len(with_metric), "non_finite": int((~finite).sum())}
    long = long[finite]
    if long.empty:
        raise LasegsegError(f"no finite '{metric}' value on the {split} split in {len(with_metric)} trial run(s)")
    matrix = long.groupby(["case_id", "cell"])["value"].mean().unstack("cell")
    return matrix, counts


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
        best = summary.iloc[0]
        if pd.isna(best["val_dice_mean"]):
            raise LasegsegError("no cell has a validation Dice to pick the reference by; pass --against CELL")
        return best["cell"], f"best mean validation Dice ({best['val_dice_mean']:.4f} over {best['n']} seed(s))"
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
        metric: the metric's name (decides the direction: :data:`LOWER_IS_BETTER`).
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
    from lasegseg.results.aggregate import cell_keys

    lower = metric in LOWER_IS_BETTER
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
    out["val_dice_mean"] = info["val_dice_mean"].to_numpy()
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


# --------------------------------------------------------------------------------------------------- tables


def _fmt(value: Any, fmt: str = ".3f") -> str:
    return "–" if pd.isna(value) else format(value, fmt)


def _p(value: Any) -> str:
    if pd.isna(value):
        return "–"
    return "<0.0001" if value < 0.0001 else f"{value:.4f}"


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def display_comparison(comparison: pd.DataFrame) -> pd.DataFrame:
    """Strings for people: the config keys that vary between cells, then the statistics."""
    from lasegseg.results.aggregate import cell_keys

    out = pd.DataFrame(index=comparison.index)
    for key in cell_keys(comparison):
        if comparison[key].nunique(dropna=False) > 1:
            out[_short(key)] = comparison[key].map(lambda v: "–" if pd.isna(v) else str(v))
    metric = comparison["metric"].iloc[0]
    out["cell"] = comparison["cell"].str[:8]
    out["n"] = comparison["n_pairs"].map(lambda v: "ref" if pd.isna(v) else str(v))
    out[f"mean {metric}"] = comparison["mean"].map(_fmt)
    ci = [
        "reference" if pd.isna(n) else "no paired patients" if n == 0 else f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        for n, d, lo, hi in zip(
            comparison["n_pairs"], comparison["median_diff"], comparison["ci_low"], comparison["ci_high"], strict=True
        )
    ]
    out["Δ median [95% CI]"] = ci
    small = comparison["small_sample"].fillna(False).astype(bool)
    out["p"] = [_p(p) + ("†" if s and not pd.isna(p) else "") for p, s in zip(comparison["p"], small, strict=True)]
    out["p Holm"] = comparison["p_holm"].map(_p)
    out["W/T/L"] = [
        "–" if pd.isna(w) else f"{w}/{t}/{lo}"
        for w, t, lo in zip(comparison["wins"], comparison["ties"], comparison["losses"], strict=True)
    ]
    out["P(first)"] = comparison["p_first"].map(lambda v: _fmt(v, ".2f"))
    return out


def comparison_notes(comparison: pd.DataFrame, reason: str = "", *, resamples: int, seed: int, tie: float) -> list[str]:
    """The sentences that make the table honest: reference, direction, tests, small samples, rank stability.

    Args:
        comparison: :func:`compare_cells`.
        reason: why the reference was chosen (:func:`pick_reference`).
        resamples: bootstrap samples used.
        seed: bootstrap seed used.
        tie: the tie tolerance used.
    """
    metric, ref = comparison["metric"].iloc[0], comparison["reference"].iloc[0]
    lower = bool(comparison["lower_is_better"].iloc[0])
    if comparison["reference"].nunique() > 1:
        notes = [
            f"Reference: {reason} ({comparison['reference'].nunique()} cells, each listed first in its group as "
            "'ref'). A cell is compared only with the baseline of its own few-shot size."
        ]
    else:
        notes = [
            f"Reference: cell {ref}, {reason or 'as chosen'}. The reference is picked on validation (or named), "
            "never on test; its test values are what the other cells are compared with."
        ]
    better = "lower is better, so Δ < 0 favours the cell" if lower else "higher is better, so Δ > 0 favours the cell"
    notes.append(
        f"Δ = cell − reference in per-patient test {metric} (seeds averaged within each patient), paired over the "
        f"patients both cells have (n); {better}. W/T/L: patients where the cell is better / within ±{tie:g} / "
        "worse."
    )
    tested = int(comparison["p"].notna().sum())
    notes.append(
        f"95% CI: percentile bootstrap of the median Δ over patients ({resamples} resamples, seed {seed}). "
        f"p: two-sided Wilcoxon signed-rank (SciPy, zero_method='{stats.WILCOXON_ZERO_METHOD}': differences within "
        f"±{tie:g} are ties and left out; all ties → p = 1). p Holm: Holm step-down across the {tested} "
        "comparison(s) made — read significance from this column."
    )
    small = comparison["small_sample"].fillna(False).astype(bool)
    if small.any():
        notes.append(
            f"† {int(small.sum())} comparison(s) have fewer than {stats.MIN_PAIRS_FOR_SIGNIFICANCE} paired patients "
            "with a non-zero difference: no test can reach p < 0.05 there (the smallest exact two-sided Wilcoxon p "
            f"with 5 pairs is {stats.wilcoxon_min_p(5):.4f}); a large p says nothing about equivalence."
        )
    rs = comparison.attrs.get("rank_stability")
    if rs is not None and not math.isnan(rs.tau_mean):
        notes.append(
            f"Rank stability ({rs.resamples} patient resamples over the {rs.n_patients} patients every cell has, "
            f"cells ranked by mean {metric}): Kendall τ to the observed ranking {rs.tau_mean:.2f} "
            f"[2.5–97.5%: {rs.tau_low:.2f}, {rs.tau_high:.2f}]; P(first) = share of resamples a cell ranks first."
        )
    elif rs is not None:
        notes.append("Rank stability: not computed (fewer than two cells, or no patient that every cell has).")
    elif comparison.attrs.get("grouped"):
        notes.append("P(first): share of patient resamples in which a cell ranks first among the cells of its own "
                     "few-shot size.")  # fmt: skip
    skipped = comparison.attrs.get("skipped") or {}
    if skipped.get("missing_file"):
        notes.append(f"{skipped['missing_file']} finished trial run(s) had no readable {PER_PATIENT_FILE}; left out.")
    if skipped.get("without_metric"):
        notes.append(f"{skipped['without_metric']} trial run(s) did not record {metric}; left out.")
    if skipped.get("non_finite"):
        notes.append(
            f"{skipped['non_finite']} non-finite per-patient {metric} value(s) (e.g. an empty prediction) left out "
            "of the seed means."
        )
    return notes


def format_markdown(comparison: pd.DataFrame, notes: list[str]) -> str:
    """A Markdown table of the comparison followed by its notes."""
    table = display_comparison(comparison)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def format_table(comparison: pd.DataFrame, notes: list[str] | None = None) -> str:
    """An aligned plain-text table for the terminal, then the notes (one per line)."""
    table = display_comparison(comparison)
    widths = [max(len(c), *(len(v) for v in table[c])) for c in table.columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(table.columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        for row in table.itertuples(index=False)
    ]
    return "\n".join(lines + [f"  {n}" for n in notes or []])


# --------------------------------------------------------------------------------------------------- writing


def output_names(metric: str) -> tuple[str, str]:
    """``comparison.parquet``/``.md`` for Dice; ``comparison_<metric>.*`` for others, so they never overwrite."""
    stem = "comparison" if metric == "dice" else f"comparison_{metric}"
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
    """

    table: pd.DataFrame
    notes: list[str]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

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
        metric: a per-patient column (``dice``, ``iou``, ``nsd``, ``hd95``).
        against: the reference (:func:`pick_reference`).
        seed: bootstrap seed.
        resamples: bootstrap samples.
        tie: ``|difference| <= tie`` is a tie.

    Raises:
        LasegsegError: the store, artifacts or metric column are missing, or ``against`` fits no single cell.
    """
    from lasegseg.results.aggregate import experiment_id, tracking

    if resamples < 1:
        raise LasegsegError(f"resamples must be >= 1, got {resamples}")
    groups = baseline_groups(summary) if against == "baseline" else None
    if groups:
        reason = f"for each few-shot size, the baseline (model.backbone={BASELINE_BACKBONE}) trained on it"
    else:
        reference, reason = pick_reference(summary, trials, against)
        groups = [(reference, list(summary["cell"]))]
    with tracking(tracking_uri) as client:
        uris = _artifact_uris(client, experiment_id(client, tracking_uri, experiment), parent_run_id)
    uris = {r: uris[r] for r in trials["run_id"] if r in uris}
    tables, missing = download_per_patient(tracking_uri, uris)
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
    return Comparison(table, notes, tables)


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
        metric: a per-patient column (``dice``, ``iou``, ``nsd``, ``hd95``).
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
    from lasegseg.results.aggregate import (
        experiment_id,
        latest_sweep_run,
        load_trials,
        log_to_sweep_run,
        summarize,
        tracking,
    )

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
    if log_to_parent:
        log_to_sweep_run(tracking_uri, experiment, parent_run_id, paths.values(), "summary", "the comparison")
    return result.table, result.notes
