"""What dmd puts on the bus: the exporters and the router that maps every
object path to its interface's handlers."""

from __future__ import annotations

from typing import Any

from dmd.dbus.bus import DmdBus
from dmd.dbus.exporter import Exporter
from dmd.dbus.handlers import DeviceHandlers, ManagerHandlers
from dmd.dbus.interfaces import (
    DeviceInterface,
    JobInterface,
    ManagerInterface,
    PoolInterface,
    VolumeInterface,
)
from dmd.dbus.names import DEVICES_PATH, JOBS_PATH, POOLS_PATH, VOLUMES_PATH
from dmd.dbus.pool_exporter import PoolExporter
from dmd.dbus.pool_handlers import JobHandlers, PoolHandlers, VolumeHandlers
from dmd.dbus.router import ObjectKind, Router
from dmd.service.devices.inventory import Inventory
from dmd.service.devices.operations import DeviceService
from dmd.service.pools.service import PoolService
from dmd.service.pools.space import SpaceWatch


def _one(value: Any) -> list[Any] | None:
    return None if value is None else [value]


def _all(values: tuple[Any, ...] | None) -> list[Any] | None:
    return None if values is None else list(values)


async def publish(bus: DmdBus, manager: ManagerInterface, service: DeviceService,
                  pools: PoolService, space: SpaceWatch, inventory: Inventory
                  ) -> tuple[Router, Exporter, PoolExporter]:
    """Export every object and route every method; the caller adds the
    router to the bus."""
    exporter = Exporter(bus, inventory)
    pool_exporter = PoolExporter(bus, pools, inventory)
    space.listen(pool_exporter.space_changed)
    await pool_exporter.start()
    pool_handlers = PoolHandlers(pools)
    router = Router(bus, [
        ObjectKind(manager, ManagerHandlers(service, inventory)),
        ObjectKind(manager, pool_handlers),
        ObjectKind(DeviceInterface({}), DeviceHandlers(service, inventory), DEVICES_PATH,
                   lambda path: _one(exporter.name_at(path))),
        ObjectKind(PoolInterface({}), pool_handlers, POOLS_PATH,
                   lambda path: _one(pool_exporter.pool_at(path))),
        ObjectKind(VolumeInterface({}), VolumeHandlers(pools), VOLUMES_PATH,
                   lambda path: _all(pool_exporter.volume_at(path))),
        ObjectKind(JobInterface({}), JobHandlers(pools), JOBS_PATH,
                   lambda path: _one(pool_exporter.job_at(path))),
    ], [exporter, pool_exporter])
    return router, exporter, pool_exporter
