"""The workers of a slice-cache build: how many, processes or threads, and that the cache's bytes and its error
messages do not depend on them (lasegseg.data.cache_workers)."""

from __future__ import annotations

import os
import re
import sys

import pytest

from lasegseg.data import cache_workers
from lasegseg.data.cache import get_or_build_cache
from lasegseg.data.cache_write import build_cache
from lasegseg.errors import ConfigError, DataError
from tests.data.conftest import MANY, PREP, cache_files, make_case, write_generic


@pytest.mark.parametrize("source", ["arrays", "files"])
def test_two_workers_build_the_same_bytes_as_one(tmp_path, many_cases, source, pool_kind):
    root = write_generic(tmp_path, many_cases) if source == "files" else None
    paths = {}
    for workers in (1, 2):
        if root is None:
            paths[workers] = build_cache(many_cases, tmp_path / f"c{workers}", "k1", PREP, workers=workers)
        else:  # the default readers: the workers read the NIfTI files themselves
            paths[workers] = get_or_build_cache(root, "generic", PREP, tmp_path / f"c{workers}", workers=workers).path
    assert paths[1].name == paths[2].name  # the same key
    (files1, manifest1), (files2, manifest2) = cache_files(paths[1]), cache_files(paths[2])
    assert sorted(files1) == ["cases.arrow", "slices.arrow"]
    assert files1 == files2 and manifest1 == manifest2
    assert manifest1["cases"] == list(MANY)
    assert sorted(p.name for p in paths[2].parent.iterdir() if p.name.startswith(".")) == []


def test_default_worker_count_starts_a_pool_only_for_slow_cases(tmp_path, many_cases, monkeypatch):
    monkeypatch.delenv(cache_workers.WORKERS_ENV, raising=False)
    serial = build_cache(many_cases, tmp_path / "serial", "k1", PREP, workers=1)
    pools = []
    real_pool = cache_workers._pool
    monkeypatch.setattr(cache_workers, "_pool", lambda n: pools.append(n) or real_pool(n))
    build_cache(many_cases, tmp_path / "quick", "k1", PREP)  # tiny cases: quicker inline than any pool
    assert pools == []
    monkeypatch.setattr(cache_workers, "_PARALLEL_AFTER_S", 0.0)
    monkeypatch.setattr(cache_workers, "_usable_cores", lambda: 2)  # a pool even on a one-core runner
    parallel = build_cache(many_cases, tmp_path / "slow", "k1", PREP)  # the first case inline, the rest in the pool
    assert pools == [2] == [cache_workers.cache_workers()]
    assert cache_files(parallel) == cache_files(serial)


@pytest.mark.parametrize("bad", [["b"], ["b", "f"]])
def test_bad_cases_fail_the_same_under_two_workers_and_leave_nothing(tmp_path, many_cases, bad, pool_kind):
    root = write_generic(tmp_path, many_cases)
    for cid in bad:
        (root / "labels" / f"{cid}.nii.gz").write_bytes(b"not a nifti")
    messages = []
    for workers in (1, 2):
        cache_dir = tmp_path / f"cache{workers}"
        with pytest.raises(DataError) as err:
            get_or_build_cache(root, "generic", PREP, cache_dir, workers=workers)
        messages.append(str(err.value))
        assert [p.name for p in cache_dir.iterdir()] == ["file_hashes.json"]  # no cache, no temporary folder
    assert messages[0] == messages[1]
    # Every bad file is named (the cases after the first bad one are still checked), and nothing else.
    named = [line for line in messages[1].splitlines() if ".nii.gz" in line]
    assert len(named) == len(bad)
    assert all(str(root / "labels" / f"{cid}.nii.gz") in line for cid, line in zip(bad, named, strict=True))
    assert len(messages[1].splitlines()) == (1 if len(bad) == 1 else 1 + len(bad))


@pytest.mark.parametrize(
    ("spec", "file", "safe"),
    [
        (None, "/opt/venv/lib/python3.11/site-packages/ray/_private/workers/default_worker.py", False),  # no guard
        (None, "/home/me/my_script.py", False),  # a user's script may not guard its work
        (None, "/repo/sweeps/fewshot.py", True),
        (None, "/repo/.venv/bin/lasegseg", True),  # the console script
        (None, None, True),  # python -c, a notebook: no main file to run again
        ("lasegseg.cli", "/repo/lasegseg/cli.py", True),
        ("pytest.__main__", "/venv/pytest/__main__.py", True),  # multiprocessing never re-runs a package's __main__
        ("mytool", "/venv/mytool.py", False),
    ],
)
def test_worker_processes_only_where_the_main_module_may_run_again(monkeypatch, spec, file, safe):
    import types

    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name=spec) if spec else None
    if file is not None:
        main.__file__ = file
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert cache_workers.processes_are_safe() is safe


def test_bad_array_case_under_two_workers(tmp_path, many_cases):
    bad = make_case("bad", (10, 10, 3), 0)
    bad.label = bad.label[:, :, :2]
    with pytest.raises(DataError, match=r"^case 'bad': image \(10, 10, 3\) and label \(10, 10, 2\)"):
        build_cache([*many_cases[:3], bad, *many_cases[3:]], tmp_path, "k1", PREP, workers=2)
    with pytest.raises(DataError, match=r"^case 'a': duplicate case id$"):
        build_cache([*many_cases, many_cases[0]], tmp_path, "k1", PREP, workers=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5", "2x"])
def test_worker_count_from_the_environment_is_validated(tmp_path, many_cases, monkeypatch, value):
    monkeypatch.setenv(cache_workers.WORKERS_ENV, value)
    with pytest.raises(ConfigError, match=rf"^LASEGSEG_CACHE_WORKERS must be .* got '{re.escape(value)}'$"):
        build_cache(many_cases, tmp_path / "c", "k1", PREP)
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_worker_count_keyword_then_environment_then_cores(monkeypatch):
    monkeypatch.delenv(cache_workers.WORKERS_ENV, raising=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cache_workers.cache_workers() == cores
    monkeypatch.setenv(cache_workers.WORKERS_ENV, " 3 ")
    assert cache_workers.cache_workers() == 3 and cache_workers.cache_workers(1) == 1
    for bad in (0, True, 2.0):
        with pytest.raises(ConfigError, match="workers"):
            cache_workers.cache_workers(bad)


def test_prepared_cases_come_back_in_case_order_and_only_checked_once_asked(many_cases, pool_kind):
    out = list(cache_workers.prepared_cases(many_cases, PREP, 2, lambda: True))
    assert [p.case_id for p in out] == list(MANY) and all(p.images is None for p in out)
    served = []
    out = list(cache_workers.prepared_cases(many_cases, PREP, 1, lambda: served.append(1) or len(served) > 2))
    assert [p.images is None for p in out] == [False, False, True, True, True, True]
