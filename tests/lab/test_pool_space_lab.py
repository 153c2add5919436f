"""A pool's space on the real kernel, through dmd on the lab's system bus:

- a pool with room grows as it fills past its low-water mark, with the data
  intact and nothing to tell;
- a pool without room, on-full "error": LowSpace, then Full, on its object,
  writes fail fast, AddDevice lets it go on, the data written before intact;
- on-full "queue": the writes wait while the pool is full and all complete
  after an AddDevice; with a no-space-timeout they fail after it (dmd's own,
  per pool: not the kernel's module-wide 60 s);
- 2 MiB of metadata filled with mappings grows into the pool's room; with
  no room, filled to the end, the pool stops (out-of-metadata-space, Full)
  and an AddDevice grows the metadata first and lets it go on;
- throughout, dmd answers other calls within a second (a client of the
  test's own times a GetManagedObjects every 0.2 s), and finds every device
  of its pools with the table it recorded.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from lab_daemon import SystemDmd, dmsetup
from test_pools_lab import call, checksum, create_volume, prop, wait

from dmd.dbus.names import (
    BUS_NAME,
    MANAGER_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    POOL_INTERFACE,
    ROOT_PATH,
)

pytestmark = [pytest.mark.kernel, pytest.mark.kernel_volumes]

MIB = 1 << 20

# Writes 1 MiB chunks (O_DIRECT) from chunk FIRST to FIRST+COUNT-1, each made
# from SEED and its index; stops at the first failure and says how far it
# got, the error and how long the failing write took.
WRITER = r"""
import hashlib, json, mmap, os, sys, time
path, first, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 20)
done, error, took = 0, None, 0.0
for index in range(first, first + count):
    buf.seek(0)
    buf.write(hashlib.sha256(f"{seed}{index}".encode()).digest() * 32768)
    started = time.monotonic()
    try:
        os.pwrite(fd, buf, index << 20)
    except OSError as exc:
        error, took = exc.errno, time.monotonic() - started
        break
    done += 1
