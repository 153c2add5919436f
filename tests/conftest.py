"""Test-suite wiring shared by the host and the kernel lab.

Tests marked ``kernel`` need a real device-mapper and run only inside the lab
(``lab/run``), which sets DMD_LAB=1. On the host they are deselected, never
skipped: the lab run is a separate, mandatory step of ``scripts/test``, and a
lab that cannot boot fails that step.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

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


def _all_test_devices(dm: DM) -> list[str]:
    return [d.name for d in dm.list_devices() if d.name.startswith(PREFIX)]


def remove_test_devices(dm: DM) -> None:
    """Remove every dmdtest- device, users before the devices they use."""
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


def dmsetup(*args: str) -> str:
    """Run dmsetup (the independent witness) and return its stdout."""
    return subprocess.run(["dmsetup", *args], check=True, capture_output=True,
                          text=True).stdout
