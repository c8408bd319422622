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
