"""A command-line process ends right after its exit handlers, with its status and its output intact."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lasegseg.errors import DataError
from lasegseg.process import run_command

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import atexit, logging, sys
    sys.path.insert(0, {root!r})
    from lasegseg import process
    process.end_quickly()
    logging.basicConfig(filename={log!r}, level=logging.INFO)
    atexit.register(lambda: print("library handler ran", flush=False))  # registered later: runs before the end
    print("partial line without a newline", end="")
    logging.getLogger("x").info("logged before exit")
    {ending}
    """
)


@pytest.mark.parametrize("status", [0, 3])
def test_the_process_ends_after_the_exit_handlers_with_its_status_and_output(tmp_path, status):
    log = tmp_path / "log.txt"
    script = SCRIPT.format(root=str(ROOT), log=str(log), ending=f"process.exit_with({status})")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "partial line without a newlinelibrary handler ran\n"
    assert "logged before exit" in log.read_text()


def test_an_uncaught_exception_ends_as_usual(tmp_path):
    log = tmp_path / "log.txt"
    script = SCRIPT.format(root=str(ROOT), log=str(log), ending="raise RuntimeError('boom')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr
    assert proc.stdout == "partial line without a newlinelibrary handler ran\n"


def _raises(exc: BaseException):
    def body() -> int:
        raise exc

    return body


@pytest.mark.parametrize(
    "body,status,err",
    [
        (lambda: 0, 0, ""),
        (lambda: None, 0, ""),
        (lambda: 1, 1, ""),
        (_raises(DataError("a.nii.gz: not a volume")), 2, "prog: error: a.nii.gz: not a volume\n"),
        (_raises(MemoryError()), 2, "prog: error: out of memory\n"),
        (_raises(KeyboardInterrupt()), 130, "prog: interrupted; go on with --resume\n"),
    ],
)
def test_run_command_turns_user_errors_into_one_line_and_a_status(capsys, body, status, err):
    assert run_command(body, "prog", interrupted="interrupted; go on with --resume") == status
    assert capsys.readouterr().err == err


def test_run_command_does_not_hide_a_bug():
    with pytest.raises(ZeroDivisionError):
        run_command(lambda: 1 // 0, "prog")
