"""Per-patient tables → the patients × cells matrix of one metric (seeds averaged within each patient)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lasegseg.errors import LasegsegError
from lasegseg.results.per_patient import patient_matrix


def test_patient_matrix_averages_seeds_on_the_test_split():
    trials = pd.DataFrame({"run_id": ["r0", "r1", "r2"], "cell": ["a", "a", "b"]})
    tables = {
        "r0": pd.DataFrame({"case_id": ["x", "y", "v"], "split": ["test", "test", "val"], "hd95": [1.0, np.inf, 0.0]}),
        "r1": pd.DataFrame({"case_id": ["x", "y"], "split": ["test", "test"], "hd95": [3.0, 4.0]}),
        "r2": pd.DataFrame({"case_id": ["x"], "split": ["test"], "dice": [0.5]}),  # from before hd95 was recorded
    }
    matrix, counts = patient_matrix(trials, tables, "hd95")
    assert matrix.to_dict() == {"a": {"x": 2.0, "y": 4.0}}
    assert counts == {"without_metric": 1, "non_finite": 1}


def test_a_metric_no_run_recorded_is_one_clear_error():
    trials = pd.DataFrame({"run_id": ["r0"], "cell": ["a"]})
    tables = {"r0": pd.DataFrame({"case_id": ["x"], "split": ["test"], "dice": [0.5], "hd95": [2.0]})}
    with pytest.raises(LasegsegError, match=r"no 'nsd' column.*metrics available: dice, hd95"):
        patient_matrix(trials, tables, "nsd")


def test_a_sweeps_rows_are_read_once_then_from_one_table_on_its_parent_run(tmp_path):
    """First read: one download per run; the table written to the parent run; next read: that one artifact, plus
    the runs it does not hold (finished later), read on their own."""
    from mlflow import MlflowClient

    from lasegseg.config import Config
    from lasegseg.results.per_patient import PER_PATIENT_TABLE, artifact_uris, fetch_tables, write_table
    from tests.results.conftest import _log_patient_trial

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("pp", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="sweep", tags={"lasegseg.role": "sweep"}).info.run_id

    def trial(seed: int) -> pd.DataFrame:
        rows = pd.DataFrame({"case_id": ["la_003", "la_010"], "split": "test", "dice": [0.5 + seed / 10, 0.7]})
        _log_patient_trial(client, exp, parent, Config().replace(seed=seed), {"val_dice": 0.5}, rows, tmp_path)
        return rows

    expected = [trial(0), trial(1)]
    uris = artifact_uris(client, exp, parent)
    tables, missing, one_by_one = fetch_tables(uri, uris, parent)
    assert (missing, one_by_one) == ({}, 2)
    client.log_artifact(parent, str(write_table(tables, tmp_path / "out")), artifact_path="summary")
    expected.append(trial(2))
    uris = artifact_uris(client, exp, parent)
    again, missing, one_by_one = fetch_tables(uri, uris, parent)
    assert (missing, one_by_one) == ({}, 1) and set(again) == set(uris)
    for run_id, table in tables.items():
        pd.testing.assert_frame_equal(again[run_id], table)
    assert sorted(t["dice"].iloc[0] for t in again.values()) == [0.5, 0.6, 0.7]
    assert {a.path for a in client.list_artifacts(parent, "summary")} == {f"summary/{PER_PATIENT_TABLE}"}
