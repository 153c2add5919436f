"""A volume's device made or removed (Activate, Deactivate), the devices a
pool's active volumes lack after an import or a start, and how an
Activate or Deactivate cut short is settled: the record follows the device."""

from __future__ import annotations

import logging
from dataclasses import replace

from dmd.engine import UdevWait
from dmd.engine.interface import Engine
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Caller
from dmd.service.journal import (
    Journal,
    PoolArgs,
    VolumeActivateStep,
)
from dmd.service.pools import cache, crypt, revert
from dmd.service.pools.core import (
    Accept,
    PoolCore,
    Recover,
    ignore,
)
from dmd.service.pools.names import (
    volume_device,
)
from dmd.service.pools.tables import volume_uuid
from dmd.state import IntentRecord, PoolRecord, VolumeRecord

log = logging.getLogger(__name__)


async def set_active(pools: PoolCore, pool: str, name: str, active: bool, *,
                     uuid: str | None = None, caller: Caller = ROOT,
                     accept: Accept = ignore, udev_sync: bool = True) -> VolumeRecord:
    """Activate (make its device) or deactivate (remove it; data and record
    stay) a volume. *udev_sync* False: done without waiting for udev's work
    on the device (PoolChange.udev_sync)."""
    async with pools.change(pool) as change:
        change.udev_sync = udev_sync
        volume = await change.volume(name, uuid)
        await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)
        if not active:
            pools.check_uncached(volume, "deactivating")
        device = volume_device(pool, name)
        present = await pools.own_device(volume)
        if active and not present and volume.revert is not None:
            volume = await revert.apply(change, volume)  # the data it is to show
        changed = replace(volume, active=active)
        await change.accepted(changed, accept)

        async def match(_: Journal) -> None:
            await match_device(pools, volume)

        async with change.intent(
                "volume-activate" if active else "volume-deactivate",
                          f"{pool}/{name}", PoolArgs(pool=pool, volume=volume.to_json()),
                          match, roll_forward=match) as journal:
            await journal.mark(VolumeActivateStep.DEVICE)
            # udev's work on the device is waited for as the change ends
            # (or not: udev_sync).
            if active and not present:
                await activate(pools, volume, change.udev)
                if volume.encryption is not None and volume.encryption.unlocked:
                    pools.shown.wait(volume.uuid, "waiting for a key: Unlock with one")
            elif not active and present:
                await crypt.close_cleartext(pools, pool, name)
                pools.shown.stop_waiting(volume.uuid)
                await pools.remove_closed(device, pools.owner(pool), change.udev)
            journal.no_way_back()  # the device is what it is to be: the record follows
            await journal.mark(VolumeActivateStep.RECORD)
            if changed != volume:
                await change.write(update=changed)
    return changed


async def activate_recorded(pools: PoolCore, pool: str) -> None:
    """Every active volume without its device record (an import, or
    records taken from the devices) gets its device, or, where the
    kernel has it (made by a dmd whose database was lost), its record."""
    names = {d.name for d in await pools.kernel(Engine.list_devices)}
    for volume in await pools.store.list_volumes(pool):
        device = volume_device(pool, volume.name)
        if not volume.active or await pools.store.get_device(device) is not None:
            continue
        if device in names:
            info = await pools.kernel(Engine.device_info, device)
            if info.uuid != volume_uuid(volume.uuid):
                raise errors.AlreadyExists(f"{device} exists and is not volume "
                                           f"{volume.uuid}")
            await pools.devices.adopt(device, persistent=True, claim=pools.owner(pool))
            log.info("volume %s/%s: its device recorded", pool, volume.name)
        else:
            await activate(pools, volume)
            log.info("volume %s/%s: activated", pool, volume.name)


async def activate(pools: PoolCore, volume: VolumeRecord,
                   later: list[UdevWait] | None = None) -> None:
    """*later*: udev's work on the new node is added to it, not waited for
    (a cached volume's is waited for: its devices are stacked)."""
    if volume.cache is not None:
        await cache.activate_cached(pools, volume)
        return
    await pools.devices.create(
        volume_device(volume.pool, volume.name), await pools.volume_table(volume),
        uuid=volume_uuid(volume.uuid), persistent=True, claim=pools.owner(volume.pool),
        later=later)


async def match_device(pools: PoolCore, volume: VolumeRecord) -> str:
    """Make the volume's record say what its device is: active while it
    has one, inactive when not (an Activate or Deactivate cut short, or
    undone); "done" if the record changed, else "rolled_back"."""
    now = await pools.recorded(volume)
    if now is None:
        return "rolled_back"
    present = await pools.own_device(now)
    if now.active != present:
        await pools.record_change(volume.pool, update=replace(now, active=present))
        return "done"
    return "rolled_back"


async def recover(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                  record: PoolRecord | None) -> str | None:
    """After a crash (dmd.service.pools.recovery): the record follows the device."""
    if record is None:
        return "rolled_back"
    pools.claim(args.pool)
    assert args.volume is not None
    return await match_device(pools, VolumeRecord.from_json(args.volume))


RECOVERY: dict[str, Recover] = {"volume-activate": recover, "volume-deactivate": recover}
