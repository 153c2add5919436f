"""dmd's bus connection survives a full socket buffer.

A bus daemon that stops reading for a moment (busy with a storm of other
traffic) fills the sending socket's buffer; the next send gets EAGAIN. dmd
must wait for the socket to drain and lose nothing. dbus-fast's own writer
drops the connection instead: the second test says so, and fails the day
dbus-fast fixes it (then DmdBus's work-around can go).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from dmd.dbus.bus import DmdBus
from tests.conftest import PrivateBus

SIGNALS = 2000
PAYLOAD = "x" * 1024  # 2,000 signals: ~2 MiB, far past a 4 KiB send buffer


async def flood(bus: MessageBus, private_bus: PrivateBus, fd: int | None = None) -> int:
    """Send SIGNALS signals while the bus daemon is stopped; return how many
    a listener received once it runs again. With *fd*, each signal carries a
    copy of it, and only a signal whose copy arrived counts."""
    listener = await MessageBus(bus_address=private_bus.address,
                                negotiate_unix_fd=fd is not None).connect()
    received = 0

    def count(msg: Message) -> None:
        nonlocal received
        if msg.member != "Flood":
            return
        if fd is None:
            received += 1
            return
        for copy in msg.unix_fds:
            if os.path.sameopenfile(copy, fd):
                received += 1
            os.close(copy)

    listener.add_message_handler(count)
    await listener.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
        body=["type='signal',member='Flood'"]))
    assert bus._sock is not None
    bus._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    os.kill(private_bus.pid, signal.SIGSTOP)
    try:
        for i in range(SIGNALS):
            try:
                if fd is None:
                    bus.send(Message.new_signal("/test", "org.example.Test", "Flood", "us",
                                                [i, PAYLOAD]))
                else:
                    bus.send(Message(path="/test", interface="org.example.Test",
                                     member="Flood", message_type=MessageType.SIGNAL,
                                     signature="ush", body=[i, PAYLOAD, 0], unix_fds=[fd]))
            except OSError:
                break  # dropped: the socket is closed under the writer
            if i % 100 == 0:
                await asyncio.sleep(0)  # let the writer run into the full buffer
    finally:
        os.kill(private_bus.pid, signal.SIGCONT)
    for _ in range(200):
        if received == SIGNALS or not bus.connected:
            break
        await asyncio.sleep(0.05)
    listener.disconnect()
    return received


async def test_dmd_bus_waits_out_a_full_socket_buffer(private_bus: PrivateBus) -> None:
    bus: Any = await DmdBus(bus_address=private_bus.address).connect()
    try:
        assert await flood(bus, private_bus) == SIGNALS
        assert bus.connected
    finally:
        bus.disconnect()


async def test_descriptors_are_not_lost_to_a_full_socket_buffer(private_bus: PrivateBus,
                                                                tmp_path: Any) -> None:
    """A message with file descriptors goes out by sendmsg; when it meets
    EAGAIN its descriptors must go with the rest of its bytes."""
    bus: Any = await DmdBus(bus_address=private_bus.address).connect()
    fd = os.open(tmp_path / "handed", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert await flood(bus, private_bus, fd) == SIGNALS
        assert bus.connected
    finally:
        os.close(fd)
        bus.disconnect()


async def test_dbus_fast_alone_still_drops_the_connection(private_bus: PrivateBus) -> None:
    bus = await MessageBus(bus_address=private_bus.address).connect()
    try:
        await flood(bus, private_bus)
        assert not bus.connected
    finally:
        bus.disconnect()
