"""The test hook that crashes a real dmd mid-operation (DMD_TEST_KILL_AT):
it must fire where asked, and only there, or a lab crash test tests nothing."""

from __future__ import annotations

import signal

import pytest

from dmd import daemon


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    monkeypatch.setattr(daemon.os, "kill", lambda pid, sig: seen.append(sig))
    return seen


def test_no_hook_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(daemon.FAULT_ENV, raising=False)
    assert daemon.fault_from_environment() is None


def test_kills_at_the_step_of_the_operation(monkeypatch: pytest.MonkeyPatch,
                                            kills: list[int]) -> None:
    monkeypatch.setenv(daemon.FAULT_ENV, "reload:2")
    hook = daemon.fault_from_environment()
    assert hook is not None
    hook("create", 2)
    hook("reload", 1)
    assert kills == []
    hook("reload", 2)
    assert kills == [signal.SIGKILL]


def test_kills_at_the_nth_time_the_step_is_reached(monkeypatch: pytest.MonkeyPatch,
                                                   kills: list[int]) -> None:
    monkeypatch.setenv(daemon.FAULT_ENV, "volume-create:2:3")
    hook = daemon.fault_from_environment()
    assert hook is not None
    for _ in range(2):
        hook("volume-create", 1)
        hook("volume-create", 2)
        hook("volume-create", 3)
    assert kills == []
    hook("volume-create", 2)
    assert kills == [signal.SIGKILL]
