"""Thick volumes: segments of the room on a pool's devices
(dmd.service.pools.room), zeroed before any device maps them, recorded (the
record is what reserves them), then mapped; and how each step is finished or
undone after a crash."""

from __future__ import annotations

import contextlib
import logging
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import replace

from dmd.service import errors
from dmd.service.auth import Caller
from dmd.service.journal import (
    Journal,
    PoolArgs,
    ThickResizeStep,
    VolumeCreateStep,
    VolumeDeleteStep,
)
from dmd.service.pools import activation, content, crypt
from dmd.service.pools.core import (
    Accept,
    PoolChange,
    PoolCore,
    Recover,
)
from dmd.service.pools.crypt import EncryptionRequest
from dmd.service.pools.names import (
    volume_device,
)
from dmd.service.pools.room import allocate, check_stripes, thick_table
from dmd.state import Encryption, IntentRecord, PoolRecord, Thick, VolumeRecord

log = logging.getLogger(__name__)


async def create_thick(change: PoolChange, record: PoolRecord, name: str, size: int, stripes: int,
                        stripe_size: int | None, labels: dict[str, str],
                        filesystem: str | None, encryption: EncryptionRequest | None,
                        caller: Caller, accept: Accept) -> VolumeRecord:
    """Allocate, record (the record is what reserves the segments), make
    the device, then encrypt and make a filesystem as a thin volume's
    create does. Undone on error; a crash at any step undoes it all."""
    pools, pool = change.core, record.name
    await pools.check_devices(record)
    stripe_sectors = check_stripes(record.layout, stripes, stripe_size)
    segments = allocate(record.layout, size // 512, stripes, stripe_sectors,
                        await pools.thick_segments(pool))
    thick = Thick(segments, stripes, stripe_sectors)
    volume = VolumeRecord(
        str(uuidlib.uuid4()), pool, name, None, thick.sectors * 512, None, caller.uid,
        labels, True,
        encryption=Encryption(str(uuidlib.uuid4()), encryption.key_description)
        if encryption is not None else None, thick=thick)
    pools.check_fits(record, await change.volumes(), volume)

    async def undo(journal: Journal) -> None:
        await undo_thick(pools, volume)

    async with change.intent("volume-create-thick", f"{pool}/{name}",
                      PoolArgs(pool=pool, volume=volume.to_json()), undo) as journal:
        change.show(volume, "creating")
        await change.accepted(volume, accept)
        await journal.mark(VolumeCreateStep.RECORD)
        # Segments a deleted volume held still hold its data: zeroed on
        # the pool's devices before any device maps them.
        await pools.zero_segments(record.layout, segments)
        await change.write(add=volume)
        await journal.mark(VolumeCreateStep.ACTIVATE)
        await activation.activate(pools, volume)
        await content.prepare(pools, journal, volume, encryption, filesystem)
    log.info("volume-create %s/%s: thick, %d segment(s), %d stripe(s), %d bytes%s%s", pool,
             name, len(segments), stripes, volume.size_bytes,
             ", luks2" if encryption else "", f", {filesystem}" if filesystem else "")
    return volume


async def undo_thick(pools: PoolCore, volume: VolumeRecord) -> None:
    """A thick volume's devices and record gone (what is not there is fine)."""
    await pools.remove_volume_devices(volume)
    if any(v.uuid == volume.uuid for v in await pools.store.list_volumes(volume.pool)):
        await pools.record_change(volume.pool, remove=volume.uuid)


