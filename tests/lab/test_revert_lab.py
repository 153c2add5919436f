"""Revert on the real kernel, through dmd on the lab's system bus, with data
checksums: a closed origin reads its snapshot's data at once (dmsetup shows
its table on the copy's thin id); an open origin keeps its data while it is
open, the revert shown as scheduled, and reads the snapshot's data after its
next Activate, or after dmd restarts once it is closed; the snapshot keeps
its own data throughout. (Across a real reboot: test_reboot_lab.py.)"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from lab_daemon import SystemDmd, dmsetup
from test_pools_lab import (
    call,
    checksum,
    create_pool,
    create_volume,
    prop,
    settle,
    snapshot,
    wait,
    write_pattern,
)

from dmd.dbus.names import VOLUME_INTERFACE

pytestmark = [pytest.mark.kernel, pytest.mark.kernel_volumes_late]

MIB = 1 << 20
SIZE = 32 * MIB


def revert(snap: str) -> None:
    (job,) = call(snap, VOLUME_INTERFACE, "Revert", "a{sv}", "0")
    wait(job)


def volume_job(volume: str, member: str) -> None:
    (job,) = call(volume, VOLUME_INTERFACE, member, "a{sv}", "0")
    wait(job)


def thin_id(device: str) -> int:
    return int(dmsetup("table", device).split()[-1])


def test_revert_now_and_scheduled_with_data_checksums(
        system_dmd: SystemDmd, loop_device: Callable[[int], str]) -> None:
    pool = create_pool("rvt", [loop_device(256)])
    base = create_volume(pool, "base", SIZE)
    device = prop(base, VOLUME_INTERFACE, "DevicePath")
    then = write_pattern(device, b"then", SIZE)
    snap, job = snapshot(base, "base.1")
    wait(job)
    snap_device = prop(snap, VOLUME_INTERFACE, "DevicePath")
    later = write_pattern(device, b"later", SIZE)
    assert later != then and checksum(snap_device, SIZE) == then

    before = thin_id("rvt-base")
    revert(snap)  # closed: at once
    assert checksum(device, SIZE) == then
    assert thin_id("rvt-base") != before
    assert prop(base, VOLUME_INTERFACE, "RevertScheduled") is False

    write_pattern(device, b"again", SIZE)
    settle()
    holder = os.open(device, os.O_RDONLY)  # open: a mount, a VM's disk
    try:
        revert(snap)
        assert prop(base, VOLUME_INTERFACE, "RevertScheduled") is True
        assert prop(base, VOLUME_INTERFACE, "RevertSnapshot") == snap
        again = checksum(device, SIZE)
        assert again not in (then, later)  # its data stays while it is open
    finally:
        os.close(holder)
    volume_job(base, "Deactivate")
    assert prop(base, VOLUME_INTERFACE, "RevertScheduled") is True
    volume_job(base, "Activate")
    assert prop(base, VOLUME_INTERFACE, "RevertScheduled") is False
    assert checksum(prop(base, VOLUME_INTERFACE, "DevicePath"), SIZE) == then

    write_pattern(device, b"once more", SIZE)
    settle()
    holder = os.open(device, os.O_RDONLY)
    try:
        revert(snap)
    finally:
        os.close(holder)
    system_dmd.stop()  # closed now: applied as dmd starts
    system_dmd.start()
    assert prop(base, VOLUME_INTERFACE, "RevertScheduled") is False
    assert checksum(device, SIZE) == then == checksum(snap_device, SIZE)
    ours = sorted(n for n in dmsetup("ls").split()[::2] if n.startswith("rvt-"))
    assert ours == ["rvt-base", "rvt-base.1", "rvt-tdata", "rvt-tmeta", "rvt-tpool"]
