"""Start-up re-creates a pool's devices only over the pool's own disks:
the label on each says whose it is (the device family asks, through
``DeviceService.recreate_guards``)."""

from __future__ import annotations

import logging

from dmd.service import errors
from dmd.service.pools import cache
from dmd.service.pools.core import (
    PoolCore,
)
from dmd.service.pools.names import (
    PoolPart,
    VolumePart,
    claim_prefix,
    in_pool,
    parts,
    pool_of,
)
from dmd.state import DeviceRecord

log = logging.getLogger(__name__)


async def recreate_guard(pools: PoolCore, device: DeviceRecord) -> str | None:
    """DeviceService.recreate_guards: a pool's devices are re-created at
    start-up only over the pool's own disks."""
    pool = pool_of(device.name)
    record = await pools.store.get_pool(pool) if pool is not None else None
    if record is None or not in_pool(device.name, claim_prefix(pool or "")):
        return None
    if record.stopped:
        # A Start cut short (its recovery removes them again): made over the
        # disks Start checked, maybe at paths not recorded yet; each is
        # checked again by its label, the pool never refused for that.
        for line in device.table:
            if line.target_type == "linear":
                path = str(line.params).split()[0]
                label, why = await pools.descriptions.read_label(path)
                if label is None or label.pool_uuid != record.uuid:
                    why = why or "the label of another pool"
                    return f"{path} is no disk of stopped pool {record.name!r} now ({why})"
        return None
    if record.uuid not in pools.disks_checked:
        try:
            await pools.check_devices(record)
            pools.disks_checked[record.uuid] = None
        except errors.Busy as exc:
            pools.disks_checked[record.uuid] = str(exc)
            pools.shown.refuse(record.name, str(exc))
    if pools.disks_checked[record.uuid] is not None:
        return pools.disks_checked[record.uuid]
    split = parts(device.name)
    if split == [record.name, PoolPart.TPOOL]:
        # Over metadata no pool has open (after a reboot): checked first.
        try:
            await pools.check_metadata(record)
        except (errors.Corrupt, errors.Failed) as exc:
            return str(exc)
    elif record.name in pools.damaged and any(line.target_type == "thin"
                                              for line in device.table):
        return f"pool {record.name!r} has no thin-pool device: its metadata is damaged"
    if len(split) == 2 or (len(split) == 3 and split[2] in (VolumePart.CMETA,
                                                             VolumePart.CDATA)):
        # A cache's areas, and the volume's device over them: over the
        # cache's own disk only (its label says).
        volume = next((v for v in await pools.store.list_volumes(record.name)
                       if v.name == split[1]), None)
        if volume is not None:
            try:
                await cache.check_label(pools, volume)
            except errors.Busy as exc:
                return str(exc)
    return None
