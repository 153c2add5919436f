"""A pool's life: CreatePool, DestroyPool and AddDevice, and how each is
finished or undone after a crash."""

from __future__ import annotations

import contextlib
import logging
import uuid as uuidlib
from dataclasses import replace

from dmd.engine import DmError, DmFlags
from dmd.engine.interface import Engine
from dmd.engine.targets.thin import (
    MAX_METADATA_SECTORS,
    MIN_METADATA_SECTORS,
    valid_block_sectors,
)
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Caller
from dmd.service.journal import (
    Journal,
    PoolArgs,
    PoolCreateStep,
    PoolDestroyStep,
    PoolGrowStep,
)
from dmd.service.pools import crypt
from dmd.service.pools.core import (
    DEFAULT_BLOCK_SECTORS,
    Accept,
    PoolChange,
    PoolCore,
    Recover,
    ignore,
    layout,
    metadata_growth,
    metadata_low,
)
from dmd.service.pools.names import (
    PoolName,
    PoolPart,
    cleartext_device,
    pool_device,
    pool_devices,
    tpool,
    volume_device,
)
from dmd.service.pools.room import HEADER_SECTORS
from dmd.service.pools.tables import linear, pool_table
from dmd.state import IntentRecord, PoolLayout, PoolRecord, Segment

log = logging.getLogger(__name__)


