"""Test-suite wiring shared by the host and the kernel lab.

Tests marked ``kernel`` need a real device-mapper and run only inside the lab
(``lab/run``), which sets DMD_LAB=1. On the host they are deselected, never
skipped: the lab run is a separate, mandatory step of ``scripts/test``, and a
lab that cannot boot fails that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# Imported now, not by its pytest plugin's summary at the end of a run that
# used none of it: that late import meets CPython 3.11.2's "AST constructor
# recursion depth mismatch" (gh-106905), and a passing run exits 1.
import hypothesis  # noqa: F401
import pytest

from dmd.engine import DM, DevId, DmError, DmFlags, TargetLine

IN_LAB = os.environ.get("DMD_LAB") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_LAB:
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("kernel") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


# -- kernel fixtures (used by tests marked "kernel", inside the lab) --------

PREFIX = "dmdtest-"
# Pools' device names are POOL-tmeta, POOL-VOLUME...; pool names have no "-",
# so the lab's pools are named dmdtp*.
POOL_PREFIX = "dmdtp"


def _all_test_devices(dm: DM) -> list[str]:
    return [d.name for d in dm.list_devices()
            if d.name.startswith(PREFIX) or d.name.startswith(POOL_PREFIX)]


def remove_test_devices(dm: DM) -> None:
    """Remove every dmdtest- (and dmdtp*) device, users before the devices
    they use."""
    for attempt in range(5):
        names = _all_test_devices(dm)
        if not names:
            return
        if attempt:
            # udev may still be probing a device a test wrote to (EBUSY): let it finish.
            subprocess.run(["udevadm", "settle", "--timeout=10"], check=False)
        for name in names:
            with contextlib.suppress(DmError):
                info = dm.device_info(name)
                if info.suspended:
                    dm.device_suspend(name, DmFlags(0))
            with contextlib.suppress(DmError):
                dm.device_remove(name)
    leftover = _all_test_devices(dm)
    assert not leftover, f"could not remove test devices {leftover}"


@pytest.fixture(scope="session")
def dm() -> Iterator[DM]:
    if os.environ.get("DMD_LAB") != "1":
        pytest.fail("kernel tests run only inside the lab (lab/run)")
    with DM() as handle:
        yield handle


@pytest.fixture
def clean_dm(dm: DM) -> Iterator[DM]:
    """The session DM handle; every dmdtest- device is removed afterwards."""
    remove_test_devices(dm)
    yield dm
    remove_test_devices(dm)


@pytest.fixture(scope="session")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lab")


@pytest.fixture
def loop_device(lab_dir: Path) -> Iterator[Callable[[int], str]]:
    """Factory: ``loop_device(size_mib)`` returns a fresh /dev/loopN path."""
    made: list[tuple[str, Path]] = []

    def make(size_mib: int = 64) -> str:
        image = lab_dir / f"loop{len(made)}-{os.getpid()}-{id(made)}.img"
        with open(image, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        path = subprocess.run(
            ["losetup", "-f", "--show", str(image)],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        made.append((path, image))
        return path

    yield make
    for path, image in reversed(made):
        subprocess.run(["losetup", "-d", path], check=False)
        image.unlink(missing_ok=True)


@pytest.fixture
def make_device(clean_dm: DM) -> Callable[..., str]:
    """Factory: ``make_device(suffix, table, uuid=None, flags=0)`` -> active device name."""

    def make(suffix: str, table: list[TargetLine], uuid: str | None = None,
             flags: DmFlags = DmFlags(0)) -> str:
        name = PREFIX + suffix
        clean_dm.device_create(name, uuid)
        try:
            clean_dm.table_load(DevId.name(name), table, flags)
            clean_dm.device_suspend(DevId.name(name), DmFlags(0))
        except BaseException:
            with contextlib.suppress(DmError):
                clean_dm.device_remove(name)
            raise
        return name

    return make


# -- bus fixtures: a private dbus-daemon, and dmd --sim serving on it -------

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <allow user="*"/>
  </policy>
</busconfig>
"""


@dataclasses.dataclass
class PrivateBus:
    address: str
    env: dict[str, str]
    pid: int  # the dbus-daemon's


@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    """A real dbus-daemon of our own, torn down after the test."""
    # Not under tmp_path: tests call as other users, who cannot enter it.
    socket_dir = Path(tempfile.mkdtemp(prefix="dmd-bus-"))
    socket_dir.chmod(0o755)
    socket_path = socket_dir / "bus.sock"
    config = tmp_path / "bus.conf"
    config.write_text(BUS_CONFIG.format(socket=socket_path))
    daemon = subprocess.Popen(
        ["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={config}",
         "--print-address"], stdout=subprocess.PIPE, text=True)
    assert daemon.stdout is not None
    address = daemon.stdout.readline().strip()
    assert address, "dbus-daemon printed no address"
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=address)
    try:
        yield PrivateBus(address, env, daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        shutil.rmtree(socket_dir, ignore_errors=True)


@dataclasses.dataclass
class DmdProcess:
    """dmd --sim on a private bus, as a separate process (as users run it)."""

    bus: PrivateBus
    sim: Path
    state_dir: Path
    log: Path
    extra: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return self.bus.env

    @property
    def address(self) -> str:
        return self.bus.address

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dmd", "--bus", "session", "--sim", str(self.sim),
                "--state-dir", str(self.state_dir), "--log-level", "debug", *self.extra]

    def start(self, wait: bool = True) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), env=self.env, stdout=log, stderr=log)
        if wait:
            self.wait_for_name()
        return self.proc

    def wait_for_name(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            owned = subprocess.run(
                ["busctl", f"--address={self.address}", "status", "org.example.DeviceMapper"],
                capture_output=True).returncode == 0
            if owned:
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"dmd exited with {self.proc.returncode}:\n"
                                     f"{self.log.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"dmd did not take its name in {timeout} s:\n{self.log.read_text()}")

    def stop(self, signo: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signo)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def make_dmd(private_bus: PrivateBus, tmp_path: Path) -> Iterator[Callable[..., DmdProcess]]:
    """Start ``dmd --bus session --sim FILE [extra...]`` on the private bus;
    every dmd still running at the end must stop cleanly on SIGTERM."""
    started: list[DmdProcess] = []

    def make(*extra: str) -> DmdProcess:
        n = len(started)
        dmd = DmdProcess(private_bus, tmp_path / f"kernel{n}.json", tmp_path / f"state{n}",
                         tmp_path / f"dmd{n}.log", list(extra))
        dmd.start()
        started.append(dmd)
        return dmd

    yield make
    for dmd in started:
        if dmd.proc is not None and dmd.proc.poll() is None:
            code = dmd.stop()
            assert code == 0, f"dmd exited with {code} on SIGTERM:\n{dmd.log.read_text()}"


@pytest.fixture
def dmd_session(make_dmd: Callable[..., DmdProcess]) -> DmdProcess:
    """A running ``dmd --bus session --sim FILE`` on a private bus."""
    return make_dmd()
