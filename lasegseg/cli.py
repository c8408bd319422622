"""``lasegseg`` command line.

Each command imports what it needs inside its function (``# deferred: start-up``): ``lasegseg --help`` and every
command's argument parsing load only argparse and the light modules here, never torch, MONAI, Ray or MLflow.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path

from lasegseg import metric_table, options, process
from lasegseg.errors import DataError, LasegsegError
from lasegseg.paths import tracking_uri
from lasegseg.sweep.flags import add_arguments as add_sweep_arguments

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def cmd_phantom(args: argparse.Namespace) -> int:
    from lasegseg.data.phantom import write_phantom  # deferred: start-up

    paths = write_phantom(Path(args.out), cases=args.cases, seed=args.seed, layout=args.layout)
    print(f"wrote {args.cases} phantom cases ({args.layout} layout) to {args.out} [{len(paths)} files]")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from lasegseg.data.validate import validate_dataset  # deferred: start-up

    cases, problems = validate_dataset(Path(args.data), layout=args.layout)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{len(problems)} problem(s) in {args.data}", file=sys.stderr)
        return 1
    print(f"{args.data}: {len(cases)} cases OK")
    return 0


def _train_config(args: argparse.Namespace):
    from lasegseg.config import from_flat, parse_overrides  # deferred: start-up

    flat = {
        "data.path": str(Path(args.data).resolve()),
        "data.layout": args.layout,
        "model.backbone": args.backbone,
        "model.decoder": args.decoder,
        "model.mode": args.mode,
        "data.image_size": args.image_size,
        "train.epochs": args.epochs,
        "optim.lr": args.lr,
        "train.batch_size": args.batch_size,
        "seed": args.seed,
        "data.patients": args.patients,
        "data.fraction": args.fraction,
    }
    flat = {k: v for k, v in flat.items() if v is not None}
    flat.update(parse_overrides(args.set))
    return from_flat(flat)


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    cfg = _train_config(args)
    if not Path(cfg.data.path).is_dir():
        raise LasegsegError(f"{args.data}: dataset folder does not exist")
    # deferred: start-up (torch)
    from lasegseg.models.segmenter import check_model_config
    from lasegseg.train.trial import run_trial
    from lasegseg.train.trial_data import prepare_data

    check_model_config(cfg.model)  # names and combinations, before any data is read
    data = prepare_data(cfg)
    alias = None
    if args.pseudonymize:
        from lasegseg.data.pseudonym import KEY_FILE, Pseudonymizer, load_or_create_salt  # deferred: start-up

        alias = Pseudonymizer(load_or_create_salt(out))
        alias.write_key(out / KEY_FILE, data.cache.cases)
    results = run_trial(cfg, out, data=data, device=args.device, progress=not args.quiet, alias=alias)
    print(
        f"{results['run_name']}: val Dice {results['val_dice']:.4f} (epoch {results['best_epoch'] + 1}); "
        f"test Dice {results['test_dice_mean']:.4f} ± {results['test_dice_std']:.4f}, "
        f"IoU {results['test_iou_mean']:.4f} ± {results['test_iou_std']:.4f}, "
        f"NSD@{cfg.eval.nsd_tolerance_mm:g}mm {results['test_nsd_mean']:.4f} ± {results['test_nsd_std']:.4f}, "
        f"HD95 {results['test_hd95_mean']:.2f} mm → {out}"
    )
    return 0


def _expand_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.name.endswith(VOLUME_SUFFIXES) and not p.name.startswith("."))
            if not found:
                raise DataError(f"{path}: no .nii.gz/.nii/.nrrd volumes in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    # deferred: start-up (torch, nibabel)
    from lasegseg.api import load_model
    from lasegseg.export.predict import output_path_for
    from lasegseg.fsio import atomic_write

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    files = _expand_inputs(args.inputs)
    out = Path(args.out)
    single = len(files) == 1 and out.name.endswith(VOLUME_SUFFIXES)
    if len(files) > 1 and out.name.endswith(VOLUME_SUFFIXES):
        raise DataError(f"{out}: several inputs need an output folder, not a file name")
    names = [p.name for p in files]
    if not single and len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{dup}: several inputs share this name; their masks would overwrite each other")
    predictor = load_model(args.model, device=args.device, tracking_uri=args.tracking_uri)
    if not single:
        out.mkdir(parents=True, exist_ok=True)
    rows = []
    iterator = files
    if len(files) > 1 and not args.quiet:
        from tqdm.auto import tqdm  # deferred: start-up

        iterator = tqdm(files, desc="predict", unit="vol")
    for path in iterator:
        rows.append(
            predictor.predict_file(
                path, output_path_for(path, out, single), batch_size=args.batch_size, largest_cc=args.largest_cc,
                tta=args.tta,
            )
        )  # fmt: skip
    csv_path = out.with_name(out.name.split(".")[0] + "_volumes.csv") if single else out / "volumes.csv"
    # Atomic like the masks: an interrupted run never leaves a half-written table next to them.
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["input", "output", "la_volume_ml"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(csv_path, table.getvalue())
    for row in rows:
        print(f"{row['output']}: LA volume {row['la_volume_ml']:.2f} mL")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lasegseg.export.export import export_best  # deferred: start-up (mlflow, torch)
    from lasegseg.results.selection import check_metric  # deferred: start-up (mlflow)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    check_metric(args.metric)  # before touching the store
    uri = tracking_uri(args.tracking_uri)
    out = _study_out(args, "best")
    result = export_best(
        uri, args.experiment, out, metric=args.metric, parent_run_id=args.parent_run, register=args.register,
        ensemble=args.ensemble,
    )  # fmt: skip
    stat, m = result["cell_metrics"], metric_table.primary()
    members = f", ensemble of {len(result['ensemble'])}" if result["ensemble"] else ""
    print(
        f"best cell {result['cell']} by mean {args.metric} over {result['n']} seed(s): "
        f"val {m.display} {stat[m.val]['mean']:.4f}, test {m.display} {stat[m.test_mean]['mean']:.4f} "
        f"± {stat[m.test_mean]['std']:.4f}; run {result['run_id']}{members} → {out}"
    )
    if "registered" in result:
        reg = result["registered"]
        print(f"registered models:/{reg['name']}/{reg['version']} (alias models:/{reg['name']}@{reg['alias']})")
    return 0


def _study_out(args: argparse.Namespace, default: str) -> Path:
    """``--out``, else ``runs/<experiment>/<default>``."""
    return Path(args.out or Path("runs") / args.experiment / default)


def cmd_aggregate(args: argparse.Namespace) -> int:
    # deferred: start-up (mlflow, pandas)
    from lasegseg.results.aggregate import aggregate
    from lasegseg.results.tables import format_table

    uri = tracking_uri(args.tracking_uri)
    out = _study_out(args, "summary")
    summary = aggregate(uri, args.experiment, out, parent_run_id=args.parent_run, log_to_parent=not args.no_log)
    print(format_table(summary))
    print(f"summary: {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    # deferred: start-up (mlflow, pandas)
    from lasegseg.results.compare import compare
    from lasegseg.results.comparison_tables import format_table

    metric_table.metric(args.metric)  # an unknown name, before touching the store
    uri = tracking_uri(args.tracking_uri)
    out = _study_out(args, "summary")
    comparison, notes = compare(
        uri, args.experiment, out, parent_run_id=args.parent_run, metric=args.metric, against=args.against,
        seed=args.seed, resamples=args.resamples, tie=args.tie, log_to_parent=not args.no_log,
    )  # fmt: skip
    print(format_table(comparison, notes))
    print(f"comparison: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lasegseg.export.report import write_report  # deferred: start-up (mlflow, matplotlib)

    metric_table.metric(args.metric)  # an unknown name, before touching the store
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    out = _study_out(args, "report.html")
    if out.suffix.lower() not in (".html", ".htm"):
        raise LasegsegError(f"--out {out}: the report is one HTML file; give a name ending in .html")
    path = write_report(
        tracking_uri(args.tracking_uri), args.experiment, out, parent_run_id=args.parent_run, metric=args.metric,
        log_to_parent=not args.no_log,
    )  # fmt: skip
    print(f"report: {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lasegseg.sweep.runner import run_cli  # deferred: start-up

    return run_cli(args, "lasegseg sweep")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lasegseg", description="DINOv2 left-atrium segmentation: data, training, sweeps and prediction."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    layouts = ("msd", "lasc2018", "lascarqs", "generic")

    p = sub.add_parser("phantom", help="write a seeded synthetic LA phantom dataset")
    p.add_argument("out", help="output folder")
    p.add_argument("--cases", type=_positive_int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=layouts, default="msd")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("check", help="validate a dataset; exit 1 listing every bad case")
    p.add_argument("data")
    p.add_argument("--layout", default="auto", help=f"auto (default) or one of: {', '.join(layouts)}")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help="train one model (one trial) and test it")
    p.add_argument("data", help="dataset folder")
    p.add_argument("--out", required=True, help="run folder (model/, metrics.json, per_patient.csv)")
    p.add_argument("--layout", default=None, help=f"auto (default) or one of: {', '.join(layouts)}")
    p.add_argument(
        "--backbone", default=None,
        help="tiny, dinov2-small|base|large|giant, tiny-dinov3, dinov3-small|...|7b, a hub id or dir, none",
    )  # fmt: skip
    p.add_argument("--decoder", default=None, help="decoder name (linear, conv, multiscale, unetr; unet baseline)")
    p.add_argument("--mode", default=None, help="frozen, finetune or lora")
    p.add_argument(
        "--image-size", type=int, default=None,
        help="slice size, a multiple of the backbone's patch (14 DINOv2, 16 DINOv3; default 448)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--patients", type=int, default=None, help="few-shot: number of training patients")
    group.add_argument("--fraction", type=float, default=None, help="few-shot: share of training slices (0, 1]")
    options.add_set(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    options.add_pseudonymize(
        p, help="salted-hash aliases for patient ids in every output (key: OUT/pseudonyms.csv, keep it private)"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="run a few-shot / hyperparameter sweep on Ray Tune (as sweeps/fewshot.py)")
    add_sweep_arguments(p)  # the flags module is as light as this one; the driver loads when a sweep runs
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("predict", help="segment volumes with a model folder, an export or a registered model")
    p.add_argument(
        "model", help="export folder, run model folder (config.json + model.safetensors), models:/NAME@ALIAS or "
        "models:/NAME/VERSION"
    )  # fmt: skip
    p.add_argument("inputs", nargs="+", help=".nii.gz/.nii/.nrrd files or folders of them")
    p.add_argument("--out", required=True, help="mask file (one input) or output folder")
    p.add_argument("--largest-cc", action="store_true", help="keep only the largest connected component")
    p.add_argument("--tta", action="store_true", help="average with a left-right flipped prediction")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--device", default=None)
    options.add_tracking(p, help="for models:/ URIs (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)

    _add_study_commands(sub)
    return parser


def _metric_choices() -> str:
    return ", ".join(m.name for m in metric_table.summarised())


def _add_study_commands(sub) -> None:
    """The commands that read a sweep back from MLflow: aggregate, compare, report, export."""
    p = sub.add_parser("aggregate", help="mean/std/CI of test and val metrics over seeds, from MLflow alone")
    options.add_experiment(p)
    options.add_tracking(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/<experiment>/summary)")
    p.add_argument("--parent-run", default=None, help="only the trials of this sweep run (default: all)")
    p.add_argument("--no-log", action="store_true", help="do not attach the summary to the sweep's MLflow run")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("compare", help="paired per-patient statistics of every cell against a reference cell")
    options.add_experiment(p)
    options.add_tracking(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/<experiment>/summary)")
    p.add_argument(
        "--parent-run", "--parent", default=None, help="only the trials of this sweep run, or 'latest' (default: all)"
    )
    p.add_argument("--metric", default="dice", help=f"per-patient test metric: {_metric_choices()} (default: dice)")
    p.add_argument(
        "--against", default="best", metavar="best|baseline|CELL",
        help="reference: best validation Dice (default), the backbone=none baseline (per few-shot size when there is "
        "one per size), a cell hash (prefix) or run name",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--resamples", type=_positive_int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--tie", type=float, default=1e-6, help="|difference| at most this is a tie (default 1e-6)")
    p.add_argument("--no-log", action="store_true", help="do not attach the comparison to the sweep's MLflow run")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="one self-contained HTML page of a study: summary, comparison, plots, model")
    options.add_experiment(p)
    options.add_tracking(p)
    p.add_argument("--out", default=None, help="the HTML file (default: runs/<experiment>/report.html)")
    p.add_argument("--parent-run", "--parent", default=None, help="only the trials of this sweep run (default: all)")
    p.add_argument(
        "--metric",
        default="dice",
        help=f"per-patient metric of the paired comparison: {_metric_choices()} (default: dice)",
    )
    p.add_argument("--no-log", action="store_true", help="do not attach the page to the sweep's MLflow run")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="export the best cell's model (chosen on validation) and register it")
    options.add_experiment(p)
    options.add_tracking(p)
    p.add_argument(
        "--metric",
        default="val_dice",
        help=f"rank cells by: {', '.join(metric_table.selection_metrics())} (default: val_dice)",
    )
    p.add_argument("--out", default=None, help="export folder (default: runs/<experiment>/best)")
    p.add_argument("--register", default=None, metavar="NAME", help="register as MLflow model NAME, alias champion")
    p.add_argument("--parent-run", default=None, help="only the trials of this sweep run (default: all)")
    p.add_argument("--ensemble", action="store_true", help="export every seed of the best cell; predict averages them")
    p.set_defaults(func=cmd_export)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return process.run_command(lambda: args.func(args), f"lasegseg {args.command}")


def console_main() -> None:
    """The ``lasegseg`` command: :func:`main`, and the process ends once its exit handlers ran (no teardown)."""
    process.end_quickly()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    process.exit_with(main())


if __name__ == "__main__":
    console_main()
