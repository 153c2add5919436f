"""dmctl's connection to dmd: one call at a time, its errors as one line
(``Failure``), and what a verb is (every verb module registers its own)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from dmd.dbus.names import (
    BUS_NAME,
    DEVICE_INTERFACE,
    ERROR_PREFIX,
    MANAGER_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    PROPERTIES_INTERFACE,
    ROOT_PATH,
)

UNREACHABLE = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
}


class Failure(Exception):
    """One line for stderr."""


def plain(value: Any) -> Any:
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


class Client:
    def __init__(self, bus: MessageBus, bus_label: str, timeout: float, interactive: bool
                 ) -> None:
        self.bus, self.bus_label = bus, bus_label
        self.timeout, self.interactive = timeout, interactive

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: list[Any] | None = None, mutating: bool = False,
                   fds: list[int] | None = None) -> list[Any]:
        """*fds*: descriptors sent with the call (an h in *body* is an index
        into them)."""
        flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if (
            mutating and self.interactive) else MessageFlag.NONE
        message = Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                          signature=signature, body=body or [], flags=flags,
                          unix_fds=fds or [])
        try:
            reply = await asyncio.wait_for(self.bus.call(message), self.timeout)
        except TimeoutError:
            raise Failure(f"dmd did not answer within {self.timeout:g} s") from None
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            name = reply.error_name or "?"
            text = reply.body[0] if reply.body else ""
            if name in UNREACHABLE:
                raise Failure(f"dmd is not running on the {self.bus_label} bus (start it with "
                              "`systemctl start dmd`, or try `dmd --bus session --sim FILE` "
                              "and dmctl --session)")
            raise Failure(f"{text} ({name.removeprefix(ERROR_PREFIX)})")
        return [plain(v) for v in reply.body]

    async def device_path(self, name: str) -> str:
        (path,) = await self.call(ROOT_PATH, MANAGER_INTERFACE, "GetDevice", "s", [name])
        return str(path)

    async def properties(self, path: str) -> dict[str, Any]:
        (values,) = await self.call(path, PROPERTIES_INTERFACE, "GetAll", "s",
                                    [DEVICE_INTERFACE])
        return dict(values)

    async def devices(self, name: str | None) -> list[dict[str, Any]]:
        """One device's properties, or every device's, sorted by name."""
        if name is not None:
            return [await self.properties(await self.device_path(name))]
        (objects,) = await self.call(ROOT_PATH, OBJECT_MANAGER_INTERFACE, "GetManagedObjects")
        found = [dict(ifaces[DEVICE_INTERFACE]) for ifaces in objects.values()
                 if DEVICE_INTERFACE in ifaces]
        return sorted(found, key=lambda p: str(p["Name"]))

    async def on_device(self, name: str, member: str, signature: str, *args: Any) -> list[Any]:
        path = await self.device_path(name)
        return await self.call(path, DEVICE_INTERFACE, member, signature, list(args),
                               mutating=member != "GetStatus")


Verb = Callable[[Client, argparse.Namespace], Coroutine[Any, Any, None]]
