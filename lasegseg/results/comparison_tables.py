"""The paired comparison as text for people: the table, the notes that make it honest, terminal and Markdown."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from lasegseg import stats
from lasegseg.results.per_patient import PER_PATIENT_FILE
from lasegseg.results.trials import cell_keys


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
