"""The study's Tune run without running Tune: what each trial asks the cluster for, names, failed cells."""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune.trainable.function_trainable import wrap_function

from lasegseg.config import Config
from lasegseg.sweep.context import TrialContext
from lasegseg.sweep.spec import parse_spec
from lasegseg.sweep.study_table import ROW, StudyTable
from lasegseg.sweep.tune_runner import _failed_cells, _result_name, _trainable, _trial_name
from tests.sweep.conftest import sweep_spec


def test_tune_asks_each_trial_for_its_own_resources():
    def resolved(spec):
        # What Tune asks the cluster for when it schedules each trial.
        table = StudyTable.of(spec)
        cls = wrap_function(_trainable(TrialContext("", "", "", table=table), spec.resources))
        return {
            table.rows[r]["model.mode"]: cls.default_resource_request({ROW: r}).required_resources
            for r in table.grid_rows
        }

    packed = parse_spec(sweep_spec(resources={"gpus_per_trial": 1, "frozen_gpus_per_trial": 0.5}))
    assert resolved(packed) == {"frozen": {"CPU": 1.0, "GPU": 0.5}, "finetune": {"CPU": 1.0, "GPU": 1.0}}
    cpu_only = parse_spec(sweep_spec(resources={"frozen_gpus_per_trial": 0.5}))
    assert resolved(cpu_only) == {"frozen": {"CPU": 1.0}, "finetune": {"CPU": 1.0}}


def test_trials_are_named_by_their_row_and_results_by_their_config():
    flat = Config().replace(**{"model.mode": "frozen", "data.patients": 2}).to_flat()
    table = StudyTable((flat,), 0, (-1,))
    assert _trial_name(SimpleNamespace(trial_id="ab_00001", config={ROW: 0, "optim.lr": 0.02})) == "row0·ab_00001"
    result = SimpleNamespace(config={ROW: 0, "optim.lr": 0.02}, path="/x")
    assert _result_name(result, table) == "multiscale·frozen·p2·lr0.02·s0"  # the rate the screen chose
    assert _result_name(SimpleNamespace(config=None, path="/x/trial_1"), table) == "/x/trial_1"


def test_a_cell_is_failed_when_none_of_its_screening_trials_ended_without_error():
    table = StudyTable.of(parse_spec(sweep_spec(screen={"low": 1e-4, "high": 1e-2, "trials": 2})))

    def result(row, error=None):
        return SimpleNamespace(config={ROW: row, "optim.lr": 1e-3}, error=error)

    grid = [result(0, "boom"), result(0, "boom"), result(1, "boom"), result(1), result(table.cells)]
    assert _failed_cells(grid, table) == [0]
