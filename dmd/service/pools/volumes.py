"""Volumes asked for and given back: create (thin, or thick by
dmd.service.pools.thick), snapshot, delete and resize, and how each is
finished or undone after a crash. A thin volume's protocol: its thin id
taken durably, the description naming the message, the message, the
transaction id moved, then the record (see dmd.service.pools.core)."""

from __future__ import annotations

import contextlib
import logging
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from dmd.engine import DmError, DmFlags, luks
from dmd.engine.interface import Engine
from dmd.engine.targets.thin import (
    create_snap,
    create_thin,
)
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Caller
from dmd.service.devices.operations import check_labels
from dmd.service.journal import (
    Journal,
    PoolArgs,
    SnapshotStep,
    ThickResizeStep,
    VolumeCreateStep,
    VolumeDeleteStep,
    VolumeResizeStep,
)
from dmd.service.pools import activation, content, crypt, fsresize, thick
from dmd.service.pools.core import (
    Accept,
    PoolChange,
    PoolCore,
    Recover,
    check_size,
    ignore,
)
from dmd.service.pools.crypt import EncryptionRequest
from dmd.service.pools.filesystems import check_filesystem
from dmd.service.pools.names import (
    VolumeName,
    check_cleartext,
    cleartext_device,
    volume_device,
)
from dmd.service.pools.tables import thin_table
from dmd.state import Encryption, IntentRecord, PoolRecord, VolumeRecord

log = logging.getLogger(__name__)


async def create_volume(pools: PoolCore, pool: str, name: str, size_bytes: int, *,
                        labels: Mapping[str, str] | None = None,
                        filesystem: str | None = None,
                        encryption: EncryptionRequest | None = None,
                        thin: bool = True, stripes: int = 1,
                        stripe_size: int | None = None,
                        caller: Caller = ROOT,
                        accept: Accept = ignore) -> VolumeRecord:
    """*filesystem*: "ext4" or "xfs", made on the new volume as the last
    step (its failure undoes the volume); *encryption*: LUKS2 under it,
    opened (dmd.service.pools.crypt). The request's key is wiped here.
    Not *thin*: a thick volume, its segments taken from the room on the
    pool's devices (dmd.service.pools.room), *stripes* wide."""
    with contextlib.ExitStack() as keys:
        if encryption is not None:
            keys.callback(encryption.wipe)
        await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}")
        name = VolumeName(name, pool)
        size = check_size(size_bytes)
        check_filesystem(filesystem)
        if encryption is not None:
            check_cleartext(pool, name)
        if encryption is not None and size < luks.HEADER_BYTES + (1 << 20):
            raise errors.InvalidArgument(
                f"an encrypted volume takes at least {luks.HEADER_BYTES + (1 << 20)} bytes: "
                f"its LUKS2 header takes the first {luks.HEADER_BYTES}")
        clean_labels = check_labels(labels or {})
        if thin and (stripes != 1 or stripe_size is not None):
            raise errors.InvalidArgument("stripes and stripe-size are for thick volumes "
                                         "(thin false)")
        async with pools.change(pool) as change:
            record = await change.record()
            await change.check_new_name(name)
            if encryption is not None and \
                    await pools.store.get_device(cleartext_device(pool, name)) is not None:
                raise errors.AlreadyExists(f"a device named "
                                           f"{cleartext_device(pool, name)} exists")
            if not thin:
                return await thick.create_thick(change,
                    record, name, size, stripes, stripe_size, clean_labels, filesystem,
                    encryption, caller, accept)
            tid = await pools.kernel_tid(pool, record)
            volume = VolumeRecord(
                str(uuidlib.uuid4()), pool, name, record.next_thin_id, size, None,
                caller.uid, clean_labels, True,
                encryption=Encryption(str(uuidlib.uuid4()), encryption.key_description)
                if encryption is not None else None)
            pools.check_fits(record, await change.volumes(), volume)
            thin_id = await change.take_thin_id()
            assert thin_id == volume.thin_id
            await add_thin(change, record, volume, tid, create_thin(thin_id),
                                 "volume-create", filesystem=filesystem,
                                 encryption=encryption, accept=accept)
    log.info("volume-create %s/%s: thin id %d, %d bytes%s%s", pool, name, thin_id, size,
             ", luks2" if encryption else "", f", {filesystem}" if filesystem else "")
    return volume


