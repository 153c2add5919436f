"""Caches on the real kernel: a volume's cache detached while a writer keeps
writing to it loses no write.

The volume gets a pattern, then a cache (dm-cache in writeback mode, or
dm-writecache) on a second disk; a region is written until the kernel says
blocks are dirty (in the cache and not yet in the volume), then DetachCache
runs while a writer keeps rewriting blocks. When both are done the volume,
now on its own table, must read back exactly what was last written to each
block (sha256 of the whole device, read with O_DIRECT).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest
from dbus_fast import Variant
from lab_daemon import SystemDmd, dmsetup
from test_encrypted_volumes_lab import fd_call
from test_pools_lab import MIB, checksum, create_pool, disks, prop, wait

from dmd.dbus.names import JOB_INTERFACE, POOL_INTERFACE, VOLUME_INTERFACE
from dmd.engine.targets import parse_status
from dmd.engine.targets.cache import CacheStatus
from dmd.engine.targets.writecache import WritecacheStatus

__all__ = ["disks"]  # the fixture, used by name

pytestmark = [pytest.mark.kernel, pytest.mark.kernel_volumes]

POOL = "dmdtpq"
SIZE = 16 * MIB
BLOCK = 64 * 1024


def block(seed: str, index: int) -> bytes:
    return hashlib.sha256(f"{seed}:{index}".encode()).digest() * (BLOCK // 32)


def dirty(device: str) -> int:
    line = dmsetup("status", device)
    _, _, kind, params = line.split(" ", 3)
    status = parse_status(kind, params)
    if isinstance(status, CacheStatus):
        return status.dirty_blocks
    assert isinstance(status, WritecacheStatus)
    return status.total_blocks - status.free_blocks


def write_until_dirty(path: str, image: bytearray, blocks: int) -> None:
    """Rewrite the first *blocks* blocks (recorded in *image*) until the
    cache holds some of them dirty, or 60 rounds have passed."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for round_ in range(60):
            for index in range(blocks):
                data = block(f"hot{round_}", index)
                os.pwrite(fd, data, index * BLOCK)
                image[index * BLOCK:(index + 1) * BLOCK] = data
            os.fsync(fd)
            if dirty(f"{POOL}-v") > 0:
                break
    finally:
        os.close(fd)


class Writer:
    """Rewrites blocks of the volume until stopped; knows what it last wrote."""

    def __init__(self, path: str, image: bytearray, first: int, count: int) -> None:
        self.path, self.image, self.first, self.count = path, image, first, count
        self.stop = threading.Event()
        self.writes = 0
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            generation = 0
            while not self.stop.is_set():
                generation += 1
                for index in range(self.first, self.first + self.count, 3):
                    data = block(f"load{generation}", index)
                    os.pwrite(fd, data, index * BLOCK)
                    self.image[index * BLOCK:(index + 1) * BLOCK] = data
                    self.writes += 1
                os.fsync(fd)
        finally:
            os.close(fd)


