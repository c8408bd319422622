"""Command-line pieces shared by ``lasegseg`` and ``sweeps/fewshot.py`` (argparse only: cheap to import)."""

from __future__ import annotations

import argparse


def add_set(p: argparse.ArgumentParser, help: str = "any config key, repeatable") -> None:
    """``--set KEY=VALUE`` (repeatable): config overrides, parsed by :func:`lasegseg.config.parse_overrides`."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_pseudonymize(p: argparse.ArgumentParser, help: str) -> None:
    """``--pseudonymize``: salted-hash aliases instead of patient ids in what is logged or written."""
    p.add_argument("--pseudonymize", action="store_true", help=help)


def add_tracking(p: argparse.ArgumentParser, help: str = "default: $MLFLOW_TRACKING_URI") -> None:
    """``--tracking-uri``: the MLflow store."""
    p.add_argument("--tracking-uri", default=None, help=help)


def add_experiment(p: argparse.ArgumentParser, *, required: bool = True, help: str | None = None) -> None:
    """``--experiment``: the MLflow experiment (a sweep's name)."""
    p.add_argument("--experiment", required=required, help=help or "MLflow experiment (the sweep's name)")
