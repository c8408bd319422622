"""Running a sweep's trials on Ray Tune, tracked in MLflow (reading results back is :mod:`lasegseg.results`).

The driver, in the order a sweep runs:

- ``flags``: the command line's flags (light: ``lasegseg --help`` imports only this).
- ``runner``: the driver itself: check, start Ray, build caches, open the parent run, run the stages, finish.
- ``spec``: the sweep YAML → the trials' flat configs (Tune's param space) and their resources.
- ``plan``: the sweep file with the flags applied, its storage root and data, checked before anything starts.
- ``plan_report``: the study's plan that ``--dry-run`` prints, priced by ``estimate`` (GPU time, storage,
  MLflow points per trial) from ``costs`` (FLOPs and parameters on paper) and laid on N GPUs by ``timeline``.
- ``state``: the sweep's own files that ``--resume`` reads (state, screening, timings), written atomically.
- ``storage``: storage roots (local, ``s3://``, ``gs://``) and the registry of their schemes;
  ``object_store``: the retry policy of object stores and S3 through boto3.
- ``cluster``: joining a Ray cluster or starting a private local one, and what the driver checks about it.
- ``caches``: the slice and frozen-feature caches, built once per node before the trials.
- ``context``: :class:`~lasegseg.sweep.context.TrialContext`, what every trial is handed besides its config.
- ``tune_runner``: the Tune stages (learning-rate screening, the seeded grid); ``timings``: trial_timings.csv.
- ``finish``: the summary, the paired comparison and the closed parent run after the last trial.

In the Ray workers:

- ``trainable``: one trial inside a worker (its config typed from here on), tracked in its own MLflow run.
- ``worker``: a worker's warm-up and what it reports about itself; ``preload``: what the local cluster's workers
  import as they start.
"""