async def add_thin(change: PoolChange, pool: PoolRecord, volume: VolumeRecord, tid: int,
                    message: str, operation: str, *, snapshot: bool = False,
                    origin_device: str | None = None, filesystem: str | None = None,
                    encryption: EncryptionRequest | None = None,
                    accept: Accept = ignore) -> None:
    """The protocol shared by create and snapshot (see the module);
    *origin_device*: the snapshot's origin device, if it is active;
    *encryption*: a LUKS2 header made on the new (active) volume and
    opened; *filesystem*: made on it (or on its cleartext) at the end."""
    pools, name = change.core, pool.name
    claim = pools.owner(name)
    steps: Any = SnapshotStep if snapshot else VolumeCreateStep
    suspended = False

    async def undo(journal: Journal) -> None:
        if suspended:
            assert origin_device is not None
            with contextlib.suppress(errors.ServiceError):
                await pools.devices.resume(origin_device, claim=claim)
        await undo_thin(pools, name, volume, recorded=journal.step >= steps.ACTIVATE)

    assert volume.thin_id is not None
    args = PoolArgs(pool=name, transaction_from=tid, thin_id=volume.thin_id,
                    volume=volume.to_json(), origin_uuid=volume.origin_uuid)
    async with change.intent(operation, f"{name}/{volume.name}",
                      args, undo) as journal:
        change.show(volume, "creating")
        await change.accepted(volume, accept)
        await change.describe_pending(operation, transaction_from=tid, volume=volume)
        if snapshot:
            await journal.mark(SnapshotStep.SUSPEND)
        if origin_device is not None:
            await pools.devices.suspend(origin_device, claim=claim)
            suspended = True
        await journal.mark(steps.MESSAGE)
        await pools.send(name, message)
        await journal.mark(steps.TRANSACTION)
        await pools.commit_tid(name, tid)
        if snapshot:
            await journal.mark(SnapshotStep.RESUME)
        if origin_device is not None:
            await pools.devices.resume(origin_device, claim=claim, later=change.udev)
            suspended = False
        await journal.mark(steps.RECORD)
        await change.write(transaction_id=tid + 1, add=volume)
        if volume.active:
            await journal.mark(steps.ACTIVATE)
            # udev makes the node while the change goes on (it is waited for
            # at the change's end, or before the content needs it): under
            # emulation udev's rules take longer than the rest of a create.
            await activation.activate(pools, volume, later=change.udev)
        if encryption is not None or filesystem is not None:
            await change.udev_done()
        await content.prepare(pools, journal, volume, encryption, filesystem)


async def undo_thin(pools: PoolCore, pool: str, volume: VolumeRecord, *, recorded: bool) -> None:
    """Take a thin id back out (deleting what is not there is fine) and
    leave the records at the kernel's transaction id."""
    await pools.remove_volume_devices(volume)
    await delete_thin(pools, pool, volume)
    tid = await pools.kernel_tid(pool)
    tid = await pools.commit_tid(pool, tid)
    await pools.record_change(pool, transaction_id=tid,
                                  remove=volume.uuid if recorded else None)


async def delete_thin(pools: PoolCore, pool: str, volume: VolumeRecord) -> None:
    """Delete the volume's thin id, and a scheduled revert's copy (one the
    pool no longer has is fine)."""
    assert volume.thin_id is not None
    await pools.delete_thin(pool, volume.thin_id, f"volume {pool}/{volume.name}")
    if volume.revert is not None:
        await pools.delete_thin(pool, volume.revert.thin_id,
                                f"volume {pool}/{volume.name}'s revert")


