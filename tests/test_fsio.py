"""Atomic file writes (lasegseg.fsio): extension-preserving temporaries, first-writer-wins, permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from lasegseg.fsio import atomic_write, pid_alive, plain_file_mode, publish_dir


def test_exclusive_write_keeps_the_first_writers_content(tmp_path):
    path = tmp_path / "secret"
    atomic_write(path, "first\n", mode=0o600, exclusive=True)
    atomic_write(path, "second\n", mode=0o600, exclusive=True)
    assert path.read_text() == "first\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    atomic_write(path, "third\n")  # without exclusive the new content replaces it
    assert path.read_text() == "third\n"
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_writer_sees_the_suffix_and_plain_mode_follows_the_umask(tmp_path):
    names = []
    old = os.umask(0o027)
    try:
        assert plain_file_mode() == 0o640
        writer = lambda p: names.append(p.name) or p.write_bytes(b"x")  # noqa: E731
        path = atomic_write(tmp_path / "v.nii.gz", writer, mode=plain_file_mode(), suffix=".nii.gz")
    finally:
        os.umask(old)
    assert names[0].startswith(".v.nii.gz.") and names[0].endswith(".nii.gz")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_bytes() == b"x"
    assert stat.S_IMODE(atomic_write(tmp_path / "private", b"y").stat().st_mode) == 0o600  # the default stays private


def test_a_failing_writer_changes_nothing(tmp_path):
    path = atomic_write(tmp_path / "f", "old")

    def fail(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    for exclusive in (False, True):
        with pytest.raises(RuntimeError):
            atomic_write(tmp_path / ("f" if not exclusive else "g"), fail, exclusive=exclusive)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def _built(parent, name: str, text: str):
    folder = parent / name
    folder.mkdir()
    (folder / "manifest.json").write_text(text)
    return folder


def test_publish_dir_keeps_the_first_writer_and_removes_the_losers_copy(tmp_path):
    final = tmp_path / "key"
    complete = lambda folder: (folder / "manifest.json").is_file()  # noqa: E731
    assert publish_dir(_built(tmp_path, ".tmp-a", "first"), final, complete=complete) is True
    loser = _built(tmp_path, ".tmp-b", "second")
    assert publish_dir(loser, final, complete=complete) is False
    assert (final / "manifest.json").read_text() == "first" and not loser.exists()


def test_publish_dir_over_an_incomplete_folder_raises_and_leaves_no_copy(tmp_path):
    final = tmp_path / "key"
    (final / "junk").mkdir(parents=True)
    tmp = _built(tmp_path, ".tmp-a", "mine")
    with pytest.raises(OSError):
        publish_dir(tmp, final, complete=lambda folder: (folder / "manifest.json").is_file())
    assert not tmp.exists() and (final / "junk").is_dir()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="zombies are read from /proc")
def test_a_killed_process_not_yet_reaped_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(child.pid) and pid_alive(os.getpid())
        child.kill()
        deadline = time.monotonic() + 10
        while pid_alive(child.pid) and time.monotonic() < deadline:  # a zombie until waited for
            time.sleep(0.01)
        assert not pid_alive(child.pid) and child.poll() is not None
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)
