"""What each D-Bus method does: unpack, call the service, refresh, answer.

Every handler returns only after the inventory has seen the change, so a
client that gets the reply and then reads properties (or looks at the
signals it got first) sees the new state. A failed call refreshes too: the
kernel may have moved (a failed resume drops the loaded table before dmd
puts it back), and the objects must show what the kernel holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from dmd.dbus.convert import check_string, options_in, table_in, table_out, typed_status_out
from dmd.dbus.names import device_path
from dmd.engine import DmFlags, validate_name
from dmd.engine import InvalidArgument as EngineInvalidArgument
from dmd.service import errors
from dmd.service.auth import Caller
from dmd.service.inventory import Inventory
from dmd.service.operations import DeviceService, check_labels

U64_MAX = (1 << 64) - 1


class ManagerHandlers:
    def __init__(self, service: DeviceService, inventory: Inventory) -> None:
        self.service, self.inventory = service, inventory

    async def CreateDevice(self, caller: Caller, name: str, table: list[Any],
                           options: dict[str, Any]) -> str:
        opts = options_in("CreateDevice", options)
        check_string(name, "name")
        info = await self.service.create(
            name, table_in(table), uuid=check_string(opts.get("uuid", ""), "uuid") or None,
            read_only=opts.get("read-only", False), persistent=opts.get("persistent", False),
            labels=opts.get("labels"), caller=caller)
        await self.inventory.refresh(name)
        return device_path(info.device[1])

    async def GetDevice(self, caller: Caller, name: str) -> str:
        check_string(name, "name")
        try:
            validate_name(name)
        except EngineInvalidArgument as exc:
            raise errors.InvalidArgument(str(exc)) from None
        view = self.inventory.get(name)
        if view is None:
            # udev may not have told us yet about a device another tool made.
            await self.inventory.refresh(name)
            view = self.inventory.get(name)
        if view is None:
            raise errors.NotFound(f"no device {name!r}")
        return device_path(view.device[1])

    async def ListTargets(self, caller: Caller) -> list[Any]:
        versions = await self.service.kernel(self.service.engine.list_versions)
        return [[t.name, list(t.version)] for t in versions]

    async def RemoveAllManaged(self, caller: Caller, options: dict[str, Any]) -> list[str]:
        options_in("RemoveAllManaged", options)
        removed = await self.service.remove_all_managed(caller=caller)
        for name in removed:
            await self.inventory.refresh(name)
        return removed


class DeviceHandlers:
    """Device methods; *name* is the device's current name, from its object."""

    def __init__(self, service: DeviceService, inventory: Inventory) -> None:
        self.service, self.inventory = service, inventory

    @contextlib.asynccontextmanager
    async def _changing(self, name: str) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.inventory.refresh(name)

    async def LoadTable(self, caller: Caller, name: str, table: list[Any],
                        options: dict[str, Any]) -> None:
        opts = options_in("LoadTable", options)
        async with self._changing(name):
            await self.service.load(name, table_in(table), read_only=opts.get("read-only", False),
                                    caller=caller)

    async def ClearTable(self, caller: Caller, name: str, options: dict[str, Any]) -> None:
        options_in("ClearTable", options)
        async with self._changing(name):
            await self.service.clear(name, caller=caller)

    async def Reload(self, caller: Caller, name: str, table: list[Any],
                     options: dict[str, Any]) -> None:
        opts = options_in("Reload", options)
        async with self._changing(name):
            await self.service.reload(name, table_in(table), read_only=opts.get("read-only"),
                                      caller=caller)

    async def Suspend(self, caller: Caller, name: str, options: dict[str, Any]) -> None:
        opts = options_in("Suspend", options)
        async with self._changing(name):
            await self.service.suspend(name, noflush=opts.get("noflush", False),
                                       skip_lockfs=opts.get("skip-lockfs", False), caller=caller)

    async def Resume(self, caller: Caller, name: str, options: dict[str, Any]) -> None:
        options_in("Resume", options)
        async with self._changing(name):
            await self.service.resume(name, caller=caller)

    async def Rename(self, caller: Caller, name: str, new_name: str,
                     options: dict[str, Any]) -> None:
        options_in("Rename", options)
        try:
            await self.service.rename(name, check_string(new_name, "new name"), caller=caller)
        except BaseException:
            await self.inventory.refresh(name)
            raise
        await self.inventory.refresh(new_name)

    async def SetUUID(self, caller: Caller, name: str, uuid: str,
                      options: dict[str, Any]) -> None:
        options_in("SetUUID", options)
        async with self._changing(name):
            await self.service.set_uuid(name, check_string(uuid, "uuid"), caller=caller)

    async def Message(self, caller: Caller, name: str, sector: int, message: str,
                      options: dict[str, Any]) -> str:
        options_in("Message", options)
        async with self._changing(name):
            reply = await self.service.message(name, sector, check_string(message, "message"),
                                               caller=caller)
        return reply

    async def GetStatus(self, caller: Caller, name: str, options: dict[str, Any]) -> list[Any]:
        options_in("GetStatus", options)
        try:
            _, lines = await self.service.kernel(self.service.engine.table_status, name,
                                                 DmFlags(0))
        except Exception as exc:
            raise errors.from_engine(exc, name, "status") from None
        return table_out(lines)

    async def GetTypedStatus(self, caller: Caller, name: str,
                             options: dict[str, Any]) -> list[dict[str, Any]]:
        options_in("GetTypedStatus", options)
        try:
            _, lines = await self.service.kernel(self.service.engine.table_status, name,
                                                 DmFlags(0))
        except Exception as exc:
            raise errors.from_engine(exc, name, "status") from None
        return typed_status_out(lines)

    async def Remove(self, caller: Caller, name: str, options: dict[str, Any]) -> None:
        opts = options_in("Remove", options)
        async with self._changing(name):
            await self.service.remove(name, force=opts.get("force", False),
                                      deferred=opts.get("deferred", False), caller=caller)

    async def Adopt(self, caller: Caller, name: str, options: dict[str, Any]) -> None:
        opts = options_in("Adopt", options)
        async with self._changing(name):
            await self.service.adopt(name, persistent=opts.get("persistent", False), caller=caller)

    async def SetLabels(self, caller: Caller, name: str, labels: dict[str, str],
                        options: dict[str, Any]) -> None:
        options_in("SetLabels", options)
        async with self._changing(name):
            await self.service.set_labels(name, check_labels(labels), caller=caller)
