"""The command-line flags shared by ``lasegseg`` and ``sweeps/fewshot.py``."""

from __future__ import annotations

import argparse

import pytest

from lasegseg import options


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    options.add_set(p)
    options.add_pseudonymize(p, help="aliases")
    options.add_tracking(p)
    options.add_experiment(p)
    return p


def test_defaults_and_repeated_overrides():
    args = _parser().parse_args(["--experiment", "e", "--set", "optim.lr=1e-3", "--set", "seed=2"])
    assert args.set == ["optim.lr=1e-3", "seed=2"]
    assert args.tracking_uri is None and args.pseudonymize is False and args.experiment == "e"


def test_the_experiment_is_required_unless_said_otherwise(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args([])
    assert "--experiment" in capsys.readouterr().err
    p = argparse.ArgumentParser()
    options.add_experiment(p, required=False, help="default: the sweep's name")
    assert p.parse_args([]).experiment is None
