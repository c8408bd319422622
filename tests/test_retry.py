"""The backoff loop shared by the MLflow and storage calls, and its time budget from the environment."""

from __future__ import annotations

import logging

import pytest

from lasegseg.errors import ConfigError
from lasegseg.retry import call_with_retries, env_seconds


@pytest.mark.parametrize("text,expected", [("", 7.0), ("  ", 7.0), ("0", 0.0), ("2.5", 2.5)])
def test_env_seconds(monkeypatch, text, expected):
    monkeypatch.setenv("X_SECONDS", text)
    assert env_seconds("X_SECONDS", 7.0) == expected


@pytest.mark.parametrize("text,words", [("soon", "a number of seconds"), ("-1", ">= 0"), ("nan", ">= 0")])
def test_env_seconds_refuses_nonsense_naming_the_variable(monkeypatch, text, words):
    monkeypatch.setenv("X_SECONDS", text)
    with pytest.raises(ConfigError, match=f"X_SECONDS must be {words}"):
        env_seconds("X_SECONDS", 7.0)


def _flaky(failures: int, exc: Exception):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= failures:
            raise exc
        return len(calls)

    return fn, calls


def test_transient_faults_are_waited_out_with_growing_pauses(caplog):
    fn, calls = _flaky(3, ConnectionError("refused\nsecond line"))
    with caplog.at_level(logging.WARNING):
        out = call_with_retries(fn, "put", transient=lambda e: True, seconds=10, first_wait=0.01, max_wait=0.02,
                                log=logging.getLogger("t"), service="S")  # fmt: skip
    assert out == 4 and len(calls) == 4
    assert [r.getMessage() for r in caplog.records] == [
        "S put failed (refused); retrying in 0.0s", "S put failed (refused); retrying in 0.0s",
        "S put failed (refused); retrying in 0.0s",
    ]  # fmt: skip


def test_other_faults_and_spent_budgets_raise():
    fn, calls = _flaky(5, ValueError("bad request"))
    with pytest.raises(ValueError):
        call_with_retries(fn, "get", transient=lambda e: isinstance(e, OSError), seconds=10, first_wait=0.01,
                          max_wait=0.01, log=logging.getLogger("t"), service="S")  # fmt: skip
    assert len(calls) == 1
    fn, calls = _flaky(100, ConnectionError("down"))
    with pytest.raises(ConnectionError):
        call_with_retries(fn, "get", transient=lambda e: True, seconds=0.05, first_wait=0.02, max_wait=0.02,
                          log=logging.getLogger("t"), service="S")  # fmt: skip
    assert 2 <= len(calls) <= 4
