"""Revert: a snapshot's data becomes its origin's; the origin keeps its
name, UUID, object, owner and labels.

Two journaled steps, each whole or not at all:

1. Scheduling (``volume-revert``): a copy of the snapshot as it is now, a
   thin id of its own (create_snap, the snapshot's device suspended for the
   moment if it has one), named by the origin's record (``revert``). Undone
   until recorded: the copy's thin id is deleted.
2. Applying (``volume-revert-apply``), only while the origin has no open
   device: its device (if any) removed, its record takes the copy's thin
   id, size and LUKS header (from here on it rolls forward), its old thin id
   is deleted, its device made again. A Revert applies at once when the
   origin is not open; an open origin (mounted, unlocked, held) keeps its
   revert scheduled, shown on the bus, and it is applied at its next
   Activate, when dmd starts (a restart or a reboot) and finds it closed,
   or on ImportPool.

The data an open device shows never changes under its user, and the copy is
taken when Revert is called: deleting the snapshot afterwards does not undo
a scheduled revert. Delete of the origin deletes a scheduled copy with it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from dmd.engine import DmError
from dmd.engine.interface import Engine
from dmd.engine.targets.thin import create_snap
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Caller
from dmd.service.journal import (
    Journal,
    PoolArgs,
    RevertStep,
)
from dmd.service.pools.core import (
    Accept,
    PoolChange,
    PoolCore,
    Recover,
    ignore,
)
from dmd.service.pools.names import volume_device
from dmd.service.pools.tables import volume_uuid
from dmd.state import IntentRecord, PoolRecord, Revert, VolumeRecord

log = logging.getLogger(__name__)


@dataclass
class _Progress:
    """How far a revert got, for its undo and roll-forward."""

    suspended: bool = False
    removed: bool = False
    applying: tuple[VolumeRecord, int, int] | None = None  # reverted, old thin id, tid


async def revert(pools: PoolCore, pool: str, name: str, *, uuid: str | None = None,
                 caller: Caller = ROOT, accept: Accept = ignore) -> VolumeRecord:
    """Revert snapshot *name*'s origin to it; the origin's record, reverted
    or with its revert scheduled."""
    async with pools.change(pool) as change:
        snap = await change.volume(name, uuid)
        await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", snap.owner_uid)
        if snap.thin_id is None:
            raise errors.InvalidArgument(f"{name!r} is a thick volume: only a thin snapshot "
                                         "can be reverted to")
        origin = next((v for v in await change.volumes() if v.uuid == snap.origin_uuid), None)
        if origin is None:
            raise errors.NotFound(f"{pool}/{name} has no origin to revert (it was deleted, or "
                                  f"{name!r} is no snapshot)")
        await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{origin.name}",
                                     origin.owner_uid)
        pools.check_uncached(origin, "reverting")
        pools.check_uncached(snap, "reverting to")  # its latest writes may be in the cache
        await pools.check_not_a_cache(origin)
        if origin.revert is not None:
            raise errors.Busy(f"volume {pool}/{origin.name} has a revert scheduled already "
                              "(applied when it is next activated, or closed as dmd starts)")
        record = await change.record()
        tid = await pools.kernel_tid(pool, record)
        # The copy carries the snapshot's LUKS header: the origin takes it
        # (its keys), keeping whether it is to be unlocked.
        encryption = replace(snap.encryption, unlocked=origin.encryption.unlocked) if (
            snap.encryption is not None and origin.encryption is not None) else snap.encryption
        scheduled = replace(origin, revert=Revert(record.next_thin_id, snap.uuid,
                                                  snap.size_bytes, encryption))
        pools.check_fits(record, await change.volumes(), scheduled)
        thin_id = await change.take_thin_id()
        assert scheduled.revert is not None and scheduled.revert.thin_id == thin_id
        snap_device = volume_device(pool, snap.name) if await pools.own_device(snap) else None
        claim = pools.owner(pool)
        progress = _Progress()

        async def undo(journal: Journal) -> None:
            if progress.suspended:
                assert snap_device is not None
                with contextlib.suppress(errors.ServiceError):
                    await pools.devices.resume(snap_device, claim=claim)
            if progress.removed:  # made again, as it was
                await make_device(pools, origin, change)
            if journal.step >= RevertStep.RECORD:
                await change.write(update=origin)  # no longer scheduled
            if journal.step >= RevertStep.MESSAGE:
                await take_back(pools, pool, thin_id)

        async with change.intent("volume-revert", f"{pool}/{origin.name}",
                                 PoolArgs(pool=pool, transaction_from=tid, thin_id=thin_id,
                                          volume=scheduled.to_json(),
                                          snapshot_uuid=snap.uuid), undo,
                                 roll_forward=progress_finish(pools, progress)) as journal:
            await change.accepted(origin, accept)
            await change.describe_pending("volume-revert", transaction_from=tid,
                                          thin_id=thin_id)
            await journal.mark(RevertStep.SUSPEND)
            if snap_device is not None:
                await pools.devices.suspend(snap_device, claim=claim)
                progress.suspended = True
            await journal.mark(RevertStep.MESSAGE)
            await pools.send(pool, create_snap(thin_id, snap.thin_id))
            await journal.mark(RevertStep.TRANSACTION)
            await pools.commit_tid(pool, tid)
            await journal.mark(RevertStep.RESUME)
            if snap_device is not None:
                await pools.devices.resume(snap_device, claim=claim, later=change.udev)
                progress.suspended = False
            await journal.mark(RevertStep.RECORD)
            await change.write(transaction_id=tid + 1, update=scheduled)
            log.info("volume-revert %s/%s to %s: scheduled (thin id %d)", pool, origin.name,
                     name, thin_id)
            reverted = await _apply_steps(change, scheduled, journal, progress, tid + 1)
        return reverted or scheduled


def progress_finish(pools: PoolCore, progress: _Progress,
                    ) -> Callable[[Journal], Awaitable[None]]:
    """The roll-forward of an apply past its record."""
    async def finish(_: Journal) -> None:
        assert progress.applying is not None
        await finish_apply(pools, *progress.applying)
    return finish


async def take_back(pools: PoolCore, pool: str, thin_id: int) -> None:
    """A copy never scheduled: deleted if the pool has it, the records at
    the kernel's transaction id."""
    await pools.delete_thin(pool, thin_id, f"volume-revert {pool}")
    tid = await pools.commit_tid(pool, await pools.kernel_tid(pool))
    await pools.record_change(pool, transaction_id=tid)


