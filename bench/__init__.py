"""lasegseg benchmarks: ``bench/run.py`` is the entry point, one ``bench_*`` module per benchmark.

``common`` holds rows, formatting and child-process helpers; ``harness`` the grids and the sweeps they share.
``gpu.py`` is the one script run on a GPU machine; its parts are ``gpu_shapes`` (shapes, feeds, peak table, analytic
FLOPs), ``gpu_model`` (segmenter, step, counted FLOPs), ``gpu_timing``, ``gpu_rows``, ``gpu_cached`` (the
cached-feature frozen path), ``gpu_packing`` (packed frozen trials) and ``gpu_report`` (tables and RESULTS.md).
"""
