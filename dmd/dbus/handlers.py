"""What each D-Bus method does: convert the arguments, call one method of the
service layer (or the inventory, for a lookup), convert the answer.

No rule lives here. In particular "a reply means the bus already shows the
new state" is the service's (every operation settles the inventory before it
returns, see dmd.service.events), so a client that reads properties after a
reply, or looked at the signals that came first, sees the change.
"""

from __future__ import annotations

from typing import Any

from dmd.dbus.convert import check_string, options_in, table_in, table_out, typed_status_out
from dmd.dbus.names import device_path
from dmd.service.auth import Caller
from dmd.service.devices.inventory import Inventory
from dmd.service.devices.operations import DeviceService


class ManagerHandlers:
    def __init__(self, service: DeviceService, inventory: Inventory) -> None:
        self.service, self.inventory = service, inventory

    async def CreateDevice(self, caller: Caller, name: str, table: list[Any],
                           options: dict[str, Any]) -> str:
        opts = options_in("CreateDevice", options)
        info = await self.service.create(
            check_string(name, "name"), table_in(table),
            uuid=check_string(opts.get("uuid", ""), "uuid") or None,
            read_only=opts.get("read-only", False), persistent=opts.get("persistent", False),
            labels=opts.get("labels"), caller=caller)
        return device_path(info.device[1])

    async def GetDevice(self, caller: Caller, name: str) -> str:
        view = await self.inventory.find(check_string(name, "name"))
        return device_path(view.device[1])

    async def ListTargets(self, caller: Caller) -> list[Any]:
        return [[t.name, list(t.version)] for t in await self.service.target_versions()]

    async def RemoveAllManaged(self, caller: Caller, options: dict[str, Any]) -> list[str]:
        options_in("RemoveAllManaged", options)
        return await self.service.remove_all_managed(caller=caller)


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
