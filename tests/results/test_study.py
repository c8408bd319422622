"""A study gathered from MLflow alone: trials, summary, paired comparison, per-patient values, the best cell."""

from __future__ import annotations

from lasegseg.results.study import dot_metrics, gather
from tests.results.conftest import EXPERIMENT, N_PATIENTS, PATIENT_CELLS, PATIENTS_EXPERIMENT


def test_gather_reads_every_part_and_names_what_is_missing(patients_store):
    study = gather(patients_store["uri"], PATIENTS_EXPERIMENT, patients_store["parent"])
    linear = next(c for c, t in patients_store["truth"].items() if t["decoder"] == "linear")
    assert len(study.summary) == len(PATIENT_CELLS) and study.summary["cell"].iloc[0] == linear
    assert study.comparison is not None and study.comparison["reference"].eq(linear).all()
    assert "never on test" in study.comparison_text
    # Dots only for the metrics the trials recorded per patient: Dice here, not NSD.
    assert set(study.per_patient.columns) == {"case_id", "cell", "dice"} and dot_metrics() == ["dice", "nsd"]
    assert len(study.per_patient) == N_PATIENTS * len(PATIENT_CELLS)
    assert study.selection is not None and study.best["cell"]["cell"] == linear
    assert study.best["run_id"] in set(study.trials["run_id"]) and "overlay" not in study.best
    assert any(note.startswith("overlays of the best run left out") for note in study.notes)


def test_a_study_without_per_patient_files_still_gathers(store):
    study = gather(store["uri"], EXPERIMENT, store["parent"])
    assert study.comparison is None and study.per_patient is None
    assert any(note.startswith("paired comparison left out") for note in study.notes)
    assert len(study.summary) > 1 and study.best["run_id"] in set(study.trials["run_id"])
