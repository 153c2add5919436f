"""The Device object (org.example.DeviceMapper.Device): one per mapped
device, whoever made it. Its declaration, its properties (the one list of
them, made from the inventory's view) and its methods' handlers: convert the
arguments, call one method of the device service, convert the answer."""

# No "from __future__ import annotations": dbus-fast reads the annotations.
from collections.abc import Callable
from typing import Any

from dbus_fast.service import dbus_method, dbus_signal

from dmd.dbus.convert import check_string, options_in, table_in, table_out, typed_status_out
from dmd.dbus.declare import (
    U32,
    U64,
    CachedObject,
    EventBody,
    Labels,
    Options,
    Str,
    Table,
    TypedStatus,
    cached_properties,
    routed,
)
from dmd.dbus.names import DEVICE_INTERFACE
from dmd.engine import mapper_path
from dmd.service.auth import Caller
from dmd.service.devices.inventory import DeviceView, Inventory
from dmd.service.devices.operations import DeviceService

# The properties of org.example.DeviceMapper.Device: the one list. Each is
# (its D-Bus signature, its value taken from the view). DeviceInterface's
# property declarations, the introspection XML and the variants sent in
# signals and GetManagedObjects are all made from it.
DEVICE_PROPERTY_SOURCES: dict[str, tuple[str, Callable[[DeviceView], Any]]] = {
    "Name": ("s", lambda v: v.name),
    "UUID": ("s", lambda v: v.uuid),
    "Major": ("u", lambda v: v.device[0]),
    "Minor": ("u", lambda v: v.device[1]),
    "DevicePath": ("s", lambda v: mapper_path(v.name)),
    "Size": ("t", lambda v: v.size_bytes),
    "Suspended": ("b", lambda v: v.suspended),
    "ReadOnly": ("b", lambda v: v.read_only),
    "OpenCount": ("i", lambda v: v.open_count),
    "EventNumber": ("u", lambda v: v.event_nr & 0xFFFFFFFF),
    "LiveTable": ("a(ttss)", lambda v: table_out(v.live_table)),
    "InactiveTable": ("a(ttss)", lambda v: table_out(v.inactive_table)),
    "Dependencies": ("a(uu)", lambda v: [list(dev) for dev in v.dependencies]),
    "Managed": ("b", lambda v: v.managed),
    "Persistent": ("b", lambda v: v.persistent),
    "Labels": ("a{ss}", lambda v: dict(v.labels)),
    "Drifted": ("b", lambda v: v.drifted),
    "Symlinks": ("as", lambda v: list(v.udev.symlinks)),
    "FilesystemType": ("s", lambda v: v.udev.fs_type),
    "FilesystemUUID": ("s", lambda v: v.udev.fs_uuid),
    "UdevReady": ("b", lambda v: v.udev.ready),
}
# Name -> signature.
DEVICE_PROPERTIES: dict[str, str] = {
    name: signature for name, (signature, _) in DEVICE_PROPERTY_SOURCES.items()}


def device_properties(view: DeviceView) -> dict[str, Any]:
    """Plain values of every Device property (no I/O: from the view)."""
    return {name: value(view) for name, (_, value) in DEVICE_PROPERTY_SOURCES.items()}




