"""Repair on the real kernel, through dmd on the lab's system bus: a pool's
superblock overwritten while the pool is stopped; Start finds it with
thin_check (the kernel would refuse the pool's table), the pool shows
"damaged" and refuses changes; Repair writes a mended copy into the spare
area with thin_repair; Start brings every volume back with its checksum."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest
from lab_daemon import SystemDmd, dmsetup
from test_pools_lab import (
    JOB_INTERFACE,
    call,
    checksum,
    create_pool,
    create_volume,
    error_of,
    prop,
    settle,
    write_pattern,
)

from dmd.dbus.names import POOL_INTERFACE

pytestmark = [pytest.mark.kernel, pytest.mark.kernel_volumes_late]

MIB = 1 << 20
SIZE = 16 * MIB
HEADER = 4 * MIB  # the pool's header on each disk; its metadata follows on the first


def pool_job(pool: str, member: str) -> tuple[str, str]:
    """The job's end state, and the job."""
    (job,) = call(pool, POOL_INTERFACE, member, "a{sv}", "0")
    call(job, JOB_INTERFACE, "Wait", "d", "120")
    return str(prop(job, JOB_INTERFACE, "State")), str(job)


def test_a_superblock_overwritten_is_found_at_start_and_repaired(
        system_dmd: SystemDmd, loop_device: Callable[[int], str]) -> None:
    disk = loop_device(128)
    pool = create_pool("rep", [disk])
    try:
        for name in ("a", "b"):
            create_volume(pool, name, 32 * MIB)
        sums = {name: write_pattern(f"/dev/mapper/rep-{name}", name.encode(), SIZE)
                for name in ("a", "b")}
        settle()
        state, _ = pool_job(pool, "Stop")
        assert state == "completed"
        fd = os.open(disk, os.O_WRONLY)
        try:
            os.pwrite(fd, os.urandom(4096), HEADER)
            os.fsync(fd)
        finally:
            os.close(fd)

        state, job = pool_job(pool, "Start")
        assert state == "failed" and prop(job, JOB_INTERFACE, "ErrorName") == "Corrupt"
        assert "superblock" in prop(job, JOB_INTERFACE, "ErrorMessage")
        assert prop(pool, POOL_INTERFACE, "Mode") == "damaged"
        assert "Repair" in prop(pool, POOL_INTERFACE, "ModeHelp")
        assert "superblock" in prop(pool, POOL_INTERFACE, "ChangesRefused")
        assert [n for n in dmsetup("ls").split()[::2] if n.startswith("rep-")] == []
        assert error_of(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                        ["c", 32 * MIB, {}]) == "Corrupt"

        state, job = pool_job(pool, "Repair")
        assert state == "completed", prop(job, JOB_INTERFACE, "ErrorMessage")
        state, job = pool_job(pool, "Start")
        assert state == "completed", prop(job, JOB_INTERFACE, "ErrorMessage")
        settle()
        assert prop(pool, POOL_INTERFACE, "Mode") == "ok"
        assert prop(pool, POOL_INTERFACE, "ChangesRefused") == ""
        for name, digest in sums.items():
            assert checksum(f"/dev/mapper/rep-{name}", SIZE) == digest, name
        create_volume(pool, "c", 32 * MIB)  # it changes again
    finally:
        for name in ("c", "b", "a", "tpool", "tspare", "tdata", "tmeta"):
            subprocess.run(["dmsetup", "remove", f"rep-{name}"], capture_output=True)
