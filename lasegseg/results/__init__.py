"""Reading a sweep back: the stage after the trials, with nothing of Ray in it.

- ``aggregate``: a sweep's trial runs → one row per cell, mean/std/interval over seeds (``summary.csv``).
- ``compare``: per-patient metrics, paired statistics between cells (``comparison.csv``).
- ``plots``: the few-shot curves of the summary.
"""
