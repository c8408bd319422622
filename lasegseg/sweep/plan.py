"""What a sweep will run, worked out and checked before anything starts: the sweep file with the command line's
flags, its storage root, its data and the flat configs of its trials (Tune's param space)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lasegseg.config import from_flat, parse_overrides, run_name
from lasegseg.data.splits import split_patients
from lasegseg.errors import ConfigError, DataError
from lasegseg.paths import DEFAULT_STORAGE, STORAGE_ENV, cache_root, stable_storage_root
from lasegseg.sweep.cluster import in_job_working_dir
from lasegseg.sweep.estimate import PlanOptions, plan_options
from lasegseg.sweep.plan_report import print_plan
from lasegseg.sweep.spec import Resources, SweepSpec, gpu_share, load_spec
from lasegseg.sweep.storage import Storage, parse_storage

RESOURCE_FLAGS = ("cpus_per_trial", "gpus_per_trial", "max_concurrent", "max_failures")
PHANTOM_CASES = 12
LIST_ALL = 50  # --dry-run lists every trial up to this many, else the first LIST_HEAD
LIST_HEAD = 20


@dataclass
class SweepPlan:
    """What a sweep will run, checked before anything starts.

    Args:
        spec: the parsed sweep file, with the command line's resource flags applied.
        name: the sweep's (and MLflow experiment's) name.
        root: where the sweep's results live (``<storage>/<name>``): a local folder, ``s3://`` or ``gs://``.
        sweep_dir: the sweep's local folder: ``root`` itself when local, else a local working copy.
        trials: every trial's flat config.
        overrides: the ``--set`` values.
        options: the ``--plan-*`` flags of the study's plan that ``--dry-run`` prints.
    """

    spec: SweepSpec
    name: str
    root: Storage
    sweep_dir: Path
    trials: list[dict[str, Any]]
    overrides: dict[str, Any]
    options: PlanOptions = field(default_factory=PlanOptions)


def plan_sweep(args: argparse.Namespace) -> SweepPlan:
    """Parse the sweep file and flags, find the data and expand the trials; nothing is started."""
    overrides = parse_overrides(args.set)
    options = plan_options(args)
    args.config = str(Path(args.config).resolve())  # Ray may change the working folder once it is joined
    spec = load_spec(args.config, overrides=overrides)
    apply_resource_flags(args, spec.resources)
    name = args.experiment or spec.name
    root = storage_root(args.storage_path).join(name)
    sweep_dir = Path(root.path) if not root.remote else cache_root() / "sweeps" / name
    spec.base["data.path"] = resolve_data(args, spec, sweep_dir)
    return SweepPlan(spec, name, root, sweep_dir, spec.trials(), overrides, options)


def storage_root(flag: str | None) -> Storage:
    """``--storage-path``, else ``$LASEGSEG_STORAGE``, else ``./runs``; under ``ray job submit`` a relative folder is
    taken under ``~/lasegseg`` instead, since the job runs in a temporary copy of the working dir that Ray deletes."""
    text = flag or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    root = parse_storage(text)
    if not root.remote and in_job_working_dir() and not Path(text).expanduser().is_absolute():
        root = parse_storage(str(stable_storage_root().parent / text))
    return root


def apply_resource_flags(args: argparse.Namespace, res: Resources) -> None:
    """The command line's resource flags over the sweep file's ``resources``; a negative one is refused."""
    for flag in RESOURCE_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            if value < 0:
                raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
            setattr(res, flag, value)
    if args.frozen_gpus_per_trial is not None:
        res.frozen_gpus_per_trial = gpu_share(args.frozen_gpus_per_trial, "--frozen-gpus-per-trial")


def resolve_data(args: argparse.Namespace, spec: SweepSpec, sweep_dir: Path) -> str:
    """The dataset folder: --data, else the YAML's data.path, else a seeded phantom made for the demo."""
    path = args.data or spec.base.get("data.path") or ""
    if path:
        if not Path(path).is_dir():
            raise DataError(f"{path}: dataset folder does not exist")
        return str(Path(path).resolve())
    from lasegseg.data.phantom import write_phantom  # deferred: heavy (scipy): only a sweep without data needs it

    phantom = sweep_dir / "phantom"
    if not (phantom / "dataset.json").is_file():
        print(f"no --data given: writing a {PHANTOM_CASES}-case phantom to {phantom}")
        write_phantom(phantom, cases=PHANTOM_CASES, seed=0, layout="msd")
    return str(phantom)


def print_trials(plan: SweepPlan) -> int:
    """``--dry-run``: the trials, one line each with its GPU share when it asks for one, then the study's plan.

    Past :data:`LIST_ALL` trials only the first :data:`LIST_HEAD` are listed (``--list`` lists them all): a
    thousand lines would push the plan, what a user reads before starting, out of the terminal.
    """
    shown = plan.trials if plan.options.list_all or len(plan.trials) <= LIST_ALL else plan.trials[:LIST_HEAD]
    for flat in shown:
        gpus = plan.spec.resources.for_trial(flat)["gpu"]
        print("  " + run_name(from_flat(flat)) + (f"  [{gpus:g} GPU]" if gpus else ""))
    if len(shown) < len(plan.trials):
        print(f"  … and {len(plan.trials) - len(shown)} more (--list lists every trial)")
    print_plan(plan.spec, plan.trials, plan.options)
    return 0


def check_pool(trials: list[dict[str, Any]], cases: list[str]) -> None:
    """Refuse few-shot sizes larger than the training pool of ``cases`` before any trial starts."""
    for flat in trials:
        split = split_patients(cases, flat["data.split_seed"], flat["data.val_fraction"], flat["data.test_fraction"])
        if flat["data.patients"] > len(split.train):
            raise ConfigError(
                f"config key 'data.patients' asks for {flat['data.patients']} patients but the training pool "
                f"has {len(split.train)}"
            )


def screen_note(spec: SweepSpec) -> str:
    """`` after screening N cells`` when the sweep screens learning rates first, else nothing."""
    return f" after screening {len(spec.screening_cells())} cells" if spec.screen else ""
