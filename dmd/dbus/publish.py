"""What dmd puts on the bus: the exporters and the router that maps every
object path to its interface's handlers."""

from __future__ import annotations

from typing import Any

from dmd.dbus.bus import DmdBus
from dmd.dbus.device import DeviceHandlers, DeviceInterface
from dmd.dbus.exporter import Exporter
from dmd.dbus.job import JobHandlers, JobInterface
from dmd.dbus.manager import ManagerHandlers, ManagerInterface
from dmd.dbus.names import DEVICES_PATH, JOBS_PATH, POOLS_PATH, VOLUMES_PATH
from dmd.dbus.pool import PoolHandlers, PoolInterface
from dmd.dbus.pool_exporter import PoolExporter
from dmd.dbus.router import ObjectKind, Router
from dmd.dbus.volume import VolumeHandlers, VolumeInterface
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
    router = Router(bus, [
        ObjectKind(manager, ManagerHandlers(service, inventory, pools)),
        ObjectKind(DeviceInterface({}), DeviceHandlers(service, inventory), DEVICES_PATH,
                   lambda path: _one(exporter.name_at(path))),
        ObjectKind(PoolInterface({}), PoolHandlers(pools), POOLS_PATH,
                   lambda path: _one(pool_exporter.pool_at(path))),
        ObjectKind(VolumeInterface({}), VolumeHandlers(pools), VOLUMES_PATH,
                   lambda path: _all(pool_exporter.volume_at(path))),
        ObjectKind(JobInterface({}), JobHandlers(pools), JOBS_PATH,
                   lambda path: _one(pool_exporter.job_at(path))),
    ], [exporter, pool_exporter])
    return router, exporter, pool_exporter
