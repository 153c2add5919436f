"""Stop and Start on the real kernel, through dmd on the lab's system bus,
with data checksums: a stopped pool leaves no device in the kernel; its
disks are moved to other loop device numbers and it is renamed; Start with
their new paths brings the pool and its volumes back with their data, under
the new name; stopped again, its
disks pass ImportPool's checks on another dmd (a fresh state directory),
data and all."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab_daemon import SystemDmd, dmsetup
from test_pools_lab import (
    call,
    checksum,
    create_pool,
    create_volume,
    error_of,
    prop,
    settle,
    snapshot,
    wait,
    write_pattern,
)

from dmd.dbus.names import MANAGER_INTERFACE, POOL_INTERFACE, ROOT_PATH, VOLUME_INTERFACE

pytestmark = [pytest.mark.kernel, pytest.mark.kernel_volumes_late]

MIB = 1 << 20
SIZE = 16 * MIB


def losetup(*args: str) -> str:
    return subprocess.run(["losetup", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def images(tmp_path: Path) -> Iterator[tuple[list[Path], list[str]]]:
    """Two disk images and the loop devices they are on (kept current by
    the test as it moves them); all detached at the end."""
    files = [tmp_path / f"disk{i}.img" for i in range(2)]
    for image in files:
        with open(image, "wb") as f:
            f.truncate(128 * MIB)
    loops = [losetup("-f", "--show", str(image)) for image in files]
    yield files, loops
    for line in losetup("-a").splitlines():
        if any(str(image) in line for image in files):
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)


def ours() -> list[str]:
    return [n for n in dmsetup("ls").split()[::2] if n.startswith("stp-")]


def pool_job(pool: str, member: str, *options: str) -> None:
    (job,) = call(pool, POOL_INTERFACE, member, "a{sv}", *(options or ("0",)))
    wait(job)


def test_stop_move_the_disks_start_then_import_elsewhere(
        system_dmd: SystemDmd, images: tuple[list[Path], list[str]], tmp_path: Path) -> None:
    files, loops = images
    pool = create_pool("stp", loops)
    a = create_volume(pool, "a", 32 * MIB)
    sums = {"a": write_pattern("/dev/mapper/stp-a", b"a", SIZE)}
    snap, job = snapshot(a, "a.1")
    wait(job)
    sums["a.1"] = sums["a"]
    sums["a"] = write_pattern("/dev/mapper/stp-a", b"a, later", SIZE)
    settle()

    pool_job(pool, "Stop")
    assert prop(pool, POOL_INTERFACE, "State") == "stopped"
    assert ours() == []
    assert error_of(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                    ["b", 32 * MIB, {}]) == "NotActive"

    # The disks move: detached, and attached again at other numbers (an old
    # number next in line is taken by a small disk with no label first), in
    # the other order.
    for loop in loops:
        losetup("-d", loop)
    spacer = tmp_path / "spacer.img"
    spacer.write_bytes(b"\0" * MIB)
    spacers: list[str] = []
    try:
        moved = []
        for image in reversed(files):
            while losetup("-f") in loops:  # an old number: taken by a spacer
                spacers.append(losetup("-f", "--show", str(spacer)))
            moved.append(losetup("-f", "--show", str(image)))
        assert set(moved).isdisjoint(loops), (moved, loops)
        assert error_of(pool, POOL_INTERFACE, "Start", "a{sv}", [{}]) == "Busy"  # not there
        assert ours() == []
        # Renamed while stopped: the same object, its devices made under the new name.
        call(pool, POOL_INTERFACE, "Rename", "sa{sv}", "stq", "0")
        assert prop(pool, POOL_INTERFACE, "Name") == "stq"
        pool_job(pool, "Start", "1", "devices", "as", "2", *moved)
        assert prop(pool, POOL_INTERFACE, "State") == "active"
        assert sorted(prop(pool, POOL_INTERFACE, "Devices")) == sorted(moved)
        for name, digest in sums.items():
            if name == "a.1":
                (job,) = call(snap, VOLUME_INTERFACE, "Activate", "a{sv}", "0")
                wait(job)
            assert checksum(f"/dev/mapper/stq-{name}", SIZE) == digest, name
        assert ours() == []  # nothing under the old name
        assert {"stq-a", "stq-a.1", "stq-tpool"} <= set(dmsetup("ls").split()[::2])

        # Stopped again, its disks pass ImportPool's checks on another dmd.
        pool_job(pool, "Stop")
        system_dmd.stop()
        shutil.move(system_dmd.state_dir, tmp_path / "first-state")
        system_dmd.start()
        imported, job = call(ROOT_PATH, MANAGER_INTERFACE, "ImportPool", "asa{sv}", "2",
                             *moved, "0")
        wait(job)
        assert prop(imported, POOL_INTERFACE, "State") == "active"
        settle()
        assert prop(imported, POOL_INTERFACE, "Name") == "stq"
        for name, digest in sums.items():
            assert checksum(f"/dev/mapper/stq-{name}", SIZE) == digest, name
    finally:
        for name in ("a.1", "a", "tpool", "tdata", "tmeta"):
            for pool_name in ("stp", "stq"):
                subprocess.run(["dmsetup", "remove", f"{pool_name}-{name}"],
                               capture_output=True)
        for loop in spacers:
            subprocess.run(["losetup", "-d", loop], check=False)
