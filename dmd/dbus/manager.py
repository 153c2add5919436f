"""The Manager object (org.example.DeviceMapper.Manager, at the root): its
declaration, and its methods' handlers (devices made and found, pools made,
imported and found): convert the arguments, call one method of the service
layer (or the inventory, for a lookup), convert the answer.

No rule lives in a handler. In particular "a reply means the bus already
shows the new state" is the service's (every operation settles the
inventory before it returns, see dmd.service.events), so a client that
reads properties after a reply, or looked at the signals that came first,
sees the change."""

# No "from __future__ import annotations": dbus-fast reads the annotations.
from typing import Any

from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from dmd.dbus.convert import check_string, options_in, table_in
from dmd.dbus.declare import (
    Disks,
    Names,
    ObjectAndJob,
    Options,
    Path,
    Str,
    StrList,
    Table,
    Targets,
    routed,
)
from dmd.dbus.names import MANAGER_INTERFACE, device_path, job_path, pool_path
from dmd.service.auth import Caller
from dmd.service.devices.inventory import Inventory
from dmd.service.devices.operations import DeviceService
from dmd.service.pools.importing import import_pool
from dmd.service.pools.service import PoolService


class ManagerInterface(ServiceInterface):
    def __init__(self, kernel_version: str, version: str) -> None:
        super().__init__(MANAGER_INTERFACE)
        self._kernel_version = kernel_version
        self._version = version

    @dbus_method()
    def CreateDevice(self, name: Str, table: Table, options: Options) -> Path:
        routed()

    @dbus_method()
    def GetDevice(self, name: Str) -> Path:
        routed()

    @dbus_method()
    def ListTargets(self) -> Targets:
        routed()

    @dbus_method()
    def RemoveAllManaged(self, options: Options) -> Names:
        routed()

    @dbus_method()
    def CreatePool(self, name: Str, devices: StrList, options: Options) -> ObjectAndJob:
        routed()

    @dbus_method()
    def GetPool(self, name: Str) -> Path:
        routed()

    @dbus_method()
    def ImportPool(self, devices: StrList, options: Options) -> ObjectAndJob:
        routed()

    @dbus_method()
    def ListDisks(self, options: Options) -> Disks:
        routed()

    @dbus_property(access=PropertyAccess.READ)
    def KernelVersion(self) -> Str:
        return self._kernel_version

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> Str:
        return self._version


class ManagerHandlers:
    """The Manager's methods."""

    def __init__(self, service: DeviceService, inventory: Inventory, pools: PoolService
                 ) -> None:
        self.service, self.inventory, self.pools = service, inventory, pools

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

    async def CreatePool(self, caller: Caller, name: str, devices: list[str],
                         options: dict[str, Any]) -> list[str]:
        opts = options_in("CreatePool", options)
        paths = [check_string(d, "a device") for d in devices]
        block = opts.get("block-size")
        job, record = await self.pools.as_job("pool-create", caller, lambda accept:
            self.pools.create_pool(
                check_string(name, "name"), paths, force=opts.get("force", False),
                block_size=block, on_full=opts.get("on-full", "queue"),
                low_water_percent=opts.get("low-water", 20), data_size=opts.get("data-size"),
                no_space_timeout=opts.get("no-space-timeout", 60),
                metadata_size=opts.get("metadata-size"),
                caller=caller, accept=accept))
        return [pool_path(record.uuid), job_path(job.id)]

    async def ImportPool(self, caller: Caller, devices: list[str],
                         options: dict[str, Any]) -> list[str]:
        options_in("ImportPool", options)
        paths = [check_string(d, "a device") for d in devices]
        job, record = await self.pools.as_job("pool-import", caller, lambda accept:
            import_pool(self.pools, paths, caller=caller, accept=accept))
        return [pool_path(record.uuid), job_path(job.id)]

    async def ListDisks(self, caller: Caller, options: dict[str, Any]) -> list[Any]:
        options_in("ListDisks", options)
        return [[d.path, d.size_bytes, d.signature, d.busy]
                for d in await self.pools.disks(caller)]

    async def GetPool(self, caller: Caller, name: str) -> str:
        record = await self.pools.pool(check_string(name, "name"))
        return pool_path(record.uuid)