def _reverted(volume: VolumeRecord) -> VolumeRecord:
    """*volume* as its scheduled revert makes it."""
    assert volume.revert is not None
    return replace(volume, thin_id=volume.revert.thin_id, size_bytes=volume.revert.size_bytes,
                   encryption=volume.revert.encryption, revert=None)


async def _apply_steps(change: PoolChange, volume: VolumeRecord, journal: Journal,
                       progress: _Progress, tid: int) -> VolumeRecord | None:
    """*volume*'s scheduled revert applied, as steps of *journal*, the pool
    at transaction id *tid*; None (nothing done) while its device is open."""
    assert volume.revert is not None and volume.thin_id is not None
    pools, pool, name = change.core, volume.pool, volume.name
    if volume.cache is not None:
        # Its -corig device would keep the old thin id open (never the case:
        # Revert and AttachCache each refuse the other).
        raise errors.Busy(f"volume {pool}/{name} has a cache: the revert stays scheduled")
    device = volume_device(pool, name)
    present = await pools.own_device(volume)
    if present:
        try:
            info = await pools.kernel(Engine.device_info, device)
        except DmError as exc:
            raise errors.from_engine(exc, device, "revert") from None
        if info.open_count:
            log.info("volume-revert %s/%s: its device is open; the revert stays scheduled",
                     pool, name)
            return None
    old, reverted = volume.thin_id, _reverted(volume)
    progress.applying = (reverted, old, tid)
    if present:
        await journal.mark(RevertStep.DEACTIVATE)
        try:
            await pools.remove_closed(device, pools.owner(pool), change.udev)
        except errors.Busy:
            log.info("volume-revert %s/%s: its device was opened; the revert stays "
                     "scheduled", pool, name)
            return None
        progress.removed = True
    await journal.mark(RevertStep.SWITCH)
    await change.write(update=reverted)
    journal.no_way_back()  # the record names the new data: the rest follows
    await change.describe_pending("volume-revert-apply", transaction_from=tid, thin_id=old)
    await journal.mark(RevertStep.DELETE)
    await pools.delete_thin(pool, old, f"volume-revert {pool}/{name}")
    await journal.mark(RevertStep.COMMIT)
    await pools.commit_tid(pool, tid)
    await change.write(transaction_id=tid + 1)
    if present:
        await journal.mark(RevertStep.ACTIVATE)
        await make_device(pools, reverted, change)
    log.info("volume-revert %s/%s: applied, thin id %d (was %d)", pool, name,
             reverted.thin_id, old)
    return reverted


async def apply(change: PoolChange, volume: VolumeRecord) -> VolumeRecord:
    """Apply *volume*'s scheduled revert unless its device is open (then it
    stays scheduled); the record as it is after."""
    if volume.revert is None:
        return volume
    assert volume.thin_id is not None
    pools, pool = change.core, volume.pool
    progress = _Progress()
    reverted = _reverted(volume)
    tid = await pools.kernel_tid(pool, await change.record())

    async def undo(_: Journal) -> None:
        if progress.removed:  # made again as it was
            await make_device(pools, volume, change)

    async with change.intent("volume-revert-apply", f"{pool}/{volume.name}",
                             PoolArgs(pool=pool, transaction_from=tid, thin_id=volume.thin_id,
                                      volume=reverted.to_json()),
                             undo, roll_forward=progress_finish(pools, progress)) as journal:
        done = await _apply_steps(change, volume, journal, progress, tid)
    return done or volume


