"""4. memory — peak memory of the sweep process tree with 1, 2 and 4 concurrent trials (caches are memory-mapped, so
data is shared, not copied per trial).
"""

from __future__ import annotations

from bench.harness import Bench


def measure(b: Bench) -> None:
    """Peak memory of the sweep process tree with 1, 2 and 4 trials at once (frozen grid)."""
    # 0.5 CPU per trial so that four fit on two cores.
    runs = {1: b.sweep("frozen", 1), 2: b.sweep("frozen", 2), 4: b.sweep("frozen", 4, cpus_per_trial=0.5)}
    p1 = runs[1]
    for conc in (2, 4):
        r = runs[conc]
        b.report.add(
            "memory",
            f"peak RSS {conc} vs 1 concurrent trials",
            r.peak_rss / p1.peak_rss,
            detail=f"{p1.peak_rss / 2**20:.0f} → {r.peak_rss / 2**20:.0f} MiB RSS; PSS "
            f"{p1.peak_pss / 2**20:.0f} → {r.peak_pss / 2**20:.0f} MiB "
            f"(+{(r.peak_pss - p1.peak_pss) / (conc - 1) / 2**20:.0f} MiB PSS per added trial)",
        )
    caches = sum(f.stat().st_size for d in p1.cache_dir.iterdir() if d.name != "backbones" for f in d.rglob("*")
                 if f.is_file())  # fmt: skip
    print(f"    (slice + feature caches the trials share: {caches / 2**20:.1f} MiB on disk)", flush=True)
