"""Volume.OpenDevice over a real dbus-daemon, against dmd --sim: the
descriptor arrives, reads back what was written through another, carries the
mode asked for, and every bad request is a named error."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from test_pools_api import create_pool, disks, finished  # type: ignore[import-not-found]

from dmd.dbus.names import BUS_NAME, VOLUME_INTERFACE
from tests.dbus.bus_client import CallError, Client

__all__ = ["disks"]  # the fixture, used by name

MIB = 1 << 20


@pytest.fixture
async def fd_bus(dmd_session: Any) -> AsyncIterator[MessageBus]:
    """A client connection that takes file descriptors."""
    bus = MessageBus(bus_address=dmd_session.address, bus_type=BusType.SESSION,
                     negotiate_unix_fd=True)
    await bus.connect()
    yield bus
    bus.disconnect()


async def open_device(bus: MessageBus, volume: str, mode: str, **options: Variant) -> int:
    reply = await bus.call(Message(destination=BUS_NAME, path=volume,
                                   interface=VOLUME_INTERFACE, member="OpenDevice",
                                   signature="sa{sv}", body=[mode, options]))
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise CallError(reply.error_name or "", reply.body[0] if reply.body else "")
    assert reply.signature == "h" and len(reply.unix_fds) == 1
    (index,) = reply.body
    return reply.unix_fds[index]


async def a_volume(client: Client, disks: list[str], size: int = 64 * MIB) -> str:
    pool, job = await create_pool(client, "tank", disks[:1])
    assert (await finished(client, job))["State"] == "completed"
    volume, job = await client.call(pool, "org.example.DeviceMapper.Pool", "CreateVolume",
                                    "sta{sv}", ["data", size, {}])
    assert (await finished(client, job))["State"] == "completed"
    return str(volume)


async def test_open_device_hands_over_the_volume(client: Client, fd_bus: MessageBus,
                                                 disks: list[str]) -> None:
    volume = await a_volume(client, disks)
    payload = os.urandom(1 * MIB)
    writer = await open_device(fd_bus, volume, "rw")
    try:
        assert os.lseek(writer, 0, os.SEEK_END) == 64 * MIB
        assert os.pwrite(writer, payload, 3 * MIB) == len(payload)
        os.fsync(writer)
    finally:
        os.close(writer)
    reader = await open_device(fd_bus, volume, "r", exclusive=Variant("b", True))
    try:
        got = os.pread(reader, len(payload), 3 * MIB)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        with pytest.raises(OSError):
            os.write(reader, b"x")  # "r" is read-only
    finally:
        os.close(reader)
    writeonly = await open_device(fd_bus, volume, "w")
    try:
        with pytest.raises(OSError):
            os.read(writeonly, 1)
    finally:
        os.close(writeonly)


async def test_bad_open_requests_are_named_errors(client: Client, fd_bus: MessageBus,
                                                  disks: list[str]) -> None:
    volume = await a_volume(client, disks)
    for mode, options, error in [
            ("x", {}, "InvalidArgument"), ("", {}, "InvalidArgument"),
            ("r", {"exclusive": Variant("s", "yes")}, "InvalidArgument"),
            ("r", {"flags": Variant("i", 0)}, "InvalidArgument")]:
        with pytest.raises(CallError) as refused:
            await open_device(fd_bus, volume, mode, **options)
        assert refused.value.short == error, (mode, options)
    (job,) = await client.call(volume, VOLUME_INTERFACE, "Deactivate", "a{sv}", [{}])
    assert (await finished(client, job))["State"] == "completed"
    with pytest.raises(CallError) as inactive:
        await open_device(fd_bus, volume, "r")
    assert inactive.value.short == "NotActive" and "Activate" in str(inactive.value)
    gone = volume[:-4] + "0000"
    with pytest.raises(CallError) as missing:
        await open_device(fd_bus, gone, "r")
    assert missing.value.short == "NotFound"


async def test_dmd_keeps_no_descriptor_it_handed_over(client: Client, fd_bus: MessageBus,
                                                      disks: list[str], dmd_session: Any
                                                      ) -> None:
    volume = await a_volume(client, disks)
    assert dmd_session.proc is not None
    pid = dmd_session.proc.pid
    os.close(await open_device(fd_bus, volume, "r"))  # whatever a first open sets up
    await asyncio.sleep(0.2)
    before = len(os.listdir(f"/proc/{pid}/fd"))
    for _ in range(20):
        os.close(await open_device(fd_bus, volume, "r"))
    # Descriptors sent to dmd are closed too: with a call that takes none,
    # with one of the wrong signature, with one to no object.
    with open(os.devnull) as sent:
        for path, signature, body in [(volume, "sa{sv}", ["r", {}]), (volume, "h", [0]),
                                      ("/nowhere", "h", [0])]:
            reply = await fd_bus.call(Message(
                destination=BUS_NAME, path=path, interface=VOLUME_INTERFACE,
                member="OpenDevice", signature=signature, body=body,
                unix_fds=[sent.fileno()]))
            assert reply is not None
            for fd in reply.unix_fds:
                os.close(fd)
    # dmd closes its copy once the reply is written, maybe just after we read it.
    for _ in range(50):
        if len(os.listdir(f"/proc/{pid}/fd")) <= before:
            break
        await asyncio.sleep(0.1)
    assert len(os.listdir(f"/proc/{pid}/fd")) <= before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to call as another user")
async def test_another_user_may_not_open_a_volume(client: Client, dmd_session: Any,
                                                  disks: list[str]) -> None:
    """Without polkit on the bus every non-root caller is refused, with the
    named error; busctl, a client we did not write, asks."""
    volume = await a_volume(client, disks)
    out = await asyncio.to_thread(subprocess.run, [
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "busctl",
        f"--address={dmd_session.address}", "call", BUS_NAME, volume, VOLUME_INTERFACE,
        "OpenDevice", "sa{sv}", "rw", "0"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "polkit is not running" in out.stderr, out.stderr
    root = await asyncio.to_thread(subprocess.run, [
        "busctl", f"--address={dmd_session.address}", "call", BUS_NAME, volume,
        VOLUME_INTERFACE, "OpenDevice", "sa{sv}", "rw", "0"],
        capture_output=True, text=True, timeout=30)
    assert root.returncode == 0 and root.stdout.startswith("h "), (root.stdout, root.stderr)


async def test_a_client_that_takes_no_descriptors_gets_an_error_not_a_hang(
        client: Client, disks: list[str]) -> None:
    """The bus daemon drops a reply with a descriptor to a connection that did
    not negotiate them, and tells dmd; the caller must hear why at once."""
    volume = await a_volume(client, disks)
    started = time.monotonic()
    with pytest.raises(CallError) as refused:
        await asyncio.wait_for(open_device(client.bus, volume, "r"), 20)
    assert refused.value.short == "InvalidArgument"
    assert "file descriptor" in str(refused.value) and time.monotonic() - started < 5
