"""A pool's metadata checked before the pool is made, and repaired.

Whenever a pool's thin-pool device is made over metadata that no pool had
open (dmd's start after a reboot, Pool.Start, ImportPool), ``thin_check``
reads it first, as LVM does at each activation; a metadata found whole has
its needs_check flag cleared. A damaged one leaves the pool without its
thin-pool device, shown with Mode "damaged" and what thin_check said, and
every change but Repair, Stop and Destroy refused (Corrupt).

Repair (as LVM's ``lvconvert --repair``): the pool's devices are removed
(Busy while anything outside the pool holds one), ``thin_repair`` writes a
mended copy into the pool's spare metadata area (reserved at CreatePool;
topped up from the room, or taken from it for a pool made without one),
``thin_check`` passes it, and every thin id the records name must be in it
(a volume whose thin id the repair could not find is named, and nothing
changes). Then the records swap the two areas, the commit point: the
metadata is the mended copy, and the damaged area is the next repair's
spare. The pool's devices and its active volumes' are made again (a stopped
pool stays stopped). A crash before the swap leaves the old metadata as it
was; after it, recovery finishes the devices.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import replace

from dmd.engine import ThinToolError
from dmd.engine.interface import Engine
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Caller
from dmd.service.jobs import progress, work_bytes
from dmd.service.journal import Journal, PoolArgs, PoolRepairStep
from dmd.service.pools import revert, stopping
from dmd.service.pools.core import Accept, PoolChange, PoolCore, Recover, ignore
from dmd.service.pools.names import PoolPart, join, pool_device
from dmd.service.pools.room import carve
from dmd.service.pools.tables import linear
from dmd.state import IntentRecord, PoolLayout, PoolRecord, Segment, VolumeRecord

log = logging.getLogger(__name__)

# What the kernel says of a pool it stopped after a metadata error.
KERNEL_FLAGGED = ("needs-check", "read-only")


def spare_device(pool: str) -> str:
    """The device over the spare area while a repair writes it: a name no
    volume's device can have ("tmeta" is no volume's name)."""
    return join(pool, PoolPart.TMETA, "spare")


def repaired_layout(layout: PoolLayout, thick: tuple[Segment, ...]) -> PoolLayout:
    """The layout after a repair: the metadata in the spare area (topped up
    to the metadata's size from the room, never from the *thick* volumes'
    segments), the old metadata area the spare."""
    spare = layout.spare
    short = layout.metadata_sectors - layout.spare_sectors
    if short > 0:
        try:
            spare = (*spare, *carve(layout, short, thick))
        except errors.InvalidArgument:
            raise errors.InvalidArgument(
                f"the pool has no room for a repaired copy of its metadata "
                f"({layout.metadata_sectors * 512} bytes, {layout.spare_sectors * 512} of them "
                "reserved): delete a thick volume to make room, or stop the pool and copy "
                "its metadata out with thin_repair yourself") from None
    else:
        # A spare larger than the metadata (grown since): only what is needed.
        spare = _first(spare, layout.metadata_sectors)
    return replace(layout, metadata=spare, spare=layout.metadata)


def _first(segments: tuple[Segment, ...], sectors: int) -> tuple[Segment, ...]:
    out: list[Segment] = []
    for seg in segments:
        if sectors <= 0:
            break
        out.append(replace(seg, length=min(seg.length, sectors)))
        sectors -= out[-1].length
    return tuple(out)


async def repair_pool(pools: PoolCore, pool: str, *, devices: Sequence[str] | None = None,
                      accept_loss: bool = False, caller: Caller = ROOT,
                      accept: Accept = ignore) -> PoolRecord:
    """*devices*: a stopped pool's disks where they are now, as for Start;
    *accept_loss*: volumes whose thin id the repair cannot find are
    forgotten (else nothing changes, and they are named)."""
    async with pools.change(pool, stopped=True, damaged=True) as change:
        record = await change.record()
        await pools.check_authorized(caller, Action.POOL, pool, record.owner_uid)
        state = await pools.pool_state(pool, record)
        if not (record.stopped or pool in pools.damaged or state.mode in KERNEL_FLAGGED):
            raise errors.InvalidArgument(
                f"pool {pool!r}: its metadata is not known to be damaged (Mode {state.mode}); "
                "to repair it anyway, Stop it first")
        if devices is not None and not record.stopped:
            raise errors.InvalidArgument("devices: for a stopped pool whose disks moved")
        if record.stopped:
            # Written to below: the disks Start would check, checked as Start does.
            if devices is not None:
                record = replace(record, layout=await stopping.moved(pools, record, devices))
            await pools.check_devices(record)
            await stopping.check_described(pools, record)
        volumes = await change.volumes()
        await stopping.check_no_cache(pools, pool, volumes, "repairing")
        await stopping.check_not_held(pools, pool, "repair")
        present = {d.name for d in await pools.kernel(Engine.list_devices)}
        if spare_device(pool) in present:
            raise errors.AlreadyExists(f"a device named {spare_device(pool)} exists")
        new_layout = repaired_layout(record.layout, await pools.thick_segments(pool))
        repaired = replace(record, layout=new_layout)
        wanted = sorted({v.thin_id for v in volumes if v.thin_id is not None} |
                        {v.revert.thin_id for v in volumes if v.revert is not None})

        async def undo(_: Journal) -> None:
            await _remove(pools, pool, spare_device(pool))
            if record.stopped:
                await pools.remove_pool_devices(pool)
            else:  # as it was (a damaged pool: its metadata and data devices)
                await stopping.make_devices(pools, record)

        ids: set[int] = set()

        async def finish(_: Journal) -> None:
            if accept_loss:
                await _forget_lost(pools, pool, ids)
            await _devices_up(pools, repaired, change)

        async with change.intent("pool-repair", pool,
                                 PoolArgs(pool=pool, layout=new_layout.to_json(),
                                          accept_loss=accept_loss),
                                 undo, roll_forward=finish) as journal:
            change.show(record, "repairing")
            await change.accepted(record, accept)
            await journal.mark(PoolRepairStep.DEVICES)
            await pools.remove_pool_devices(pool, closed=True)
            await pools.create_pool_devices(record, PoolPart.TMETA)
            await journal.mark(PoolRepairStep.COPY)
            await pools.devices.create(spare_device(pool), linear(new_layout,
                                                                  new_layout.metadata),
                                       claim=change.owner)
            await pools.wipe_metadata(new_layout)
            ids |= await _copy(pools, record, wanted, volumes, accept_loss)
            # Both areas hold whole metadata now: the disks' description
            # names the new one before the records do, so an import after a
            # crash and a lost state finds it.
            await change.describe_pending("pool-repair", layout=new_layout)
            await journal.mark(PoolRepairStep.SWITCH)
            journal.no_way_back()
            await change.write(layout=new_layout)
            pools.damaged.pop(pool, None)
            if accept_loss:
                await journal.mark(PoolRepairStep.FORGET)
                await _forget_lost(pools, pool, ids)
            await journal.mark(PoolRepairStep.DEVICES_UP)
            await _devices_up(pools, repaired, change)
    log.info("pool-repair %s: metadata repaired into its spare area", pool)
    return repaired


async def _copy(pools: PoolCore, record: PoolRecord, wanted: list[int],
                volumes: list[VolumeRecord], accept_loss: bool) -> set[int]:
    """The mended copy written and checked; the thin ids it holds."""
    pool, spare = record.name, spare_device(record.name)
    meta = pool_device(pool, PoolPart.TMETA)
    # The job's size is the metadata read: thin_repair tells nothing on the
    # way, so its Bytes are done when it ends (then the check of the copy).
    size = record.layout.metadata_sectors * 512
    work_bytes(0, size)
    try:
        await pools.kernel.slow(Engine.thin_repair, meta, spare, record.transaction_id,
                                record.block_sectors,
                                record.layout.data_sectors // record.block_sectors)
        work_bytes(size, size)
        progress(0.7)
        found = await pools.kernel.slow(Engine.thin_check, spare)
        if not found.ok:
            raise errors.Failed(f"pool {pool!r}: the repaired copy fails thin_check "
                                f"({found.report}); nothing changed")
        ids = set(await pools.kernel.slow(Engine.thin_ids, spare))
        # on the disk before the records name it (thin_repair does not flush)
        await pools.kernel.slow(_flush, spare)
    except (ThinToolError, OSError) as exc:
        raise errors.Failed(f"pool {pool!r}: the repair failed: {exc}; nothing changed") \
            from None
    lost = [v.name for v in volumes if _lost(v, ids)]
    if (lost or not set(wanted) <= ids) and not accept_loss:
        raise errors.Failed(f"pool {pool!r}: the repair found no mapping of "
                            f"{', '.join(sorted(lost)) or 'a scheduled revert'}; nothing "
                            "changed (the damaged metadata is as it was): Repair with "
                            "accept-loss forgets them and keeps the rest")
    if lost:
        log.warning("pool-repair %s: no mapping found of %s: forgotten (accept-loss)",
                    pool, ", ".join(sorted(lost)))
    return ids


def _lost(volume: VolumeRecord, ids: set[int]) -> bool:
    """A thin volume the repaired metadata has nothing of: neither its thin
    id nor a scheduled revert's copy (that one becomes its data when the
    revert is applied, as the pool comes up)."""
    return volume.thin_id is not None and volume.thin_id not in ids and (
        volume.revert is None or volume.revert.thin_id not in ids)


async def _forget_lost(pools: PoolCore, pool: str, ids: set[int]) -> None:
    """The records follow the repaired metadata (accept-loss): a volume
    with nothing in it is forgotten; a scheduled revert whose copy it lacks
    is dropped (the volume keeps the data it has). Each is logged."""
    for volume in await pools.store.list_volumes(pool):
        if _lost(volume, ids):
            await pools.record_change(pool, remove=volume.uuid)
            log.warning("pool-repair %s: volume %s forgotten (its mappings were not found)",
                        pool, volume.name)
        elif volume.revert is not None and volume.revert.thin_id not in ids:
            await pools.record_change(pool, update=replace(volume, revert=None))
            log.warning("pool-repair %s: the revert scheduled for %s dropped (its copy's "
                        "mappings were not found)", pool, volume.name)


def _flush(engine: Engine, device: str) -> None:
    fd = engine.open_node(device, os.O_RDONLY)
    try:
        os.fsync(fd)  # a block device's fsync flushes its write cache
    finally:
        os.close(fd)


async def _devices_up(pools: PoolCore, record: PoolRecord,
                      change: PoolChange | None = None) -> None:
    """The spare device and the old metadata device removed, the old
    metadata's superblock zeroed (it is the spare now: nothing may take it
    for a pool), the pool's devices made over the new layout, scheduled
    reverts applied, then its active volumes' devices (a stopped pool's:
    none; its description is written, its disks checked by the repair)."""
    pool = record.name
    await _remove(pools, pool, spare_device(pool))
    await _remove(pools, pool, pool_device(pool, PoolPart.TMETA))
    await pools.wipe_metadata(replace(record.layout, metadata=record.layout.spare))
    if record.stopped:
        if change is not None:
            await pools.describe(pool, checked=True)
        return
    await stopping.make_devices(pools, record, volumes=False)
    if change is not None and pool not in pools.damaged:
        await revert.apply_scheduled(change)
    await stopping.volumes_up(pools, pool)


async def _remove(pools: PoolCore, pool: str, device: str) -> None:
    """*device* removed once closed (each tool that wrote it is followed by
    udev's probe), and its record."""
    with contextlib.suppress(errors.NotFound):
        await pools.remove_closed(device, pools.owner(pool))
    if await pools.devices.store.get_device(device) is not None:
        await pools.devices.store.remove_device(device)


# -- after a crash (dmd.service.pools.recovery) -----------------------------
async def recover_repair(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                         record: PoolRecord | None) -> str | None:
    """Once the records name the new metadata, its devices are made;
    before, the spare device goes and the pool is as it was."""
    if record is None:
        return "rolled_back"
    pools.claim(args.pool)
    assert args.layout is not None
    if record.layout == PoolLayout.from_json(args.layout):
        await pools.remove_pool_devices(args.pool)
        if args.accept_loss:  # the forgetting may have been cut short
            await pools.create_pool_devices(record, PoolPart.TMETA)
            try:
                ids = set(await pools.kernel.slow(Engine.thin_ids,
                                                  pool_device(args.pool, PoolPart.TMETA)))
            except ThinToolError as exc:
                raise errors.Failed(f"pool {args.pool!r}: its repaired metadata cannot be "
                                    f"read: {exc}") from None
            await _forget_lost(pools, args.pool, ids)
        await _devices_up(pools, record)
        if record.stopped:  # its disks were checked by the repair cut short
            await pools.describe(args.pool, checked=True)
        return "done"
    await _remove(pools, args.pool, spare_device(args.pool))
    if record.stopped:
        await pools.remove_pool_devices(args.pool)
    else:
        await stopping.make_devices(pools, record)
    return "rolled_back"


RECOVERY: dict[str, Recover] = {"pool-repair": recover_repair}