@cached_properties
class DeviceInterface(CachedObject):
    """One mapped device."""

    INTERFACE = DEVICE_INTERFACE
    PROPERTIES = DEVICE_PROPERTIES

    @dbus_method()
    def LoadTable(self, table: Table, options: Options) -> None:
        routed()

    @dbus_method()
    def ClearTable(self, options: Options) -> None:
        routed()

    @dbus_method()
    def Reload(self, table: Table, options: Options) -> None:
        routed()

    @dbus_method()
    def Suspend(self, options: Options) -> None:
        routed()

    @dbus_method()
    def Resume(self, options: Options) -> None:
        routed()

    @dbus_method()
    def Rename(self, new_name: Str, options: Options) -> None:
        routed()

    @dbus_method()
    def SetUUID(self, uuid: Str, options: Options) -> None:
        routed()

    @dbus_method()
    def Message(self, sector: U64, message: Str, options: Options) -> Str:
        routed()

    @dbus_method()
    def GetStatus(self, options: Options) -> Table:
        routed()

    @dbus_method()
    def GetTypedStatus(self, options: Options) -> TypedStatus:
        routed()

    @dbus_method()
    def Remove(self, options: Options) -> None:
        routed()

    @dbus_method()
    def Adopt(self, options: Options) -> None:
        routed()

    @dbus_method()
    def SetLabels(self, labels: Labels, options: Options) -> None:
        routed()

    @dbus_signal()
    def Event(self, event_nr: U32, status: Table) -> EventBody:
        return [event_nr, status]


class DeviceHandlers:
    """Device methods; *name* is the device's current name, from its object."""

    def __init__(self, service: DeviceService, inventory: Inventory) -> None:
        self.service, self.inventory = service, inventory

    async def LoadTable(self, caller: Caller, name: str, table: list[Any],
                        options: dict[str, Any]) -> None:
        opts = options_in("LoadTable", options)
        await self.service.load(name, table_in(table), read_only=opts.get("read-only", False),
                                caller=caller)

    async def ClearTable(self, caller: Caller, name: str, options: dict[str, Any]) -> None:
        options_in("ClearTable", options)
        await self.service.clear(name, caller=caller)

    async def Reload(self, caller: Caller, name: str, table: list[Any],
                     options: dict[str, Any]) -> None:
        opts = options_in("Reload", options)
        await self.service.reload(name, table_in(table), read_only=opts.get("read-only"),
                                  caller=caller)

    async def Suspend(self, caller: Caller, name: str, options: dict[str, Any]) -> None:
        opts = options_in("Suspend", options)
        await self.service.suspend(name, noflush=opts.get("noflush", False),
                                   skip_lockfs=opts.get("skip-lockfs", False), caller=caller)

    async def Resume(self, caller: Caller, name: str, options: dict[str, Any]) -> None:
        options_in("Resume", options)
        await self.service.resume(name, caller=caller)

    async def Rename(self, caller: Caller, name: str, new_name: str,
                     options: dict[str, Any]) -> None:
        options_in("Rename", options)
        await self.service.rename(name, check_string(new_name, "new name"), caller=caller)

    async def SetUUID(self, caller: Caller, name: str, uuid: str,
                      options: dict[str, Any]) -> None:
        options_in("SetUUID", options)
        await self.service.set_uuid(name, check_string(uuid, "uuid"), caller=caller)

    async def Message(self, caller: Caller, name: str, sector: int, message: str,
                      options: dict[str, Any]) -> str:
        options_in("Message", options)
        return await self.service.message(name, sector, check_string(message, "message"),
                                          caller=caller)

    async def GetStatus(self, caller: Caller, name: str, options: dict[str, Any]) -> list[Any]:
        options_in("GetStatus", options)
        return table_out(await self.service.status(name))

    async def GetTypedStatus(self, caller: Caller, name: str,
                             options: dict[str, Any]) -> list[dict[str, Any]]:
        options_in("GetTypedStatus", options)
        return typed_status_out(await self.service.status(name))

    async def Remove(self, caller: Caller, name: str, options: dict[str, Any]) -> None:
        opts = options_in("Remove", options)
        await self.service.remove(name, force=opts.get("force", False),
                                  deferred=opts.get("deferred", False), caller=caller)

    async def Adopt(self, caller: Caller, name: str, options: dict[str, Any]) -> None:
        opts = options_in("Adopt", options)
        await self.service.adopt(name, persistent=opts.get("persistent", False), caller=caller)

    async def SetLabels(self, caller: Caller, name: str, labels: dict[str, str],
                        options: dict[str, Any]) -> None:
        options_in("SetLabels", options)
        await self.service.set_labels(name, labels, caller=caller)
