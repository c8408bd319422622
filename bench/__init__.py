"""lasegseg benchmarks: ``bench/run.py`` is the entry point, one ``bench_*`` module per benchmark.

``common`` holds rows, formatting and child-process helpers; ``harness`` the grids and the sweeps they share.
"""