async def delete_thick(change: PoolChange, volume: VolumeRecord) -> None:
    """Devices, then the record (which frees the segments): past the
    devices' removal it rolls forward."""
    pools, pool, name = change.core, volume.pool, volume.name

    async def finish(_: Journal) -> None:
        await undo_thick(pools, volume)

    async with change.intent("volume-delete-thick", f"{pool}/{name}",
                      PoolArgs(pool=pool, volume=volume.to_json()),
                      roll_forward=finish) as journal:
        await journal.mark(VolumeDeleteStep.DEACTIVATE)
        await crypt.close_cleartext(pools, pool, name)
        with contextlib.suppress(errors.NotFound):
            await pools.remove_closed(volume_device(pool, name), pools.owner(pool))
        journal.no_way_back()
        await journal.mark(VolumeDeleteStep.RECORD)
        await change.write(remove=volume.uuid)


async def grow_thick(change: PoolChange, volume: VolumeRecord, size: int, *,
                     then: Callable[[Journal], Awaitable[None]] | None = None) -> VolumeRecord:
    """More segments (another run of stripes), recorded (reserved) before
    the device's table takes them; a crash between is finished by
    reloading the recorded table. *then*: the last step of the same intent
    (its failure undoes the growth, unless it said no_way_back)."""
    assert volume.thick is not None
    pools, pool, thick = change.core, volume.pool, volume.thick
    record = await change.record()
    await pools.check_devices(record)
    more = allocate(record.layout, (size - volume.size_bytes) // 512, thick.stripes,
                    thick.stripe_sectors, await pools.thick_segments(pool))
    grown_thick = replace(thick, segments=(*thick.segments, *more))
    grown = replace(volume, thick=grown_thick, size_bytes=grown_thick.sectors * 512)
    pools.check_fits(record, await change.volumes(), grown)

    async def undo(journal: Journal) -> None:
        await change.write(update=volume)
        if volume.active:
            await pools.devices.reload(volume_device(pool, volume.name),
                                      thick_table(record.layout, thick),
                                      claim=pools.owner(pool))

    async with change.intent("volume-resize-thick",
                      f"{pool}/{volume.name}",
                      PoolArgs(pool=pool, volume=grown.to_json(),
                               old_size=volume.size_bytes), undo) as journal:
        # Zeroed on the pool's devices first, active volume or not: no
        # device maps them before, so nobody ever reads what they held.
        await journal.mark(ThickResizeStep.ZERO)
        await pools.zero_segments(record.layout, more)
        await journal.mark(ThickResizeStep.RECORD)
        await change.write(update=grown)
        if volume.active:
            await journal.mark(ThickResizeStep.RELOAD)
            await pools.devices.reload(volume_device(pool, volume.name),
                                      thick_table(record.layout, grown_thick),
                                      claim=pools.owner(pool))
        if then is not None:
            await then(journal)
    return grown


# -- after a crash (dmd.service.pools.recovery) -----------------------------
async def recover_create(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                         record: PoolRecord | None) -> str | None:
    if record is None:
        return "rolled_back"
    pools.claim(args.pool)
    assert args.volume is not None
    await undo_thick(pools, VolumeRecord.from_json(args.volume))  # half-made: no volume
    return "rolled_back"


async def recover_delete(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                         record: PoolRecord | None) -> str | None:
    if record is None:
        return "rolled_back"
    pools.claim(args.pool)
    assert args.volume is not None
    await undo_thick(pools, VolumeRecord.from_json(args.volume))  # rolls forward once begun
    return "done"


async def recover_grow(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                       record: PoolRecord | None) -> str | None:
    """The device takes whatever the record says: the grown segments if
    they were recorded (reserved, zeroed before), else its old ones."""
    if record is None:
        return "rolled_back"
    pools.claim(args.pool)
    assert args.volume is not None
    volume = VolumeRecord.from_json(args.volume)
    now = await pools.recorded(volume)
    device = volume_device(args.pool, volume.name)
    if now is not None and now.active and await pools.store.get_device(device) is not None:
        await pools.devices.reload(device, await pools.volume_table(now),
                                   claim=pools.owner(args.pool))
    return "done"


RECOVERY: dict[str, Recover] = {"volume-create-thick": recover_create,
                                "volume-delete-thick": recover_delete,
                                "volume-resize-thick": recover_grow}
