"""Few-shot / hyperparameter sweep entry point.

    python sweeps/fewshot.py                                  # demo: phantom, tiny backbone, local Ray + MLflow
    python sweeps/fewshot.py --config sweeps/configs/paper.yaml --data /data/MSD/Task02_Heart
    ray job submit --working-dir . -- python sweeps/fewshot.py --config sweeps/configs/demo.yaml

See ``python sweeps/fewshot.py --help`` for every flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the project may not be installed on the head node; the working dir is.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lasegseg import process  # noqa: E402
from lasegseg.sweep.flags import build_parser  # noqa: E402

if __name__ == "__main__":
    process.end_quickly()  # first: its exit handler runs after Ray's, MLflow's and torch's own
    args = build_parser().parse_args()  # --help and a bad flag answer before the driver's imports
    from lasegseg.sweep.runner import run_cli

    process.exit_with(run_cli(args, "fewshot.py"))
