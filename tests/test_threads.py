"""``--threads`` / ``METACORE_THREADS``: the default counts only the cores that are free."""

import pytest

from metacore.core.errors import UsageError
from metacore.core.threads import free_cores, resolve_threads


@pytest.mark.parametrize("cores,load,expected", [(2, 0.0, 2), (2, 1.2, 1), (2, 7.5, 1), (16, 3.4, 13), (1, 0, 1)])
def test_auto_leaves_busy_cores_alone(cores, load, expected):
    assert free_cores(cores, load) == expected


def test_flag_then_environment_then_auto(monkeypatch):
    monkeypatch.setenv("METACORE_THREADS", "3")
    assert resolve_threads("2") == 2
    assert resolve_threads(None) == 3
    monkeypatch.delenv("METACORE_THREADS")
    assert 1 <= resolve_threads(None) == resolve_threads("auto")


@pytest.mark.parametrize("value,message", [("0", "--threads must be at least 1"),
                                           ("many", "--threads expects a number of threads or 'auto'")])
def test_bad_thread_counts_are_bad_input(value, message):
    with pytest.raises(UsageError, match=message):
        resolve_threads(value)


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("METACORE_THREADS", "-1")
    with pytest.raises(UsageError, match="METACORE_THREADS must be at least 1"):
        resolve_threads(None)