async def make_device(pools: PoolCore, volume: VolumeRecord,
                      change: PoolChange | None = None) -> None:
    """The volume's device (a volume with a revert has no cache: refused)."""
    await pools.devices.create(
        volume_device(volume.pool, volume.name), await pools.volume_table(volume),
        uuid=volume_uuid(volume.uuid), persistent=True, claim=pools.owner(volume.pool),
        later=change.udev if change is not None else None)


async def finish_apply(pools: PoolCore, reverted: VolumeRecord, old: int, start: int) -> None:
    """From wherever an applied revert stopped past its record: the old
    thin id deleted, the transaction id recorded, the device made again if
    the volume is active and has none."""
    pool = reverted.pool
    tid = await pools.kernel_tid(pool)
    if tid == start:
        await pools.delete_thin(pool, old, f"volume-revert {pool}/{reverted.name}")
        tid = await pools.commit_tid(pool, start)
    await pools.record_change(pool, transaction_id=tid)
    now = await pools.recorded(reverted)
    if now is not None and now.active and not await pools.own_device(now):
        await make_device(pools, now)


async def apply_scheduled(change: PoolChange) -> None:
    """As dmd starts or a pool is imported, before the active volumes
    without a device get theirs: every scheduled revert whose volume has
    no open device is applied."""
    for volume in await change.volumes():
        if volume.revert is not None:
            try:
                await apply(change, volume)
            except Exception as exc:  # one volume's trouble holds up no other
                log.error("volume-revert %s/%s: not applied at start (still scheduled): %s",
                          change.pool, volume.name, exc)


# -- after a crash (dmd.service.pools.recovery) -----------------------------
async def recover_schedule(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                           record: PoolRecord | None) -> str | None:
    """Scheduled if the origin's record names the copy (applied as dmd
    starts), finished if it took the copy; else the copy is taken back (and
    the snapshot resumed if it was left suspended)."""
    if record is None:
        return "rolled_back"
    pools.claim(args.pool)
    assert args.volume is not None
    volume = VolumeRecord.from_json(args.volume)
    now = await pools.recorded(volume)
    if now is not None and now.revert is not None and now.revert.thin_id == args.thin_id:
        return "done"  # applied (or not) as dmd starts: apply_scheduled
    if now is not None and now.thin_id == args.thin_id:  # applied past its record
        assert volume.thin_id is not None
        if not await _tid_is(pools, intent, args.transaction_from + 1):
            return None
        await finish_apply(pools, now, volume.thin_id, args.transaction_from + 1)
        return "done"
    for snap in await pools.store.list_volumes(args.pool):
        if snap.uuid == args.snapshot_uuid and snap.active:
            with contextlib.suppress(errors.ServiceError):
                info = await pools.kernel(Engine.device_info, volume_device(args.pool,
                                                                            snap.name))
                if info.suspended:
                    await pools.devices.resume(volume_device(args.pool, snap.name),
                                               claim=pools.owner(args.pool))
    if not await _tid_is(pools, intent, args.transaction_from):
        return None
    await take_back(pools, args.pool, args.thin_id)
    return "rolled_back"


async def recover_apply(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                        record: PoolRecord | None) -> str | None:
    """Finished if the origin's record took the copy; else nothing was
    applied (its device, if removed, is made again as dmd starts, and the
    revert, still scheduled, applied then)."""
    if record is None:
        return "rolled_back"
    pools.claim(args.pool)
    assert args.volume is not None
    reverted = VolumeRecord.from_json(args.volume)
    now = await pools.recorded(reverted)
    if now is None or now.thin_id != reverted.thin_id:
        return "rolled_back"
    if not await _tid_is(pools, intent, args.transaction_from):
        return None
    await finish_apply(pools, reverted, args.thin_id, args.transaction_from)
    return "done"


async def _tid_is(pools: PoolCore, intent: IntentRecord, start: int) -> bool:
    """Whether the pool is at the transaction id a step moved from, or the
    next: any other means another manager changed it (left for an admin)."""
    pool = PoolArgs.from_json(intent.args).pool
    tid = (await pools.pool_state(pool)).transaction_id
    if tid in (start, start + 1):
        return True
    log.error("recovery: pool %s is at transaction id %s, expected %d or %d: it was "
              "changed outside dmd; %s left for an admin", pool, tid, start, start + 1,
              intent.device)
    return False


RECOVERY: dict[str, Recover] = {"volume-revert": recover_schedule,
                                "volume-revert-apply": recover_apply}