@pytest.mark.parametrize("mode", ["writeback", "writecache"])
def test_detach_under_writes_loses_nothing(system_dmd: SystemDmd, disks: list[str],
                                           mode: str) -> None:
    pool = create_pool(POOL, [disks[0]])
    error, (volume, job) = fd_call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                   ["v", SIZE, {}])
    assert error is None
    wait(job)
    path = f"/dev/mapper/{POOL}-v"
    image = bytearray(b"".join(block("first", i) for i in range(SIZE // BLOCK)))
    with open(path, "r+b") as device:
        device.write(image)
        os.fsync(device.fileno())

    error, (job,) = fd_call(volume, VOLUME_INTERFACE, "AttachCache", "sa{sv}",
                            [disks[1], {"mode": Variant("s", mode)}])
    assert error is None, job
    wait(job)
    assert prop(volume, VOLUME_INTERFACE, "Cache") == mode
    assert dmsetup("table", f"{POOL}-v").split()[2] == \
        ("writecache" if mode == "writecache" else "cache")
    # Hot blocks: rewritten until the cache holds some of them dirty.
    write_until_dirty(path, image, 128)
    before = dirty(f"{POOL}-v")
    assert before > 0, "the cache never held a dirty block: the test would prove nothing"

    writer = Writer(path, image, 128, SIZE // BLOCK - 128)
    writer.thread.start()
    try:
        time.sleep(1)
        error, (job,) = fd_call(volume, VOLUME_INTERFACE, "DetachCache", "a{sv}", [{}])
        assert error is None, job
        seen = set()
        deadline = time.monotonic() + 300
        while prop(job, JOB_INTERFACE, "State") == "running":
            seen.add(round(prop(job, JOB_INTERFACE, "Progress"), 2))
            assert time.monotonic() < deadline, "the detach never ended"
            time.sleep(0.2)
        time.sleep(1)  # writes go on after the swap, to the volume itself
    finally:
        writer.stop.set()
        writer.thread.join(timeout=60)
    assert prop(job, JOB_INTERFACE, "State") == "completed", \
        prop(job, JOB_INTERFACE, "ErrorMessage")
    assert writer.writes > 0
    assert dmsetup("table", f"{POOL}-v").split()[2] == "thin"
    assert not [n for n in dmsetup("ls").split() if n.startswith(f"{POOL}-v-c")]
    assert prop(volume, VOLUME_INTERFACE, "Cache") == ""
    assert checksum(path, SIZE) == hashlib.sha256(image).hexdigest(), \
        f"a write was lost ({before} blocks were dirty when the detach began)"


def test_kill_9_during_a_detach_loses_nothing(stopped_dmd: SystemDmd,
                                              disks: list[str]) -> None:
    """dmd killed once the detach has begun: after the restart the cache is
    either still attached with its own policy (recovery undid the detach)
    or gone (the swap had happened), and the volume reads back what was
    written either way; a detach then finishes the job."""
    dmd = stopped_dmd
    dmd.start()
    pool = create_pool(POOL, [disks[0]])
    error, (volume, job) = fd_call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                   ["v", SIZE, {}])
    assert error is None
    wait(job)
    path = f"/dev/mapper/{POOL}-v"
    image = bytearray(b"".join(block("first", i) for i in range(SIZE // BLOCK)))
    error, (job,) = fd_call(volume, VOLUME_INTERFACE, "AttachCache", "sa{sv}",
                            [disks[1], {"mode": Variant("s", "writeback")}])
    assert error is None
    wait(job)
    write_until_dirty(path, image, SIZE // BLOCK)
    assert dirty(f"{POOL}-v") > 0
    error, (job,) = fd_call(volume, VOLUME_INTERFACE, "DetachCache", "a{sv}", [{}])
    assert error is None
    while "cleaner" not in dmsetup("table", f"{POOL}-v") and \
            prop(job, JOB_INTERFACE, "State") == "running":
        time.sleep(0.05)
    assert dmd.proc is not None
    dmd.proc.kill()
    dmd.wait_exit()
    dmd.start()
    kind = dmsetup("table", f"{POOL}-v").split()[2]
    if kind == "cache":
        assert "smq" in dmsetup("table", f"{POOL}-v"), "recovery put its own policy back"
        assert prop(volume, VOLUME_INTERFACE, "Cache") == "writeback"
    else:
        assert kind == "thin" and prop(volume, VOLUME_INTERFACE, "Cache") == ""
    assert checksum(path, SIZE) == hashlib.sha256(image).hexdigest()
    if kind == "cache":
        error, (job,) = fd_call(volume, VOLUME_INTERFACE, "DetachCache", "a{sv}", [{}])
        assert error is None
        wait(job)
    assert dmsetup("table", f"{POOL}-v").split()[2] == "thin"
    assert checksum(path, SIZE) == hashlib.sha256(image).hexdigest()
    dmd.stop()
