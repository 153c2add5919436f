"""Thick volumes on the real kernel: striped over two disks and linear,
their data read back after a grow and a dmd restart, the kernel's tables
naming the disks and offsets dmd recorded."""

from __future__ import annotations

import hashlib
import os

import pytest
from dbus_fast import Variant
from lab_daemon import SystemDmd, dmsetup
from test_encrypted_volumes_lab import fd_call
from test_pools_lab import (
    MIB,
    checksum,
    disks,
    prop,
    settle,
    wait,
    write_pattern,
)

from dmd.dbus.names import POOL_INTERFACE, VOLUME_INTERFACE

__all__ = ["disks"]  # the fixture, used by name

pytestmark = [pytest.mark.kernel, pytest.mark.kernel_volumes]

POOL = "dmdtpk"


def thick(pool: str, name: str, size: int, **options: Variant) -> str:
    error, body = fd_call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                          [name, size, {"thin": Variant("b", False), **options}])
    assert error is None, body
    volume, job = body
    wait(job)
    return str(volume)


def resize(volume: str, size: int) -> None:
    error, body = fd_call(volume, VOLUME_INTERFACE, "Resize", "ta{sv}", [size, {}])
    assert error is None, body
    wait(body[0])


@pytest.mark.kernel_volumes_late  # the boots' balance: docs/kernel-lab.md
def test_striped_and_linear_thick_volumes(stopped_dmd: SystemDmd, disks: list[str]) -> None:
    dmd = stopped_dmd
    dmd.start()
    error, (pool, job) = fd_call("/org/example/DeviceMapper", "org.example.DeviceMapper.Manager",
                                 "CreatePool", "sasa{sv}",
                                 [POOL, disks, {"data-size": Variant("t", 32 * MIB)}])
    assert error is None
    wait(job)
    striped = thick(pool, "fast", 40 * MIB, stripes=Variant("u", 2),
                    **{"stripe-size": Variant("t", 64 * 1024)})
    assert (prop(striped, VOLUME_INTERFACE, "Thin"), prop(striped, VOLUME_INTERFACE,
                                                          "Stripes")) == (False, 2)
    [line] = dmsetup("table", f"{POOL}-fast").splitlines()
    _, length, kind, stripes, chunk, *areas = line.split()
    assert (kind, stripes, chunk, length) == ("striped", "2", "128", str(40 * MIB // 512))
    disk_numbers = {f"{os.major(os.stat(d).st_rdev)}:{os.minor(os.stat(d).st_rdev)}"
                    for d in disks}
    assert {areas[0], areas[2]} == disk_numbers, (areas, disk_numbers)
    first = write_pattern(f"/dev/mapper/{POOL}-fast", b"striped", 40 * MIB)
    resize(striped, 60 * MIB)
    assert len(dmsetup("table", f"{POOL}-fast").splitlines()) == 2
    assert prop(striped, VOLUME_INTERFACE, "Size") == 60 * MIB
    assert checksum(f"/dev/mapper/{POOL}-fast", 40 * MIB) == first

    linear = thick(pool, "slow", 20 * MIB)
    [line] = dmsetup("table", f"{POOL}-slow").splitlines()
    assert line.split()[2] == "linear"
    second = write_pattern(f"/dev/mapper/{POOL}-slow", b"linear", 20 * MIB)
    settle()
    dmd.stop()
    dmd.start()  # a restart: the devices stay, dmd takes them in
    assert checksum(f"/dev/mapper/{POOL}-fast", 40 * MIB) == first
    assert checksum(f"/dev/mapper/{POOL}-slow", 20 * MIB) == second
    error, (job,) = fd_call(linear, VOLUME_INTERFACE, "Delete", "a{sv}", [{}])
    assert error is None
    wait(job)
    again = thick(pool, "again", 10 * MIB)
    assert dmsetup("table", f"{POOL}-again").split()[3:5] == line.split()[3:5], \
        "the room the delete gave back is used first"
    assert prop(again, VOLUME_INTERFACE, "Size") == 10 * MIB
    # It is where "slow" was, and shows none of what "slow" held.
    assert checksum(f"/dev/mapper/{POOL}-again", 10 * MIB) == \
        hashlib.sha256(bytes(10 * MIB)).hexdigest()
    dmd.stop()
