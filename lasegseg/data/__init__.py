"""Data: layouts → validated cases → canonical orientation → normalised axial slices in an Arrow cache.

What lives where:

- Volumes: :mod:`~lasegseg.data.io` reads and writes NIfTI / NRRD files (the extension picks the format) through
  :mod:`~lasegseg.data.nifti_file` and :mod:`~lasegseg.data.nrrd_file`; :mod:`~lasegseg.data.volume_checks` holds
  ``VolumeError``, the size limits and the header checks every reader shares; :mod:`~lasegseg.data.orientation`
  brings arrays to the canonical RAS+ orientation and back.
- Datasets: :mod:`~lasegseg.data.layouts` detects a layout, lists its cases and loads one;
  :mod:`~lasegseg.data.validate` checks a whole dataset and reports every bad file at once, or streams its cases;
  :mod:`~lasegseg.data.types` has the plain containers (``Volume``, ``Case``, ``LoadedCase``);
  :mod:`~lasegseg.data.phantom` writes synthetic datasets in every layout; :mod:`~lasegseg.data.pseudonym` replaces
  case ids with keyed pseudonyms for everything a run publishes.
- Preprocessing: :mod:`~lasegseg.data.preprocess` (intensity normalisation, slice resizing, the ``Preprocessing``
  parameters); :mod:`~lasegseg.data.splits` (seeded patient-level train/val/test splits, nested few-shot subsets).
- The slice cache: :mod:`~lasegseg.data.cache` opens a dataset's cache or builds it (``get_or_build_cache``,
  ``open_cache``); :mod:`~lasegseg.data.fingerprint` turns dataset content and parameters into its key;
  :mod:`~lasegseg.data.cache_format` names its files and schemas; :mod:`~lasegseg.data.cache_write` builds and
  publishes a cache folder; :mod:`~lasegseg.data.cache_workers` runs :mod:`~lasegseg.data.cache_prepare` (one case
  read, checked and preprocessed) on a pool; :mod:`~lasegseg.data.cache_read` is the verified, memory-mapped
  ``SliceCache``.

Nothing here imports ray or mlflow.
"""
