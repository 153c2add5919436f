"""What a volume is called and labelled, changed after its creation: Rename
(its device renamed, its UUID, object path and owner kept) and SetLabels
(what a service keeps with its volume: a container runtime's snapshot key
and parent, a VM manager's disk name). Both are in the records and the
pool's description alike, so they survive a lost state directory and travel
with ImportPool."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import replace

from dmd.engine import DevId, DmError
from dmd.engine.interface import Engine
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Caller
from dmd.service.devices.operations import check_labels
from dmd.service.journal import (
    Journal,
    PoolArgs,
    PoolRenameStep,
    VolumeLabelsStep,
    VolumeRenameStep,
)
from dmd.service.pools import crypt
from dmd.service.pools.core import PoolChange, PoolCore, Recover
from dmd.service.pools.names import (
    PoolName,
    VolumeName,
    check_cleartext,
    claim_prefix,
    cleartext_device,
    in_pool,
    volume_device,
)
from dmd.service.pools.tables import volume_uuid
from dmd.state import IntentRecord, PoolRecord, RecordExists, VolumeRecord

log = logging.getLogger(__name__)


async def set_labels(pools: PoolCore, pool: str, name: str, labels: Mapping[str, str], *,
                     uuid: str | None = None, caller: Caller = ROOT) -> VolumeRecord:
    """Replace the volume's labels with *labels* (within the bounds every
    label has: dmd.service.devices.operations.check_labels), journaled:
    a crash leaves the old labels or the new, in the records and, once dmd
    is back, in the description."""
    clean = check_labels(labels)
    async with pools.change(pool) as change:
        volume = await change.volume(name, uuid)
        await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)
        changed = replace(volume, labels=clean)
        if changed == volume:
            return volume
        pools.check_fits(await change.record(), await change.volumes(), changed)
        async with change.intent("volume-set-labels", f"{pool}/{name}",
                                 PoolArgs(pool=pool, volume=changed.to_json())) as journal:
            await journal.mark(VolumeLabelsStep.RECORD)
            await change.write(update=changed)
    log.info("volume-set-labels %s/%s: %d label(s)", pool, name, len(clean))
    return changed


async def rename_volume(pools: PoolCore, pool: str, name: str, new_name: str, *,
                        uuid: str | None = None, caller: Caller = ROOT) -> VolumeRecord:
    """Give the volume another name: its device (if active) renamed, then
    its record; its UUID, object path, owner, data and snapshots stay.
    Refused (Busy) while it has a cache or is unlocked: their devices carry
    the volume's name in DM UUIDs the kernel never changes (DetachCache or
    Lock it first)."""
    new_name = VolumeName(new_name, pool)
    async with pools.change(pool) as change:
        volume = await change.volume(name, uuid)
        await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)
        if new_name == volume.name:
            return volume
        await change.check_new_name(new_name)
        pools.check_uncached(volume, "renaming")
        await pools.check_not_a_cache(volume)
        old_device, new_device = volume_device(pool, name), volume_device(pool, new_name)
        taken = [new_device]
        if volume.encryption is not None:
            check_cleartext(pool, new_name)
            if await crypt.cleartext_present(pools, pool, name):
                raise errors.Busy(f"volume {pool}/{name} is unlocked: Lock it to rename it")
            taken.append(cleartext_device(pool, new_name))
        for device in taken:
            # Inactive or not: the name must be free when it is activated.
            if await pools.store.get_device(device) is not None or \
                    await pools.in_kernel(device):
                raise errors.AlreadyExists(f"a device named {device} exists: {pool}/{new_name} "
                                           "would be its name")
        renamed = replace(volume, name=new_name)
        pools.check_fits(await change.record(), await change.volumes(), renamed)
        claim = pools.owner(pool)
        active = await pools.own_device(volume)

        async def undo(journal: Journal) -> None:
            # Back: the device (if renamed) takes its old name again; the
            # record was not written (its write is the last step).
            if await _kernel_name(pools, volume) == new_device:
                await pools.devices.rename(new_device, old_device, claim=claim)

        async with change.intent("volume-rename", f"{pool}/{name}",
                                 PoolArgs(pool=pool, volume=renamed.to_json()),
                                 undo) as journal:
            await journal.mark(VolumeRenameStep.DEVICE)
            if active:
                await pools.devices.rename(old_device, new_device, claim=claim)
            await journal.mark(VolumeRenameStep.RECORD)
            await change.write(update=renamed)
    log.info("volume-rename %s/%s: now %s/%s", pool, name, pool, new_name)
    return renamed


async def rename_pool(pools: PoolCore, pool: str, new_name: str, *,
                      caller: Caller = ROOT) -> PoolRecord:
    """Give a stopped pool another name: one record transaction, then its
    description. Chosen: only while stopped (Pool.Stop), when none of its
    devices has a name to change: Start makes them under the new one."""
    new_name = PoolName(new_name)
    async with contextlib.AsyncExitStack() as locks:
        # Both names held, in one order for every rename (two renames the
        # other way round never wait for each other): a create or an import
        # of the new name meanwhile would otherwise race the record.
        if new_name < pool:
            await locks.enter_async_context(pools.locks.hold(new_name))
        change = await locks.enter_async_context(pools.change(pool, stopped=True))
        if new_name > pool:
            await locks.enter_async_context(pools.locks.hold(new_name))
        renamed = await _rename_stopped(pools, change, pool, new_name, caller)
    log.info("pool-rename %s: now %s", pool, new_name)
    return renamed


async def _rename_stopped(pools: PoolCore, change: PoolChange, pool: str, new_name: str,
                          caller: Caller) -> PoolRecord:
    record = await change.record()
    await pools.check_authorized(caller, Action.POOL, pool, record.owner_uid)
    if new_name == pool:
        return record
    if not record.stopped:
        raise errors.Busy(f"pool {pool!r} is running: Stop it to rename it (its devices "
                          "are made under the new name when it is started)")
    if await pools.store.get_pool(new_name) is not None:
        raise errors.AlreadyExists(f"a pool named {new_name!r} exists")
    for volume in await change.volumes():
        VolumeName(volume.name, new_name)  # its devices' names fit the kernel's bound
        if volume.encryption is not None:
            check_cleartext(new_name, volume.name)
        # A cache is named by its path (/dev/mapper/POOL-VOLUME) in its
        # user's record, maybe another pool's.
        pools.check_uncached(volume, "renaming its pool")
        await pools.check_not_a_cache(volume)
    taken = [d.name for d in await pools.kernel(Engine.list_devices)
             if in_pool(d.name, claim_prefix(new_name))]
    if taken:
        raise errors.AlreadyExists(f"devices named {', '.join(sorted(taken))} exist: "
                                   f"pool {new_name!r}'s would be named so")
    async with change.intent("pool-rename", pool,
                             PoolArgs(pool=pool, new_name=new_name)) as journal:
        await journal.mark(PoolRenameStep.RECORD)
        try:  # the name's uniqueness is the database's (a create of it meanwhile)
            renamed = await pools.store.rename_pool(pool, new_name)
        except RecordExists:
            raise errors.AlreadyExists(f"a pool named {new_name!r} exists") from None
    pools.release(pool)
    pools.claim(new_name)
    pools.stopped.discard(pool)
    pools.stopped.add(new_name)
    change.describe_at_end = False  # stopped: its disks are described by Start
    await pools.settle(new_name)  # the bus shows it under its new name, same object
    return renamed


async def recover_pool_rename(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                              record: PoolRecord | None) -> str | None:
    """One record transaction: under which name the pool is recorded says."""
    return "done" if record is None and args.new_name is not None and \
        await pools.store.get_pool(args.new_name) is not None else "rolled_back"


async def _kernel_name(pools: PoolCore, volume: VolumeRecord) -> str | None:
    """The name of the volume's device in the kernel (found by its DM UUID),
    or None when it has none."""
    try:
        info = await pools.kernel(Engine.device_info, DevId.uuid(volume_uuid(volume.uuid)))
    except DmError:
        return None
    return info.name


async def recover_rename(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                         record: PoolRecord | None) -> str | None:
    """After a crash: the record follows the device, found by its DM UUID in
    the kernel, else by the device records (its pool may not be up yet).
    Under the new name, the record takes it ("done"); under the old one, the
    record keeps or takes that ("rolled_back"); with no device at all (an
    inactive volume), the record stands as written."""
    if record is None:
        return "rolled_back"
    pools.claim(args.pool)
    assert args.volume is not None
    new = VolumeRecord.from_json(args.volume)
    old_name = intent.device.split("/", 1)[1]
    now = await pools.recorded(new)
    if now is None:
        return "rolled_back"
    where = await _kernel_name(pools, new)
    if where is None:
        for candidate in (new.name, old_name):
            device = await pools.store.get_device(volume_device(new.pool, candidate))
            if device is not None and device.uuid == volume_uuid(new.uuid):
                where = device.name
    forward = (where == volume_device(new.pool, new.name)
               or (where is None and now.name == new.name))
    name = new.name if forward else old_name
    if now.name != name:
        await pools.record_change(new.pool, update=replace(now, name=name))
    return "done" if forward else "rolled_back"


async def recover(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                  record: PoolRecord | None) -> str | None:
    """The record was written in one transaction, or not at all: which one
    says how the intent ended."""
    assert args.volume is not None
    wanted = VolumeRecord.from_json(args.volume)
    now = await pools.recorded(wanted) if record is not None else None
    return "done" if now is not None and now.labels == wanted.labels else "rolled_back"


RECOVERY: dict[str, Recover] = {"volume-set-labels": recover, "volume-rename": recover_rename,
                                "pool-rename": recover_pool_rename}
