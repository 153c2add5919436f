"""A D-Bus client of dmd for the bus tests: calls, their errors, options."""


from __future__ import annotations

from typing import Any

from dbus_fast import Message, MessageType, Variant
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
from tests.helpers import plain


class CallError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name, self.text = name, text

    @property
    def short(self) -> str:
        return self.name.removeprefix(ERROR_PREFIX)


class Client:
    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.signals: list[Message] = []
        bus.add_message_handler(self._collect)

    def _collect(self, msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL:
            self.signals.append(msg)

    async def watch(self) -> None:
        await self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
                        [f"type='signal',sender='{BUS_NAME}'"],
                        destination="org.freedesktop.DBus")

    async def call(self, path: str, interface: str | None, member: str, signature: str = "",
                   body: list[Any] | None = None, destination: str = BUS_NAME,
                   flags: int = 0) -> list[Any]:
        reply = await self.bus.call(Message(
            destination=destination, path=path, interface=interface, member=member,
            signature=signature, body=body or [], flags=flags))
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            raise CallError(reply.error_name or "", reply.body[0] if reply.body else "")
        return list(reply.body)

    async def manager(self, member: str, signature: str = "", *args: Any) -> Any:
        body = await self.call(ROOT_PATH, MANAGER_INTERFACE, member, signature, list(args))
        return plain(body[0]) if body else None

    async def device(self, path: str, member: str, signature: str = "", *args: Any) -> Any:
        body = await self.call(path, DEVICE_INTERFACE, member, signature, list(args))
        return plain(body[0]) if body else None

    async def create(self, name: str, table: list[tuple[int, int, str, str]],
                     **options: Any) -> str:
        return str(await self.manager("CreateDevice", "sa(ttss)a{sv}", name,
                                      [list(t) for t in table], _variants(options)))

    async def props(self, path: str) -> dict[str, Any]:
        body = await self.call(path, PROPERTIES_INTERFACE, "GetAll", "s", [DEVICE_INTERFACE])
        return {k: plain(v.value) for k, v in body[0].items()}

    async def managed_objects(self) -> dict[str, dict[str, Any]]:
        body = await self.call(ROOT_PATH, OBJECT_MANAGER_INTERFACE, "GetManagedObjects")
        return {path: {k: plain(v.value) for k, v in ifaces[DEVICE_INTERFACE].items()}
                for path, ifaces in body[0].items() if DEVICE_INTERFACE in ifaces}



def _variants(options: dict[str, Any]) -> dict[str, Variant]:
    sigs = {bool: "b", str: "s", dict: "a{ss}"}
    return {k.replace("_", "-"): Variant(sigs[type(v)], v) for k, v in options.items()}


def variants(**options: Any) -> dict[str, Variant]:
    return _variants(options)
