"""Imported by every worker of a sweep's own local Ray cluster as the process starts, before it takes work.

The sweep driver starts that cluster with ``RAY_preload_python_modules`` naming this module, so the workers Ray
starts with the cluster (one per CPU) import torch, MLflow's client and store, the trial code and (when a trial
of the sweep loads a backbone) transformers while the driver builds its caches, and Tune's first trials land on
warm processes. A job-level ``runtime_env`` (and its setup hook) would not do: Ray gives an actor with a runtime
environment a new process, never one of those started with the cluster. Importing this module anywhere else only
costs those imports.
"""

from lasegseg.sweep.worker import prewarm_worker

prewarm_worker(full=False)
