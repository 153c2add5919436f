"""The bus connection dmd serves on, and who is calling.

dbus-fast sends InterfacesAdded/InterfacesRemoved from the path of the object
being exported; the D-Bus specification (and GDBusObjectManagerClient, and
every client that subscribes with the manager's path) expects them from the
ObjectManager's own path. DmdBus sends them from there, with the property
values taken from the cached view rather than by calling every getter.

dbus-fast's writer (5.2.0, as dbus-next's before it) takes EAGAIN from a full
socket buffer for a dead connection and drops the bus: a storm of a thousand
devices removed by another tool, while the bus daemon is busy, did that in
the lab. DmdBus hands its writer a socket whose send says "nothing sent" on
EAGAIN, so the writer waits for the socket to drain as it does after a
partial send.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import OrderedDict
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface

from dmd.dbus.declare import CachedObject
from dmd.dbus.names import OBJECT_MANAGER_INTERFACE, ROOT_PATH
from dmd.service import errors

log = logging.getLogger(__name__)


class _SendOrWait:
    """A socket whose send() returns 0 where the real one raises EAGAIN.

    A message that carries file descriptors is sent with sendmsg(); the
    writer forgets its descriptors once sendmsg returns, so when nothing was
    sent they are kept here and go with the next send of the same message's
    bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._ancillary: list[Any] | None = None

    def send(self, data: Any) -> int:
        if self._ancillary is not None:
            return self.sendmsg([data], self._ancillary)
        try:
            return self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def sendmsg(self, buffers: list[Any], ancillary: list[Any]) -> int:
        try:
            sent = self._sock.sendmsg(buffers, ancillary)
        except (BlockingIOError, InterruptedError):
            self._ancillary = ancillary
            return 0
        self._ancillary = None
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class DmdBus(MessageBus):
    def __init__(self, bus_type: BusType = BusType.SYSTEM, bus_address: str | None = None,
                 ) -> None:
        # File descriptors: Volume.OpenDevice hands one out.
        super().__init__(bus_address=bus_address, bus_type=bus_type, negotiate_unix_fd=True)
        # While the first scan is exported nobody can know our objects yet:
        # one signal per device there would only cost time.
        self.quiet = True
        self._uids: OrderedDict[str, int] = OrderedDict()

    async def connect(self) -> DmdBus:
        await super().connect()
        writer = self._writer
        assert writer is not None and self._sock is not None
        writer.sock = _SendOrWait(self._sock)  # type: ignore[assignment]
        return self

    def send(self, msg: Message) -> asyncio.Future[None]:  # type: ignore[override]
        """Most sends are never awaited (replies, signals, dbus-fast's own
        calls). A write that fails because the bus went away is the loss of
        the connection, reported once where dmd waits for it, not as an
        asyncio "exception was never retrieved" traceback per message. (The
        base class's stub says send returns None; the aio bus returns this
        Future.)"""
        # dbus-fast's own send, with the future made here: when the bus is
        # gone, its writer fails the write (EPIPE), closes the socket and
        # then raises EBADF re-arming it, and the future it made is lost.
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume_send_error)
        if not self.connected or self._writer is None:
            future.set_exception(ConnectionError("the bus connection is closed"))
            return future
        if not msg.serial:
            msg.serial = self.next_serial()
        try:
            self._writer.schedule_write(msg, future)
        except OSError as exc:
            if not future.done():
                future.set_exception(exc)
        return future

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if self.quiet or not self.connected:
            return
        if isinstance(interface, CachedObject):
            props: dict[str, Any] = interface.variants()
        else:
            props = {}
        self.send(Message.new_signal(
            ROOT_PATH, OBJECT_MANAGER_INTERFACE, "InterfacesAdded", "oa{sa{sv}}",
            [path, {interface.name: props}]))

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if self.quiet or not self.connected:
            return
        self.send(Message.new_signal(
            ROOT_PATH, OBJECT_MANAGER_INTERFACE, "InterfacesRemoved", "oas",
            [path, removed_interfaces]))

    async def call_checked(self, message: Message) -> Message:
        """Call; a D-Bus error reply becomes an exception naming it."""
        reply = await self.call(message)
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            raise BusCallFailed(reply.error_name or "?", str(text))
        return reply

    def known_uid(self, sender: str) -> int | None:
        """The uid behind *sender*, if it was asked for already."""
        return self._uids.get(sender)

    async def caller_uid(self, sender: str) -> int:
        """The uid behind a unique bus name, asked of the bus daemon (which
        got it from the kernel): the only identity a caller cannot forge.
        Unique names are never reused, so a small cache of them is safe."""
        uid = self._uids.get(sender)
        if uid is not None:
            self._uids.move_to_end(sender)
            return uid
        try:
            reply = await self.call_checked(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="GetConnectionUnixUser",
                signature="s", body=[sender]))
        except BusCallFailed as exc:
            raise errors.NotAuthorized(f"cannot tell who {sender} is: {exc}") from None
        uid = int(reply.body[0])
        self._uids[sender] = uid
        if len(self._uids) > 4096:
            self._uids.popitem(last=False)
        return uid


def _consume_send_error(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("send failed: %r", future.exception())


class BusCallFailed(Exception):
    def __init__(self, error_name: str, text: str) -> None:
        super().__init__(f"{error_name}: {text}")
        self.error_name = error_name
