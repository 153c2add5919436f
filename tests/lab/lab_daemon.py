"""dmd run as root on the lab's system bus, and what the lab tests read back
(dmsetup, dmd's database) to judge it. Shared by the lab's daemon, events and
pools tests; the fixtures over it are in conftest.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmd.dbus.names import BUS_NAME

PROJECT = Path(__file__).resolve().parents[2]
POLICY = PROJECT / "data" / "dbus-policy" / "org.example.DeviceMapper.conf"
POLKIT_ACTIONS = PROJECT / "data" / "polkit" / "org.example.devicemapper.policy"


def busctl(*args: str, user: str | None = None, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    command = ["busctl", "--system", *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def call(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    return busctl("call", BUS_NAME, *args, user=user)


def dmsetup(*args: str) -> str:
    out = subprocess.run(["dmsetup", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@contextlib.contextmanager
def polkitd() -> Iterator[None]:
    """A polkitd of our own while the block runs (it reads the rules as they
    are at its start)."""
    for binary in ("/usr/lib/polkit-1/polkitd", "/usr/libexec/polkitd"):
        if Path(binary).exists():
            break
    else:
        pytest.fail("polkitd is not installed in the lab (scripts/setup installs polkitd)")
    subprocess.run(["pkill", "-x", "polkitd"], check=False)
    time.sleep(0.5)
    proc = subprocess.Popen([binary, "--no-debug"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if busctl("status", "org.freedesktop.PolicyKit1").returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("polkitd did not take its bus name")
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for _ in range(100):
            if busctl("status", "org.freedesktop.PolicyKit1").returncode != 0:
                break
            time.sleep(0.05)


def install_policy() -> None:
    """The bus policy (only root may own the name) and polkit's actions."""
    shutil.copy(POLICY, "/etc/dbus-1/system.d/")
    subprocess.run(["busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                    "org.freedesktop.DBus", "ReloadConfig"], check=True, capture_output=True)
    Path("/usr/share/polkit-1/actions").mkdir(parents=True, exist_ok=True)
    shutil.copy(POLKIT_ACTIONS, "/usr/share/polkit-1/actions/")


class SystemDmd:
    def __init__(self, state_dir: Path, log: Path) -> None:
        self.state_dir, self.log = state_dir, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None, wait: bool = True,
              args: tuple[str, ...] = ()) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dmd", "--state-dir", str(self.state_dir),
                 "--log-level", "debug", *args], stdout=log, stderr=log,
                env=dict(os.environ, **(env or {})))
        if wait:
            self.wait_for_name()

    def wait_for_name(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if busctl("status", BUS_NAME).returncode == 0:
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"dmd exited {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.1)
        raise AssertionError(f"dmd did not take {BUS_NAME}:\n{self.log.read_text()}")

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(timeout=60)
            assert code == 0, f"dmd exited {code} on SIGTERM:\n{self.log.read_text()}"
        # The bus forgets the name a moment after the process is gone.
        for _ in range(100):
            if busctl("status", BUS_NAME).returncode != 0:
                return
            time.sleep(0.05)


def suspended_attr(attr: str) -> bool:
    """dmsetup's attr column: (L)ive table, (I)nactive table, (s)uspended,
    (r)ead-only or (w)ritable, then (o)pen, ...: "L-sw" is suspended."""
    return attr[2:3] == "s"


def records(state_dir: Path) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(state_dir / "dmd.sqlite3")) as db:
        return dict(db.execute("SELECT name, table_json FROM devices").fetchall())


def unfinished(state_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(state_dir / "dmd.sqlite3")) as db:
        return int(db.execute("SELECT count(*) FROM intents WHERE state = 'pending'"
                              ).fetchone()[0])