async def create_pool(pools: PoolCore, name: str, paths: list[str], *, force: bool = False,
                      block_size: int | None = None, on_full: str = "queue",
                      low_water_percent: int = 20, data_size: int | None = None,
                      no_space_timeout: int = 60, metadata_size: int | None = None,
                      caller: Caller = ROOT,
                      accept: Accept = ignore) -> PoolRecord:
    await pools.check_authorized(caller, Action.POOL, name)
    name = PoolName(name)
    if not isinstance(paths, list) or not paths or len(set(paths)) != len(paths):
        raise errors.InvalidArgument("a pool needs one or more distinct devices")
    block_sectors = DEFAULT_BLOCK_SECTORS if block_size is None else block_size // 512
    if block_size is not None and (block_size % 512 or not valid_block_sectors(
            block_sectors)):
        raise errors.InvalidArgument(
            f"block-size must be a multiple of 64 KiB from 64 KiB to 1 GiB, not {block_size}")
    if on_full not in ("queue", "error"):
        raise errors.InvalidArgument(f"on-full is 'queue' or 'error', not {on_full!r}")
    if not isinstance(low_water_percent, int) or not 0 <= low_water_percent <= 99:
        raise errors.InvalidArgument("low-water is a percentage from 0 to 99")
    if metadata_size is not None and (
            not isinstance(metadata_size, int) or
            not MIN_METADATA_SECTORS * 512 <= metadata_size <= MAX_METADATA_SECTORS * 512):
        raise errors.InvalidArgument(
            f"metadata-size is from {MIN_METADATA_SECTORS * 512} to "
            f"{MAX_METADATA_SECTORS * 512} bytes")
    if not isinstance(no_space_timeout, int) or not 0 <= no_space_timeout <= 86400:
        raise errors.InvalidArgument("no-space-timeout is seconds from 0 to 86400")
    if data_size is not None and (not isinstance(data_size, int) or
                                  data_size < block_sectors * 512):
        raise errors.InvalidArgument(f"data-size is at least one data block "
                                     f"({block_sectors * 512} bytes)")
    async with pools.change(name) as change:
        if await pools.store.get_pool(name) is not None:
            raise errors.AlreadyExists(f"a pool named {name!r} exists")
        sized = await pools.check_free_devices(paths, force)
        plan = replace(layout(sized, block_sectors,
                              data_size // 512 if data_size is not None else None,
                              -(-metadata_size // 4096) * 8 if metadata_size else None),
                       ids=tuple(str(uuidlib.uuid4()) for _ in sized))
        record = PoolRecord(name, str(uuidlib.uuid4()), caller.uid, block_sectors, on_full,
                            low_water_percent, 0, 0, plan,
                            no_space_timeout=no_space_timeout)
        for device in pool_devices(name):
            if (await pools.devices.store.get_device(device)) is not None:
                raise errors.AlreadyExists(f"a device named {device} exists")
        pools.claim(name)
        try:
            await make_pool(change, record, accept)
        except BaseException:
            pools.release(name)
            raise
    log.info("pool-create %s: %d device(s), %d bytes of data", name, len(paths),
             plan.data_sectors * 512)
    return record


async def make_pool(change: PoolChange, record: PoolRecord, accept: Accept) -> None:
    pools, name, plan = change.core, record.name, record.layout

    async def undo(journal: Journal) -> None:
        await pools.remove_pool_devices(name)
        if journal.step >= PoolCreateStep.POOL:  # the kernel may have formatted it
            await pools.wipe_metadata(plan)
        await pools.descriptions.unlabel(plan.devices, plan.ids)

    async with change.intent("pool-create", name,
                      PoolArgs(pool=name, layout=plan.to_json()), undo) as journal:
        change.show(record, "creating")
        await change.accepted(record, accept)
        await journal.mark(PoolCreateStep.WIPE)
        for path in plan.devices:  # old signatures, and any old description
            await pools.kernel(Engine.wipe, path, 0, HEADER_SECTORS * 512)
        await pools.wipe_metadata(plan)
        await pools.descriptions.label(record)
        await journal.mark(PoolCreateStep.DEVICES)
        await pools.create_pool_devices(record, PoolPart.TMETA, PoolPart.TDATA)
        await journal.mark(PoolCreateStep.POOL)
        await pools.create_pool_devices(record, PoolPart.TPOOL)
        await journal.mark(PoolCreateStep.RECORD)
        await pools.store.add_pool(record)


async def destroy_pool(pools: PoolCore, name: str, *, force: bool = False,
                       caller: Caller = ROOT,
                       accept: Accept = ignore) -> None:
    """Remove the pool, its devices and records. Refused while it has
    volumes, unless *force* (then they go too, data and all)."""
    # A stopped pool is started first (its disks checked), but one whose
    # Start found its metadata damaged: its disks are checked here instead.
    async with pools.change(name, damaged=True, stopped=name in pools.damaged) as change:
        record = await change.record()
        await pools.check_authorized(caller, Action.POOL, name, record.owner_uid)
        if record.stopped:
            await pools.check_devices(record)
        volumes = await change.volumes()
        if volumes and not force:
            raise errors.Busy(f"pool {name!r} has {len(volumes)} volume(s); delete them "
                              "first or pass force")
        for volume in volumes:  # refuse before anything goes if one is open
            device = (cleartext_device if volume.encryption is not None
                      and await crypt.cleartext_present(pools, name, volume.name)
                      else volume_device)(name, volume.name)
            with contextlib.suppress(DmError):
                info = await pools.kernel(Engine.device_info, device)
                if info.open_count:
                    raise errors.Busy(f"volume {volume.name!r} is open")
        async def finish(_: Journal) -> None:
            await finish_destroy(pools, record)

        async with change.intent("pool-destroy", name,
                          PoolArgs(pool=name), roll_forward=finish) as journal:
            change.show(record, "destroying")
            await change.accepted(record, accept)
            journal.no_way_back()
            # Past here its disks are wiped: never described again, even if
            # the records outlive an error (the roll-forward removes them).
            change.describe_at_end = False
            await journal.mark(PoolDestroyStep.DEVICES)
            await destroy_devices(pools, record)
            await journal.mark(PoolDestroyStep.RECORD)
            await destroy_records(pools, record)
        pools.release(name)
    log.info("pool-destroy %s: done", name)


async def finish_destroy(pools: PoolCore, record: PoolRecord) -> None:
    """Finish a destroy from wherever it stopped: each step is skipped if
    it was done."""
    await destroy_devices(pools, record)
    await destroy_records(pools, record)
    pools.release(record.name)


async def destroy_devices(pools: PoolCore, record: PoolRecord) -> None:
    """Remove the volumes' devices and the pool's, and zero its metadata."""
    claim = pools.owner(record.name)
    for volume in await pools.store.list_volumes(record.name):
        await crypt.close_cleartext(pools, record.name, volume.name)
        with contextlib.suppress(errors.NotFound):
            await pools.devices.remove(volume_device(record.name, volume.name),
                                       claim=claim)
    await pools.remove_pool_devices(record.name)
    await pools.wipe_metadata(record.layout)
    await pools.descriptions.wipe(record.layout.devices, record.uuid)


async def destroy_records(pools: PoolCore, record: PoolRecord) -> None:
    for volume in await pools.store.list_volumes(record.name):
        await pools.record_change(record.name, remove=volume.uuid)
    if await pools.store.get_pool(record.name) is not None:
        await pools.store.remove_pool(record.name)
    pools.damaged.pop(record.name, None)
    pools.stopped.discard(record.name)


async def add_device(pools: PoolCore, pool: str, path: str, *, force: bool = False,
                     caller: Caller = ROOT, accept: Accept = ignore) -> PoolRecord:
    """Grow the pool's data over one more device: the data device is
    reloaded with a segment of it, then the pool's table with the larger
    size (the kernel grows a pool when its data device grew; it cannot
    shrink one, so past that step the operation rolls forward).

    A pool whose metadata is low (out of it, say) first grows its
    metadata over the start of the new device, in a resume of its own:
    the kernel grows the data before the metadata on a resume, and a
    pool out of metadata space cannot write the larger data space map.
    """
    async with pools.change(pool) as change:
        record = await change.record()
        await pools.check_authorized(caller, Action.POOL, pool, record.owner_uid)
        if path in record.layout.devices:
            raise errors.Busy(f"{path} is a device of pool {pool!r} already")
        await pools.check_devices(record)
        [(path, size)] = await pools.check_free_devices([path], force)
        state = await pools.pool_state(pool, record)
        meta = 0
        if metadata_low(state.metadata_used_bytes, state.metadata_total_bytes,
                        state.metadata_low_water_bytes) and \
                record.layout.metadata_sectors < MAX_METADATA_SECTORS:
            meta = min(metadata_growth(state.metadata_total_bytes) // 512,
                       MAX_METADATA_SECTORS - record.layout.metadata_sectors)
        usable = size // 512 - HEADER_SECTORS - meta
        usable -= usable % record.block_sectors
        if usable < record.block_sectors:
            raise errors.InvalidArgument(f"{path} leaves no room for data")
        plan = record.layout
        ids = plan.ids if len(plan.ids) == len(plan.devices) else tuple(
            str(uuidlib.uuid4()) for _ in plan.devices)
        new = len(plan.devices)
        metadata = (*plan.metadata, *([Segment(new, HEADER_SECTORS, meta)] if meta else []))
        with_metadata = PoolLayout((*plan.devices, path), (*plan.sizes, size), metadata,
                                   plan.data, (*ids, str(uuidlib.uuid4())), plan.spare)
        grown_layout = replace(with_metadata, data=(
            *plan.data, Segment(new, HEADER_SECTORS + meta, usable)))
        grown = replace(record, layout=grown_layout)

        async def undo(journal: Journal) -> None:
            if journal.step >= PoolGrowStep.POOL:
                await pools.restore_data(record)
            await pools.descriptions.unlabel([path], grown_layout.ids[new:])

        async def finish(_: Journal) -> None:
            if meta:
                await pools.finish_layout(grown)
            else:
                await change.write(layout=grown_layout)

        async with change.intent("pool-grow", pool,
                          PoolArgs(pool=pool, layout=grown_layout.to_json()), undo,
                          roll_forward=finish) as journal:
            await change.accepted(grown, accept)
            await journal.mark(PoolGrowStep.WIPE)
            await pools.kernel(Engine.wipe, path, 0, HEADER_SECTORS * 512)
            await change.describe_pending("pool-grow", layout=grown_layout)
            if meta:
                await journal.mark(PoolGrowStep.METADATA)
                journal.no_way_back()
                await pools.devices.reload(pool_device(pool, PoolPart.TMETA), linear(
                    with_metadata, with_metadata.metadata), claim=change.owner)
                await pools.devices.reload(tpool(pool), pool_table(
                    replace(record, layout=with_metadata)), claim=change.owner)
            await journal.mark(PoolGrowStep.DATA)
            await pools.devices.reload(pool_device(pool, PoolPart.TDATA), linear(grown_layout,
                                                               grown_layout.data),
                                      claim=change.owner)
            await journal.mark(PoolGrowStep.POOL)
            await pools.devices.reload(tpool(pool), pool_table(grown), claim=change.owner)
            journal.no_way_back()
            await journal.mark(PoolGrowStep.RECORD)
            await change.write(layout=grown_layout)
    log.info("pool-grow %s: %s added, %d bytes of data, %d of metadata", pool, path,
             grown_layout.data_sectors * 512, grown_layout.metadata_sectors * 512)
    return grown


# -- after a crash (dmd.service.pools.recovery) -----------------------------
async def recover_create(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                         record: PoolRecord | None) -> str | None:
    if record is not None:
        return "done"
    await pools.remove_pool_devices(args.pool)
    # Its layout is not recorded; the kernel's formatting, if it got that
    # far, lies at the metadata device's start: zeroed again.
    if args.layout is not None:
        plan = PoolLayout.from_json(args.layout)
        await pools.wipe_metadata(plan)
        await pools.descriptions.unlabel(plan.devices, plan.ids)
    return "rolled_back"


async def recover_destroy(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                          record: PoolRecord | None) -> str | None:
    if record is not None:
        pools.claim(args.pool)
        await finish_destroy(pools, record)  # it began past its way back
    return "done"


async def recover_grow(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                       record: PoolRecord | None) -> str | None:
    if record is None:
        return "rolled_back"
    assert args.layout is not None
    pool, grown = args.pool, PoolLayout.from_json(args.layout)
    pools.claim(pool)
    if intent.step >= PoolGrowStep.METADATA and grown.metadata != record.layout.metadata:
        # The kernel may have taken the larger metadata: forward.
        await pools.finish_layout(replace(record, layout=grown))
        return "done"
    _, table = await pools.kernel(Engine.table_status, tpool(pool), DmFlags.DM_STATUS_TABLE)
    if sum(line.length for line in table) == grown.data_sectors:
        await pools.record_change(pool, layout=grown)  # the pool grew
        return "done"
    await pools.restore_data(record)
    added = len(record.layout.devices)
    await pools.descriptions.unlabel(grown.devices[added:], grown.ids[added:])
    return "rolled_back"


RECOVERY: dict[str, Recover] = {"pool-create": recover_create, "pool-destroy": recover_destroy,
                                "pool-grow": recover_grow}
