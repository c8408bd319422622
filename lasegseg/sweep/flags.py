"""The sweep's command-line flags, shared by ``sweeps/fewshot.py`` and ``lasegseg sweep``.

Light on purpose: ``lasegseg --help`` builds every subcommand's parser, so this module imports argparse and
:mod:`lasegseg.options` only; the driver (:mod:`lasegseg.sweep.runner`) is imported once a sweep runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lasegseg import options

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "sweeps" / "configs" / "demo.yaml"
# The stand-in switch, read by lasegseg.models.sources (the model stage, which cannot import the sweep's names).
STAND_IN_ENV = "LASEGSEG_STAND_IN_BACKBONES"


class _StandIns(argparse.Action):
    """``--stand-in-backbones``: sets ``$LASEGSEG_STAND_IN_BACKBONES=1`` in this process as it is parsed, so that the
    driver's own backbone loads see it; the driver hands it on to Ray's workers."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        os.environ[STAND_IN_ENV] = "1"
        setattr(namespace, self.dest, True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's flags, shared by ``sweeps/fewshot.py`` and ``lasegseg sweep``."""
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="sweep YAML (default: sweeps/configs/demo.yaml)")
    p.add_argument("--data", default=None, help="dataset folder (default: data.path of the YAML, else a phantom)")
    options.add_tracking(p, help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite in the sweep folder)")
    options.add_experiment(p, required=False, help="MLflow experiment name (default: the sweep's name)")
    p.add_argument("--storage-path", default=None, help="sweep output root, local path or URI (default: ./runs)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep: only unfinished trials run")
    options.add_set(p, help="override a config key, repeatable")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as the cluster fits)")
    p.add_argument("--cpus-per-trial", type=float, default=None)
    p.add_argument("--gpus-per-trial", type=float, default=None, help="fractions allowed, e.g. 0.25")
    p.add_argument(
        "--frozen-gpus-per-trial", type=float, default=None, metavar="SHARE",
        help="GPU share of a frozen-backbone trial in (0, 1], e.g. 0.25 packs 4 on one GPU (default: --gpus-per-trial)",
    )  # fmt: skip
    p.add_argument("--max-failures", type=int, default=None, help="retries of a failing trial from its checkpoint")
    p.add_argument("--dry-run", action="store_true", help="check the sweep and list its trials, run nothing")
    p.add_argument(
        "--stand-in-backbones", action=_StandIns,
        help="rehearse the study: every named backbone (dinov2-giant, dinov3-large, ...) becomes a tiny random model "
        "of its own family, as deep as the real one, with weights of its own (sets $LASEGSEG_STAND_IN_BACKBONES=1)",
    )  # fmt: skip
    options.add_pseudonymize(
        p, help="log salted-hash aliases instead of patient ids taken from file names (key kept in the sweep folder)"
    )
    plan = p.add_argument_group("the study's plan (printed by --dry-run)")
    plan.add_argument("--list", action="store_true", help="list every trial (default: the first 20 of more than 50)")
    plan.add_argument("--plan-gpus", type=int, default=None, metavar="N", help="GPU-hours and wall time on N GPUs")
    plan.add_argument("--plan-card", default=None, metavar="CARD", help="GPU model: h100 (default), h200, a100, …")
    plan.add_argument("--plan-mfu", type=float, default=None, metavar="F",
                      help="model FLOP utilisation of rows priced from FLOPs (default 0.35)")  # fmt: skip
    plan.add_argument("--plan-cases", type=int, default=None, metavar="N", help="cases in the dataset (default 130)")
    plan.add_argument("--plan-slices", type=int, default=None, metavar="N", help="slices per case (default 88)")


def build_parser(prog: str = "fewshot.py") -> argparse.ArgumentParser:
    """The parser of ``sweeps/fewshot.py``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run a few-shot / hyperparameter sweep of DINOv2 LA segmenters on Ray Tune, tracked in MLflow.",
    )
    add_arguments(p)
    return p