print(json.dumps({"written": done, "errno": error, "took": took}))
"""


def chunks_sum(seed: str, count: int) -> str:
    whole = hashlib.sha256()
    for index in range(count):
        whole.update(hashlib.sha256(f"{seed}{index}".encode()).digest() * 32768)
    return whole.hexdigest()


def start_writer(device: str, first: int, count: int, seed: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, device, str(first), str(count), seed],
                            stdout=subprocess.PIPE, text=True)


def finished(writer: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, _ = writer.communicate(timeout=timeout)
    assert writer.returncode == 0, out
    result: dict[str, Any] = json.loads(out)
    return result


def write(device: str, first: int, count: int, seed: str) -> dict[str, Any]:
    return finished(start_writer(device, first, count, seed))


class BusWatch:
    """The test's own client on the system bus, in a thread: it collects the
    Pool signals and times a GetManagedObjects every 0.2 s."""

    def __init__(self) -> None:
        self.signals: list[tuple[str, str, list[int]]] = []
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> BusWatch:
        self._thread.start()
        assert self._ready.wait(30), "the watching client did not connect"
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _main(self) -> None:
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="AddMatch",
                               signature="s",
                               body=[f"type='signal',interface='{POOL_INTERFACE}'"]))

        def on_message(message: Message) -> bool:
            if message.message_type is MessageType.SIGNAL and \
                    message.interface == POOL_INTERFACE:
                self.signals.append((str(message.path), str(message.member),
                                     list(message.body)))
            return False

        bus.add_message_handler(on_message)
        self._ready.set()
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                reply = await bus.call(Message(destination=BUS_NAME, path=ROOT_PATH,
                                               interface=OBJECT_MANAGER_INTERFACE,
                                               member="GetManagedObjects"))
                self.latencies.append(time.monotonic() - started)
                if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
                    self.failures.append(str(reply and reply.body))
                await asyncio.sleep(0.2)
        finally:
            bus.disconnect()

    def said(self, pool: str) -> list[str]:
        return [member for path, member, _ in self.signals if path == pool]

    def wait_for(self, pool: str, member: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while member not in self.said(pool):
            assert time.monotonic() < deadline, f"no {member} from {pool}: {self.signals}"
            time.sleep(0.1)

    @staticmethod
    def assert_no_drift(dmd: SystemDmd) -> None:
        """dmd found every device of its pools as it recorded them."""
        drift = [line for line in dmd.log.read_text().splitlines() if "drift" in line]
        assert not drift, drift[:5]

    def assert_answered(self) -> None:
        assert not self.failures, self.failures
        assert len(self.latencies) > 10, self.latencies
        assert max(self.latencies) < 1.0, sorted(self.latencies)[-5:]


def pool_with(name: str, devices: list[str], **options: tuple[str, Any]) -> str:
    body: list[Any] = [name, devices, {k: Variant(*v) for k, v in options.items()}]

    async def create() -> list[Any]:
        client = await MessageBus(bus_type=BusType.SYSTEM).connect()
        try:
            reply = await client.call(Message(destination=BUS_NAME, path=ROOT_PATH,
                                              interface=MANAGER_INTERFACE, member="CreatePool",
                                              signature="sasa{sv}", body=body))
        finally:
            client.disconnect()
        assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, reply
        return list(reply.body)

    pool, job = asyncio.run(create())
    wait(job)
    return str(pool)


def until(what: Callable[[], bool], timeout: float = 60, why: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.2)


def add_device(pool: str, device: str) -> None:
    (job,) = call(pool, POOL_INTERFACE, "AddDevice", "sa{sv}", device, "0")
    wait(job)


def kernel_pool_status(pool: str) -> list[str]:
    return dmsetup("status", f"{pool}-tpool").split()


def test_a_pool_grows_as_it_fills_and_a_full_one_fails_writes_fast_until_add_device(
        system_dmd: SystemDmd, loop_device: Callable[[int], str]) -> None:
    with BusWatch() as bus:
        # With room: 16 MiB of data on a 96 MiB device, grown at each mark.
        roomy = pool_with("dmdtps1", [loop_device(96)], **{
            "data-size": ("t", 16 * MIB), "on-full": ("s", "error")})
        volume = create_volume(roomy, "v", 128 * MIB)
        device = "/dev/mapper/dmdtps1-v"
        written = 0
        for _ in range(3):
            total = prop(roomy, POOL_INTERFACE, "DataTotal")
            target = total * 85 // 100 // MIB  # past the 20% mark, short of full
            result = write(device, written, target - written, "roomy")
            assert result["errno"] is None, result
            written = target
            until(lambda: bool(prop(roomy, POOL_INTERFACE, "DataTotal") > total),  # noqa: B023
                  why=f"the pool did not grow past {total} bytes")
        assert checksum(device, written * MIB) == chunks_sum("roomy", written)
        assert bus.said(roomy) == []  # it had room: nothing to tell
        assert len(dmsetup("table", "dmdtps1-tdata").splitlines()) > 1  # grown in segments
        assert prop(volume, "org.example.DeviceMapper.Volume", "UsedBytes") >= written * MIB

        # Without room, on-full "error": 24 MiB of data (28 after the header,
        # less 2 of metadata and 2 of its spare), 40 MiB written.
        full = pool_with("dmdtps2", [loop_device(32)], **{"on-full": ("s", "error")})
        create_volume(full, "v", 64 * MIB)
        device = "/dev/mapper/dmdtps2-v"
        assert prop(full, POOL_INTERFACE, "DataTotal") == 24 * MIB
        assert write(device, 0, 20, "full")["errno"] is None  # past the mark
        bus.wait_for(full, "LowSpace")
        result = write(device, 20, 20, "full")
        assert result["errno"] in (errno.ENOSPC, errno.EIO), result
        assert result["took"] < 5, result  # fails fast: no queue
        bus.wait_for(full, "Full")
        assert bus.said(full) == ["LowSpace", "Full"]
        until(lambda: prop(full, POOL_INTERFACE, "Mode") == "out-of-data-space")
        assert "AddDevice" in prop(full, POOL_INTERFACE, "ModeHelp")
        assert kernel_pool_status("dmdtps2")[7] == "out_of_data_space"
        before = 20 + result["written"]
        add_device(full, loop_device(64))
        until(lambda: prop(full, POOL_INTERFACE, "Mode") == "ok", why="still full")
        assert prop(full, POOL_INTERFACE, "ModeHelp") == ""
        result = write(device, before, 40 - before, "full")
        assert result["errno"] is None, result
        assert checksum(device, 40 * MIB) == chunks_sum("full", 40)
    bus.assert_answered()
    bus.assert_no_drift(system_dmd)


def test_a_queueing_pool_holds_writes_until_add_device_or_its_no_space_timeout(
        system_dmd: SystemDmd, loop_device: Callable[[int], str]) -> None:
    kernel_timeout = int(Path("/sys/module/dm_thin_pool/parameters/no_space_timeout")
                         .read_text())
    assert kernel_timeout == 0 or kernel_timeout >= 60, \
        "the kernel would fail the held writes before the test ends"
    with BusWatch() as bus:
        # no-space-timeout 0: held as long as the kernel allows; AddDevice in time.
        held = pool_with("dmdtps3", [loop_device(32)], **{"no-space-timeout": ("u", 0)})
        create_volume(held, "v", 64 * MIB)
        device = "/dev/mapper/dmdtps3-v"
        writer = start_writer(device, 0, 40, "held")
        bus.wait_for(held, "Full")
        until(lambda: prop(held, POOL_INTERFACE, "Mode") == "out-of-data-space")
        time.sleep(3)
        assert writer.poll() is None, "the writes were not held"
        add_device(held, loop_device(64))
        result = finished(writer)
        assert result == {"written": 40, "errno": None, "took": 0.0}, result
        assert checksum(device, 40 * MIB) == chunks_sum("held", 40)
        assert prop(held, POOL_INTERFACE, "Mode") == "ok"

        # no-space-timeout 3: the held writes fail after it, not the kernel's 60 s.
        timed = pool_with("dmdtps4", [loop_device(32)], **{"no-space-timeout": ("u", 3)})
        create_volume(timed, "v", 64 * MIB)
        other = create_volume(timed, "w", 64 * MIB)
        assert write("/dev/mapper/dmdtps4-w", 0, 8, "other")["errno"] is None
        device = "/dev/mapper/dmdtps4-v"
        result = write(device, 0, 40, "timed")
        assert result["errno"] in (errno.ENOSPC, errno.EIO), result
        assert 2.5 < result["took"] < (kernel_timeout or 60) * 0.75, result
        assert "error_if_no_space" in dmsetup("table", "dmdtps4-tpool").split()
        until(lambda: "up to 3 s" in prop(timed, POOL_INTERFACE, "ModeHelp"),
              why="ModeHelp does not say how long writes wait")
        assert prop(timed, POOL_INTERFACE, "OnFull") == "queue"
        # Space back without a reload of its own (a volume deleted): queueing again.
        (job,) = call(other, "org.example.DeviceMapper.Volume", "Delete", "a{sv}", "0")
        wait(job)
        until(lambda: "error_if_no_space" not in dmsetup("table", "dmdtps4-tpool").split(),
              why="the pool did not go back to holding writes")
        before = result["written"]
        add_device(timed, loop_device(64))
        result = write(device, before, 40 - before, "timed")
        assert result["errno"] is None, result
        assert checksum(device, 40 * MIB) == chunks_sum("timed", 40)
    bus.assert_answered()
    bus.assert_no_drift(system_dmd)


def test_a_pool_whose_metadata_runs_low_grows_it_into_its_room(
        system_dmd: SystemDmd, loop_device: Callable[[int], str]) -> None:
    """2 MiB of metadata (the least the kernel takes) filled with mappings:
    the data device is 16 GiB, real for its first 8 MiB (the header and the
    metadata) and a zero target after it, where writes vanish (~90,000
    mappings of 64 KiB for next to no memory; 1 MiB O_DIRECT writes, 16
    mappings each); the room is a second device."""
    import mmap
    import os

    head, sectors = 8 * MIB // 512, 16 << 21
    subprocess.run(["dmsetup", "create", "dmdtest-deep"], check=True, text=True,
                   input=f"0 {head} linear {loop_device(8)} 0\n{head} {sectors - head} zero\n")
    block, meta = 64 << 10, 2 * MIB
    data = (sectors * 512 - 4 * MIB - meta) // block * block
    with BusWatch() as bus:
        pool = pool_with("dmdtps6", ["/dev/mapper/dmdtest-deep", loop_device(32)], **{
            "metadata-size": ("t", meta), "data-size": ("t", data)})
        assert prop(pool, POOL_INTERFACE, "MetadataTotal") == meta
        create_volume(pool, "v", sectors * 512)
        fd = os.open("/dev/mapper/dmdtps6-v", os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, MIB)
        buf.write(b"m" * MIB)
        chunks = data // MIB
        written = 0  # chunks of 1 MiB
        try:
            while prop(pool, POOL_INTERFACE, "MetadataTotal") == meta:
                status = kernel_pool_status("dmdtps6")
                assert written < chunks, f"the metadata never grew: {status}"
                assert status[7] == "rw" and status[10] == "-", status  # not stopped
                used, total = map(int, status[4].split("/"))
                if used > total * 0.8:  # past the kernel's mark: give dmd its time
                    until(lambda: prop(pool, POOL_INTERFACE, "MetadataTotal") > meta,
                          why=f"the metadata did not grow: {status}")
                    break
                for index in range(written, min(written + 256, chunks)):
                    os.pwrite(fd, buf, index * MIB)
                written = min(written + 256, chunks)
        finally:
            os.close(fd)
        status = kernel_pool_status("dmdtps6")
        assert status[7] == "rw" and status[10] == "-", status
        used, total = map(int, status[4].split("/"))
        assert total * 4096 > meta and total * 4096 == prop(pool, POOL_INTERFACE,
                                                            "MetadataTotal"), status
        assert int(status[5].split("/")[0]) == written * MIB // block  # every mapping kept
        assert len(dmsetup("table", "dmdtps6-tmeta").splitlines()) == 2  # grown into the room
        assert bus.said(pool) == []
        print(f"metadata grew at {written * MIB // block} mappings: {used}/{total} blocks")
    bus.assert_answered()
    bus.assert_no_drift(system_dmd)


def test_a_pool_out_of_metadata_fails_writes_until_add_device_grows_its_metadata(
        system_dmd: SystemDmd, loop_device: Callable[[int], str]) -> None:
    """2 MiB of metadata filled to the end with no room (the data device as
    in the test above, every byte data): LowSpace at the kernel's mark, then
    the kernel stops allocating (its status says ro, with no needs_check:
    dmd's Mode says out-of-metadata-space) and writes that need a block fail
    at once; Full. AddDevice grows the metadata over the new device first,
    in a resume of its own, and the pool writes again, every mapping kept."""
    import mmap
    import os

    head, sectors = 8 * MIB // 512, 16 << 21
    subprocess.run(["dmsetup", "create", "dmdtest-deep2"], check=True, text=True,
                   input=f"0 {head} linear {loop_device(8)} 0\n{head} {sectors - head} zero\n")
    meta = 2 * MIB
    with BusWatch() as bus:
        pool = pool_with("dmdtps7", ["/dev/mapper/dmdtest-deep2"], **{
            "metadata-size": ("t", meta)})
        assert prop(pool, POOL_INTERFACE, "MetadataTotal") == meta
        create_volume(pool, "v", sectors * 512)
        fd = os.open("/dev/mapper/dmdtps7-v", os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, MIB)
        buf.write(b"o" * MIB)
        written, failed, took = 0, None, 0.0
        try:
            while failed is None:
                assert written < sectors // 2048, "the metadata never ran out"
                for index in range(written, written + 256):
                    started = time.monotonic()
                    try:
                        os.pwrite(fd, buf, index * MIB)
                    except OSError as exc:
                        failed, took = exc, time.monotonic() - started
                        break
                    written += 1
            assert failed.errno == errno.EIO, failed
            assert took < 5, took  # not queued: the kernel fails it
            status = kernel_pool_status("dmdtps7")
            used, total = map(int, status[4].split("/"))
            assert status[7] == "ro" and status[10] == "-" and used == total, status
            until(lambda: prop(pool, POOL_INTERFACE, "Mode") == "out-of-metadata-space",
                  why="dmd did not see the metadata run out")
            bus.wait_for(pool, "Full")
            assert bus.said(pool) == ["LowSpace", "Full"]  # metadata alone says so
            assert "AddDevice" in prop(pool, POOL_INTERFACE, "ModeHelp")
            mapped = int(status[5].split("/")[0])
            add_device(pool, loop_device(32))
            until(lambda: prop(pool, POOL_INTERFACE, "Mode") == "ok", why="still stopped")
            status = kernel_pool_status("dmdtps7")
            assert status[7] == "rw" and status[10] == "-", status
            assert int(status[4].split("/")[1]) * 4096 > meta
            assert int(status[5].split("/")[0]) == mapped  # every mapping kept
            tmeta = dmsetup("table", "dmdtps7-tmeta").splitlines()
            assert len(tmeta) == 2, tmeta  # grown over the new device
            for index in range(written, written + 16):  # writes go on
                os.pwrite(fd, buf, index * MIB)
        finally:
            os.close(fd)
        print(f"metadata ran out at {mapped} mappings; grown to {status[4]} blocks")
    bus.assert_answered()
    bus.assert_no_drift(system_dmd)
