"""The sweep's flags: what both command lines accept, and a module light enough for ``lasegseg --help``."""

from __future__ import annotations

import subprocess
import sys

from lasegseg.sweep import flags
from lasegseg.sweep.flags import DEFAULT_CONFIG, build_parser


def test_defaults_and_flags():
    args = build_parser().parse_args([])
    assert args.config == str(DEFAULT_CONFIG) and DEFAULT_CONFIG.is_file()
    assert (args.data, args.storage_path, args.resume, args.dry_run, args.set) == (None, None, False, False, [])
    args = build_parser().parse_args(
        ["--gpus-per-trial", "0.25", "--frozen-gpus-per-trial", "0.5", "--max-concurrent", "4", "--set", "seed=2",
         "--resume", "--pseudonymize"]
    )  # fmt: skip
    assert (args.gpus_per_trial, args.frozen_gpus_per_trial, args.max_concurrent) == (0.25, 0.5, 4)
    assert args.set == ["seed=2"] and args.resume and args.pseudonymize


def test_the_flags_import_nothing_of_the_driver():
    prefixes = ("lasegseg.sweep.", "torch", "ray", "mlflow", "pyarrow")
    code = f"import sys, lasegseg.sweep.flags; print(sorted(m for m in sys.modules if m.startswith({prefixes})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['lasegseg.sweep.flags']"


def test_stand_in_backbones_sets_the_switch_the_models_read(monkeypatch):
    from lasegseg.models.sources import STAND_IN_ENV, stand_ins_enabled

    monkeypatch.delenv(STAND_IN_ENV, raising=False)
    assert flags.STAND_IN_ENV == STAND_IN_ENV
    assert not build_parser().parse_args([]).stand_in_backbones and not stand_ins_enabled()
    assert build_parser().parse_args(["--stand-in-backbones"]).stand_in_backbones
    assert stand_ins_enabled()