async def snapshot(pools: PoolCore, pool: str, origin: str, name: str, *,
                   activate: bool = True, labels: Mapping[str, str] | None = None,
                   udev_sync: bool = True, uuid: str | None = None, caller: Caller = ROOT,
                   accept: Accept = ignore) -> VolumeRecord:
    """A new volume holding *origin*'s data as it is now. An active origin
    is suspended for the moment of the copy and resumed on every path.
    *udev_sync* False: done without waiting for udev's work on the new
    device (PoolChange.udev_sync)."""
    name = VolumeName(name, pool)
    clean_labels = check_labels(labels or {})
    async with pools.change(pool) as change:
        change.udev_sync = udev_sync
        record = await change.record()
        source = await change.volume(origin, uuid)
        await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{origin}", source.owner_uid)
        await change.check_new_name(name)
        if source.thin_id is None:
            raise errors.InvalidArgument(f"{origin!r} is a thick volume: only thin "
                                         "volumes have snapshots")
        if source.encryption is not None:
            check_cleartext(pool, name)
        # Its latest writes may be in the cache, not yet in the thin volume.
        pools.check_uncached(source, "snapshotting")
        tid = await pools.kernel_tid(pool, record)
        # An encrypted origin's snapshot carries its header: the same
        # keys open it, locked until asked (it is a copy, not a second use).
        volume = VolumeRecord(str(uuidlib.uuid4()), pool, name, record.next_thin_id,
                              source.size_bytes, source.uuid, caller.uid, clean_labels,
                              activate, encryption=replace(source.encryption, unlocked=False)
                              if source.encryption is not None else None)
        pools.check_fits(record, await change.volumes(), volume)
        thin_id = await change.take_thin_id()
        assert thin_id == volume.thin_id
        origin_device = volume_device(pool, origin) if source.active else None
        await add_thin(change, record, volume, tid, create_snap(thin_id, source.thin_id),
                             "volume-snapshot", snapshot=True, origin_device=origin_device,
                             accept=accept)
    log.info("volume-snapshot %s/%s of %s: thin id %d", pool, name, origin, thin_id)
    return volume


async def delete_volume(pools: PoolCore, pool: str, name: str, *, uuid: str | None = None,
                        caller: Caller = ROOT, accept: Accept = ignore,
                        udev_sync: bool = True) -> None:
    """Remove the volume's device, delete its thin id, drop its record.
    *udev_sync* False: done without waiting for udev's work on the removed
    device (PoolChange.udev_sync)."""
    async with pools.change(pool) as change:
        change.udev_sync = udev_sync
        volume = await change.volume(name, uuid)
        await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)
        pools.check_uncached(volume, "deleting")
        if volume.thin_id is None:
            change.show(volume, "deleting")
            await change.accepted(volume, accept)
            await thick.delete_thick(change, volume)
            log.info("volume-delete %s/%s: thick, its segments freed", pool, name)
            return
        tid = await pools.kernel_tid(pool, await change.record())
        claim = pools.owner(pool)

        async def finish(_: Journal) -> None:
            await finish_delete(pools, volume, tid)

        async with change.intent("volume-delete", f"{pool}/{name}",
                          PoolArgs(pool=pool, transaction_from=tid,
                                   thin_id=volume.thin_id, volume=volume.to_json()),
                          roll_forward=finish) as journal:
            change.show(volume, "deleting")
            await change.accepted(volume, accept)
            await journal.mark(VolumeDeleteStep.DEACTIVATE)
            await crypt.close_cleartext(pools, pool, name)
            with contextlib.suppress(errors.NotFound):
                await pools.remove_closed(volume_device(pool, name), claim, change.udev)
            journal.no_way_back()
            await change.describe_pending("volume-delete", transaction_from=tid,
                                        volume=volume)
            await journal.mark(VolumeDeleteStep.MESSAGE)
            await delete_thin(pools, pool, volume)  # and a scheduled revert's copy
            await journal.mark(VolumeDeleteStep.TRANSACTION)
            await pools.commit_tid(pool, tid)
            await journal.mark(VolumeDeleteStep.RECORD)
            await change.write(transaction_id=tid + 1, remove=volume.uuid)
    log.info("volume-delete %s/%s: thin id %d deleted", pool, name, volume.thin_id)


