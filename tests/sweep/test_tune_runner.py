"""The Tune stages without running Tune: what each trial asks the cluster for, names, and a resumed screening."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from ray.tune.trainable.function_trainable import wrap_function

from lasegseg.config import Config
from lasegseg.sweep.context import TrialContext
from lasegseg.sweep.spec import cell_key, parse_spec
from lasegseg.sweep.state import save_screening
from lasegseg.sweep.tune_runner import _result_name, _trainable, _trial_name, screen_learning_rates
from tests.sweep.conftest import sweep_spec


def test_tune_asks_each_trial_for_its_own_resources():
    def resolved(spec):
        # What Tune asks the cluster for when it schedules each trial.
        cls = wrap_function(_trainable(TrialContext("", "", ""), spec.resources))
        return {t["model.mode"]: cls.default_resource_request({"trial": t}).required_resources for t in spec.trials()}

    packed = parse_spec(sweep_spec(resources={"gpus_per_trial": 1, "frozen_gpus_per_trial": 0.5}))
    assert resolved(packed) == {"frozen": {"CPU": 1.0, "GPU": 0.5}, "finetune": {"CPU": 1.0, "GPU": 1.0}}
    cpu_only = parse_spec(sweep_spec(resources={"frozen_gpus_per_trial": 0.5}))
    assert resolved(cpu_only) == {"frozen": {"CPU": 1.0}, "finetune": {"CPU": 1.0}}


def test_trials_are_named_by_their_config_and_tune_id():
    flat = Config().replace(**{"model.mode": "frozen", "data.patients": 2}).to_flat()
    trial = SimpleNamespace(trial_id="ab_00001", config={"trial": flat, "optim.lr": 0.02})
    assert _trial_name(trial) == "multiscale·frozen·p2·lr0.02·s0·ab_00001"  # the rate Optuna sampled
    assert _result_name(SimpleNamespace(config={"trial": flat}, path="/x")) == "multiscale·frozen·p2·lr0.0003·s0"
    assert _result_name(SimpleNamespace(config=None, path="/x/trial_1")) == "/x/trial_1"


def test_a_resumed_screening_reuses_the_rates_it_recorded(tmp_path):
    """Every cell screened before the driver died: no search runs again (none could, without Ray)."""
    spec = parse_spec(sweep_spec(screen={"trials": 4, "low": 1e-5, "high": 1e-2}))
    cells = spec.screening_cells()
    chosen = {json.dumps(cell_key(c)): 1e-3 * (i + 1) for i, c in enumerate(cells)}
    save_screening(tmp_path, chosen)
    ctx = TrialContext("sqlite:///unused.db", "0", "parent")
    rates = screen_learning_rates(spec, ctx, root=None, sweep_dir=tmp_path, resume=True)
    assert rates == {cell_key(c): pytest.approx(1e-3 * (i + 1)) for i, c in enumerate(cells)} and len(rates) == 4
    assert spec.trials(lr_by_cell=rates)[0]["optim.lr"] in rates.values()
