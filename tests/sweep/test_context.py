"""The trial context: one frozen value per sweep that travels to every Ray worker by pickle."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from ray import cloudpickle

from lasegseg.sweep.context import TrialContext
from lasegseg.sweep.study_table import StudyTable

SLOT = "tiny|False|auto|28"
SALT = "a-salt-of-16-bytes-at-least"


def _ctx(**extra) -> TrialContext:
    return TrialContext(
        "sqlite:////s/mlflow.db", "3", "parent", threads=2, cache_paths={"{size: 28}": "/c/slices"},
        feature_paths={"node-a": {SLOT: "/c/features"}}, feature_readers={SLOT: ("linear",)},
        feature_index="/s/.feature_index", **extra,
    )  # fmt: skip


@pytest.mark.parametrize("dumps,loads", [(pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)])
def test_it_pickles_by_value_as_ray_ships_it(dumps, loads):
    ctx = _ctx(pseudonym_salt=SALT, case_ids=("la_003", "la_004"))
    clone = loads(dumps(ctx))
    assert clone == ctx and clone is not ctx and type(clone) is TrialContext


def test_it_is_frozen_and_carries_the_studys_table():
    table = StudyTable(({"seed": 0, "optim.lr": 1e-3},), 0, (-1,))
    ctx = _ctx(table=table)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.threads = 4
    clone = cloudpickle.loads(cloudpickle.dumps(ctx))
    assert clone.table == table and clone.table.flat({"i": 0, "optim.lr": 0.01}) == {"seed": 0, "optim.lr": 0.01}


def test_lookups_of_a_nodes_features():
    ctx = _ctx()
    assert ctx.feature_path("node-a", SLOT) == "/c/features"
    assert ctx.feature_path("node-b", SLOT) is None and ctx.feature_path("node-a", "other") is None


def test_a_pseudonymised_sweep_hands_its_trials_the_aliases():
    assert _ctx().alias() is None
    alias = _ctx(pseudonym_salt=SALT, case_ids=("la_003",)).alias()
    name = alias("la_003")
    assert name != "la_003" and alias.scrub("failed on /data/la_003.nii.gz") == f"failed on /data/{name}.nii.gz"