async def finish_delete(pools: PoolCore, volume: VolumeRecord, start: int) -> None:
    """Finish a delete from wherever it stopped (recovery, or an error past
    the device's removal): each step is skipped if it was done."""
    pool = volume.pool
    await crypt.close_cleartext(pools, pool, volume.name)
    with contextlib.suppress(errors.NotFound):
        await pools.devices.remove(volume_device(pool, volume.name), claim=pools.owner(pool))
    tid = await pools.kernel_tid(pool)
    if tid == start:
        await delete_thin(pools, pool, volume)
        tid = await pools.commit_tid(pool, start)
    await pools.record_change(pool, transaction_id=tid, remove=volume.uuid)


async def resize_volume(pools: PoolCore, pool: str, name: str, size_bytes: int, *,
                        shrink: bool = False, filesystem: bool = False,
                        uuid: str | None = None, caller: Caller = ROOT,
                        accept: Accept = ignore) -> VolumeRecord:
    """*filesystem*: its ext4 or xfs follows (dmd.service.pools.fsresize)."""
    size = check_size(size_bytes)
    async with pools.change(pool) as change:
        volume = await change.volume(name, uuid)
        await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)
        if size < volume.size_bytes and not shrink:
            raise errors.InvalidArgument(
                f"{size} bytes is smaller than {name!r} ({volume.size_bytes} bytes); "
                "shrinking loses the data past the new end: pass shrink to do it")
        pools.check_uncached(volume, "resizing")
        await pools.check_not_a_cache(volume)
        if volume.encryption is not None and await crypt.cleartext_present(pools, pool, name):
            raise errors.Busy(f"volume {pool}/{name} is unlocked: Lock it to resize it "
                              "(its cleartext device takes the new size when unlocked)")
        if volume.thick is not None and size < volume.size_bytes:
            raise errors.InvalidArgument(f"{name!r} is a thick volume: it grows, "
                                         "never shrinks")
        follows = await fsresize.plan(pools, volume, size, caller) if filesystem else None
        if volume.thick is not None:
            await change.accepted(volume, accept)
            resized = volume
            if size > volume.size_bytes:
                resized = await thick.grow_thick(change, volume, size, then=None if (
                    follows is None) else lambda journal: follows.grow(
                        pools, size, journal, ThickResizeStep.FILESYSTEM))
            elif follows is not None:
                await follows.grow(pools, size)  # a grow cut short before: finished
        else:
            resized = replace(volume, size_bytes=size)
            await change.accepted(resized, accept)
            if follows is not None and size < volume.size_bytes:
                await follows.shrink(pools, size)
            try:
                await _resize_thin(change, volume, resized, follows)
            except BaseException:
                if follows is not None and size < volume.size_bytes:
                    await follows.restore(pools)
                raise
    log.info("volume-resize %s/%s: %d -> %d bytes", pool, name, volume.size_bytes,
             resized.size_bytes)
    return resized


async def _resize_thin(change: PoolChange, volume: VolumeRecord, resized: VolumeRecord,
                       follows: fsresize.FilesystemResize | None) -> None:
    """The device reloaded at the new size, then the record. Alone, the
    resize rolls forward from the reload (the device's new end may be written
    at once); with a filesystem growing after it, it is undone until the
    filesystem grew (only the filesystem writes past the old end)."""
    pools, pool, name, thin_id = change.core, volume.pool, volume.name, volume.thin_id
    assert thin_id is not None
    reloaded = False

    async def follow_device(_: Journal) -> None:
        await match_size(pools, resized)

    async def undo(_: Journal) -> None:
        await change.write(update=volume)
        if reloaded:
            await pools.devices.reload(volume_device(pool, name),
                                      thin_table(pool, thin_id, volume.size_bytes),
                                      claim=pools.owner(pool))

    growing = follows is not None and resized.size_bytes >= volume.size_bytes
    async with change.intent("volume-resize", f"{pool}/{name}",
                             PoolArgs(pool=pool, volume=resized.to_json(),
                                      old_size=volume.size_bytes),
                             undo if growing else None,
                             roll_forward=follow_device) as journal:
        if await pools.own_device(volume):
            await journal.mark(VolumeResizeStep.RELOAD)
            await pools.devices.reload(volume_device(pool, name),
                                      thin_table(pool, thin_id, resized.size_bytes),
                                      claim=pools.owner(pool))
            reloaded = True
            if not growing:
                journal.no_way_back()  # the device has its size: the record follows
        await journal.mark(VolumeResizeStep.RECORD)
        await change.write(update=resized)
        if growing:
            assert follows is not None
            await follows.grow(pools, resized.size_bytes, journal, VolumeResizeStep.FILESYSTEM)


