"""Training and scoring one model: a trial fits, validates every epoch, keeps its best checkpoint and reports test
metrics. Pure compute: no ray or mlflow imports here.

What lives where:

- ``trial``: :func:`~lasegseg.train.trial.run_trial`, the epoch loop and what it carries between epochs.
- ``trial_data``: what a trial reads: :func:`~lasegseg.train.trial_data.prepare_data` (cache, patient split,
  few-shot rows), :func:`~lasegseg.train.trial_data.pick_device`, and the cached features or weightless backbone
  stand-in a frozen trial decodes from.
- ``fit``: the training step: learning-rate schedule, optimizer, compiled forward, one epoch over the rows.
- ``evaluation``: per-patient 3D metrics on whole volumes (from the backbone or cached features, every k-th slice
  within ``train.val_budget``).
- ``outputs``: the files a trial leaves (``model/``, ``metrics.json``, ``per_patient.csv``, ``overlays.png``) and
  pseudonymised results.
- ``checkpoint``: model folders and resumable training state (safetensors, no pickle), and when a trial saves them.
- ``features``: the frozen-backbone feature cache's key, file format and memory-mapped reader.
- ``feature_build``: computing a backbone's features once across processes (lock, publish, rebuild when damaged),
  for a trial or for every feature slot of a sweep.
- ``feature_residency``: a trial's training features held on its device when they fit, else prefetched on a thread.
- ``feature_plan``: which trials train on cached features and which cache (slot) each reads; no torch.
- ``inference``: slice-wise prediction, autocast and the host → device copy shared by training, scoring and predict.
- ``metrics``: per-case metric functions and their summaries.
- ``losses``, ``augment``: the loss and augmentation registries.
- ``overlay``: the contour figure of predictions against the reference.
"""
