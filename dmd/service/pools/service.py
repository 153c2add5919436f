"""The pool family's verbs, as one object: what the bus, dmctl and the tests
call. Each verb is the function of the module that owns its operation
(given this service as its ``PoolCore``); nothing here holds a rule of its
own, so what an operation does is read in one place (see
dmd.service.pools.core for how an operation on a pool runs)."""

from __future__ import annotations

import functools

from dmd.service.devices.operations import DeviceService
from dmd.service.pools import (
    activation,
    guard,
    lifecycle,
    naming,
    repair,
    stopping,
    thick,
    volumes,
)
from dmd.service.pools import revert as reverting
from dmd.service.pools.core import PoolCore, PoolState, check_size, layout, metadata_low
from dmd.service.pools.tables import volume_uuid

__all__ = ["PoolService", "PoolState", "check_size", "layout", "metadata_low", "volume_uuid"]


class PoolService(PoolCore):
    def __init__(self, devices: DeviceService) -> None:
        super().__init__(devices)
        devices.recreate_guards.append(functools.partial(guard.recreate_guard, self))

    create_pool = lifecycle.create_pool
    destroy_pool = lifecycle.destroy_pool
    finish_destroy = lifecycle.finish_destroy
    add_device = lifecycle.add_device
    create_volume = volumes.create_volume
    snapshot = volumes.snapshot
    delete_volume = volumes.delete_volume
    finish_delete = volumes.finish_delete
    resize_volume = volumes.resize_volume
    undo_thin = volumes.undo_thin
    match_size = volumes.match_size
    undo_thick = thick.undo_thick
    set_active = activation.set_active
    set_labels = naming.set_labels
    rename_volume = naming.rename_volume
    rename_pool = naming.rename_pool
    revert = reverting.revert
    stop_pool = stopping.stop_pool
    start_pool = stopping.start_pool
    repair_pool = repair.repair_pool
    activate_recorded = activation.activate_recorded
    match_device = activation.match_device