async def match_size(pools: PoolCore, resized: VolumeRecord) -> str:
    """Make the volume's recorded size its device's (a thin Resize cut
    short); an inactive volume's record is whole either way (the one
    write of its resize). "done" if it has *resized*'s size now."""
    now = await pools.recorded(resized)
    if now is None:
        return "rolled_back"
    size = now.size_bytes
    if await pools.own_device(now):
        device = volume_device(now.pool, now.name)
        info, table = await pools.kernel(Engine.table_status, device, DmFlags.DM_STATUS_TABLE)
        if info.active_present:
            size = sum(line.length for line in table) * 512
    if size != now.size_bytes:
        await pools.record_change(now.pool, update=replace(now, size_bytes=size))
    return "done" if size == resized.size_bytes else "rolled_back"


# -- after a crash (dmd.service.pools.recovery) -----------------------------
async def _resume(pools: PoolCore, device: str) -> None:
    with contextlib.suppress(DmError):
        info = await pools.kernel(Engine.device_info, device)
        if info.suspended:
            await pools.kernel(Engine.device_suspend, device, DmFlags(0))
            log.info("recovery: resumed %s, left suspended by an interrupted snapshot", device)


async def recover_resize(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                         record: PoolRecord | None) -> str | None:
    if record is None:
        return "rolled_back"
    pools.claim(args.pool)
    assert args.volume is not None
    return await match_size(pools, VolumeRecord.from_json(args.volume))


async def recover_thin(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                       record: PoolRecord | None) -> str | None:
    """Create, snapshot and delete, by the pool's transaction id: neither
    the one the operation moved from nor the next, and it is left for an
    admin (another manager changed the pool)."""
    pool = args.pool
    if record is None:
        return "rolled_back" if intent.operation != "volume-delete" else "done"
    pools.claim(pool)
    assert args.volume is not None
    volume = VolumeRecord.from_json(args.volume)
    if intent.operation == "volume-snapshot":
        volumes = {v.uuid: v for v in await pools.store.list_volumes(pool)}
        origin = volumes.get(args.origin_uuid or "")
        if origin is not None and origin.active:
            await _resume(pools, volume_device(pool, origin.name))
    tid = (await pools.pool_state(pool)).transaction_id
    start = args.transaction_from
    if tid not in (start, start + 1):
        log.error("recovery: pool %s is at transaction id %s, expected %d or %d: it was "
                  "changed outside dmd; %s left for an admin", pool, tid, start, start + 1,
                  intent.device)
        return None
    if intent.operation == "volume-delete":
        await finish_delete(pools, volume, start)  # rolls forward once begun
        return "done"
    recorded = {v.uuid for v in await pools.store.list_volumes(pool)}
    if intent.operation == "volume-create" and intent.step >= VolumeCreateStep.ENCRYPT:
        # luksFormat, cryptsetup open or mkfs was running: a half-made
        # header or filesystem is no volume to hand out.
        await undo_thin(pools, pool, volume, recorded=volume.uuid in recorded)
        return "rolled_back"
    if tid == start:
        # The thin may exist (create_thin sent, the transaction not): take
        # it back. Nothing was recorded or activated yet; undo_thin moved
        # the pool one transaction on, and the records follow.
        await undo_thin(pools, pool, volume, recorded=False)
        return "rolled_back"
    if volume.uuid not in recorded:
        await pools.record_change(pool, transaction_id=tid, add=volume)
    if volume.active and await pools.store.get_device(volume_device(pool, volume.name)) is None:
        await activation.activate(pools, volume)
    return "done"


RECOVERY: dict[str, Recover] = {"volume-create": recover_thin, "volume-snapshot": recover_thin,
                                "volume-delete": recover_thin, "volume-resize": recover_resize}
