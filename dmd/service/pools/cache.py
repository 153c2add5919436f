"""A cache in front of a volume: dm-cache or dm-writecache, attached and
detached while the volume is in use.

The volume's device (POOL-VOLUME) stays the device its users hold; attaching
makes three devices under it and swaps its table:

    POOL-VOLUME-corig   the volume's own table (thin or thick)
    POOL-VOLUME-cmeta   dm-cache's metadata, the start of the cache device
    POOL-VOLUME-cdata   the rest of it (all of it, for dm-writecache)
    POOL-VOLUME         cache (or writecache) over the three

All are persistent managed devices, so a reboot brings the stack back (each
after the devices its table names). The cache device is a block device taken
whole (checked as a pool's devices are: not in use, no signature unless
forced) or another pool's volume (a fast pool's), given as POOL/VOLUME.

Detaching never loses a write: the table is first swapped for one that
writes every dirty block back and caches no new write (dm-cache in
writethrough mode with the cleaner policy; dm-writecache's cleaner), the job
waits until the kernel says no block is dirty, then suspends the device,
checks again while nothing can write, and only then swaps in the volume's
own table. Until that swap a failure, a Cancel or a crash puts the cache
back as it was (its dirty blocks still in it); after it, the detach is
finished. Meanwhile the pool's other changes wait (the job holds the pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import uuid as uuidlib
from dataclasses import replace

from dmd.engine import DmError, DmFlags, TargetLine, mapper_path
from dmd.engine.interface import Engine
from dmd.engine.targets import parse_status
from dmd.engine.targets.cache import CacheParams, CacheStatus
from dmd.engine.targets.writecache import WritecacheParams, WritecacheStatus
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Caller
from dmd.service.jobs import cancel_point, progress, work_bytes
from dmd.service.journal import Journal, PoolArgs, intent
from dmd.service.pools.core import Accept, PoolCore, Recover
from dmd.service.pools.names import VolumePart, volume_device, volume_part
from dmd.service.pools.room import HEADER_SECTORS
from dmd.state import Cache, IntentRecord, PoolRecord, VolumeRecord
from dmd.state.pool_description import BLOCK, Label

log = logging.getLogger(__name__)

# Option "mode" -> (target, its io mode)
MODES = {"writeback": ("cache", "writeback"), "writethrough": ("cache", "writethrough"),
         "writecache": ("writecache", "")}
DEFAULT_BLOCK_SECTORS = 128  # 64 KiB, LVM's default cache chunk
MIN_BLOCK_SECTORS, MAX_BLOCK_SECTORS = 64, 2097152  # 32 KiB to 1 GiB, multiples of 32 KiB
WRITECACHE_BLOCK_SECTORS = 8  # 4 KiB
MIN_CACHE_BLOCKS = 16
ZERO_BYTES = 1 << 20  # of the metadata's start: the kernel then formats a new cache
FLUSH_POLL = 0.5  # seconds between reads of the dirty count
SWAP_TRIES = 10  # a suspend that finds blocks dirty again resumes and waits again
SOURCES_LOCK = "/cache-sources"  # not a device name: no "/" in those
WRITECACHE_STALL = 5.0  # seconds without fewer dirty blocks: flush on suspend instead


class AttachStep(enum.IntEnum):
    DEVICES = 1  # cmeta and cdata are made next (cmeta's start zeroed)
    ORIGIN = 2  # corig, with the volume's own table, next
    SWAP = 3  # the volume's table becomes the cache's next: from here on, forward
    RECORD = 4


class DetachStep(enum.IntEnum):
    CLEAN = 1  # the cleaner table goes live next
    FLUSH = 2  # waiting until no block is dirty
    SWAP = 3  # suspended, checked clean, the volume's own table next
    REMOVE = 4  # corig, cmeta and cdata are removed next
    RECORD = 5


def corig(pool: str, volume: str) -> str:
    return volume_part(pool, volume, VolumePart.CORIG)


def cmeta(pool: str, volume: str) -> str:
    return volume_part(pool, volume, VolumePart.CMETA)


def cdata(pool: str, volume: str) -> str:
    return volume_part(pool, volume, VolumePart.CDATA)


def metadata_sectors_for(data_sectors: int, block_sectors: int) -> int:
    """dm-cache's metadata for that many blocks: the kernel documentation's
    rough guide (4 MiB and 16 bytes a block), doubled, in whole 4 KiB."""
    blocks = data_sectors // block_sectors
    return -(-(2 * ((4 << 20) + 16 * blocks)) // 4096) * 8


def cache_table(volume: VolumeRecord, *, cleaner: bool = False) -> list[TargetLine]:
    """The volume's table with its cache (*cleaner*: the one that empties it)."""
    cache = volume.cache
    assert cache is not None
    pool, name = volume.pool, volume.name
    length = volume.size_bytes // 512
    if cache.kind == "writecache":
        params = WritecacheParams(origin_device=mapper_path(corig(pool, name)),
                                  cache_device=mapper_path(cdata(pool, name)),
                                  block_size_bytes=cache.block_sectors * 512, cleaner=cleaner)
        return [TargetLine(0, length, "writecache", params.to_params())]
    params_ = CacheParams(mapper_path(cmeta(pool, name)), mapper_path(cdata(pool, name)),
                          mapper_path(corig(pool, name)), cache.block_sectors,
                          # writethrough while cleaning: new writes make no dirty block
                          "writethrough" if cleaner else cache.mode, metadata2=True,
                          policy="cleaner" if cleaner else "smq")
    return [TargetLine(0, length, "cache", params_.to_params())]


def dirty_blocks(line: TargetLine) -> int:
    """What the cache still holds that its origin does not."""
    status = parse_status(line.target_type, line.params)
    if isinstance(status, CacheStatus):
        return status.dirty_blocks
    assert isinstance(status, WritecacheStatus)
    if status.error:
        raise errors.Kernel(f"the writecache is in error state ({os.strerror(status.error)})",
                            status.error)
    return status.total_blocks - status.free_blocks + status.writeback_blocks


def check_mode(mode: str, block_size: int | None) -> tuple[str, str, int]:
    if mode not in MODES:
        raise errors.InvalidArgument(f"cache mode {mode!r}: one of {', '.join(MODES)}")
    kind, io_mode = MODES[mode]
    if kind == "writecache":
        if block_size is not None:
            raise errors.InvalidArgument("block-size is for dm-cache (writeback, "
                                         "writethrough); writecache's blocks are 4 KiB")
        return kind, io_mode, WRITECACHE_BLOCK_SECTORS
    block = DEFAULT_BLOCK_SECTORS if block_size is None else block_size // 512
    if block_size is not None and (block_size % 512 or block % 64 or
                                   not MIN_BLOCK_SECTORS <= block <= MAX_BLOCK_SECTORS):
        raise errors.InvalidArgument("block-size is a multiple of 32 KiB from 32 KiB to "
                                     f"1 GiB, not {block_size}")
    return kind, io_mode, block


async def _source(pools: PoolCore, source: str, force: bool, caller: Caller
                  ) -> tuple[str, int, str | None]:
    """(path, sectors, volume uuid) of the cache device named *source*."""
    taken = {(v.cache.volume_uuid or v.cache.device): f"{v.pool}/{v.name}"
             for v in await pools.volumes() if v.cache is not None}
    if isinstance(source, str) and source.startswith("/"):
        # A whole device is overwritten: the pool action's authority, as
        # for CreatePool, not a volume owner's.
        await pools.check_authorized(caller, Action.POOL, source)
        if source in taken:
            raise errors.Busy(f"{source} is the cache of volume {taken[source]}")
        [facts] = await pools.free_devices([source])
        if facts.signature == "dmd_pool":  # a pool's disk (a stopped pool's, say): never
            raise errors.Busy(f"{source} is a dmd pool's disk: ImportPool or Start it")
        if facts.signature and not force:
            raise errors.Busy(f"{source} carries a {facts.signature} signature; pass force "
                              "to overwrite it")
        return facts.path, facts.size_bytes // 512, None
    pool, _, name = source.partition("/") if isinstance(source, str) else ("", "", "")
    if not pool or not name:
        raise errors.InvalidArgument(f"a cache device is a block device's path or a volume "
                                     f"as POOL/VOLUME, not {source!r}")
    volume = await pools.volume(pool, name)
    await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)
    if volume.uuid in taken:
        raise errors.Busy(f"volume {source} is the cache of volume {taken[volume.uuid]}")
    if volume.cache is not None or volume.encryption is not None:
        raise errors.InvalidArgument(f"volume {source} has a cache or is encrypted: a "
                                     "cache goes on a plain volume")
    if volume.revert is not None:
        raise errors.Busy(f"volume {source} has a revert scheduled: not a cache until "
                          "it is applied")
    if not volume.active:
        raise errors.NotActive(f"volume {source} is not active")
    return mapper_path(volume_device(pool, name)), volume.size_bytes // 512, volume.uuid


async def attach(pools: PoolCore, pool: str, name: str, source: str, *,
                 mode: str = "writeback", block_size: int | None = None,
                 force: bool = False, uuid: str | None = None, caller: Caller = ROOT,
                 accept: Accept | None = None) -> VolumeRecord:
    kind, io_mode, block = check_mode(mode, block_size)
    # One attach at a time: two on different pools could both find the same
    # device free before either holds it.
    async with pools.locks.hold(SOURCES_LOCK), pools.change(pool) as change:
        volume = await pools.volume(pool, name, uuid)
        await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)
        if volume.cache is not None:
            raise errors.AlreadyExists(f"volume {pool}/{name} has a cache: DetachCache first")
        if volume.revert is not None:
            raise errors.Busy(f"volume {pool}/{name} has a revert scheduled: it is applied "
                              "at its next activation, before a cache can go on it")
        device = volume_device(pool, name)
        if not volume.active or await pools.store.get_device(device) is None:
            raise errors.NotActive(f"volume {pool}/{name} is not active: Activate it first")
        if source == f"{pool}/{name}":
            raise errors.InvalidArgument("a volume is not its own cache")
        path, sectors, volume_uuid = await _source(pools, source, force, caller)
        # A device taken whole is labelled, as a pool's are (HEADER_SECTORS).
        header = HEADER_SECTORS if volume_uuid is None else 0
        sectors -= header
        meta = metadata_sectors_for(sectors, block) if kind == "cache" else 0
        data = (sectors - meta) // block * block
        if data < MIN_CACHE_BLOCKS * block:
            raise errors.InvalidArgument(
                f"{source} ({sectors * 512} bytes) is smaller than the cache needs: "
                f"{meta * 512} bytes of metadata and {MIN_CACHE_BLOCKS} blocks of "
                f"{block * 512} bytes")
        cached = replace(volume, cache=Cache(
            kind, io_mode, path, block, meta, data, volume_uuid, header,
            str(uuidlib.uuid4()) if volume_uuid is None else None))
        claim = pools.owner(pool)

        async def undo(_: Journal) -> None:
            await _remove_cache_devices(pools, cached)

        async def finish(_: Journal) -> None:
            await pools.record_change(pool, update=cached)

        async with intent(pools.store, pools.fault, "cache-attach", f"{pool}/{name}",
                          PoolArgs(pool=pool, volume=cached.to_json()), undo,
                          roll_forward=finish) as journal:
            if accept is not None:
                await change.accepted(cached, accept)
            await journal.mark(AttachStep.DEVICES)
            await _label(pools, cached)
            await build_cache_devices(pools, cached, fresh=True)
            await journal.mark(AttachStep.ORIGIN)
            await pools.devices.create(corig(pool, name), await pools.volume_table(volume),
                                       persistent=True, claim=claim)
            await journal.mark(AttachStep.SWAP)
            await pools.devices.reload(device, cache_table(cached), claim=claim)
            journal.no_way_back()
            await journal.mark(AttachStep.RECORD)
            await pools.record_change(pool, update=cached)
    log.info("cache-attach %s/%s: %s%s on %s, %d blocks of %d bytes", pool, name, kind,
             f" ({io_mode})" if io_mode else "", path, data // block, block * 512)
    return cached


async def build_cache_devices(pools: PoolCore, volume: VolumeRecord, *,
                              fresh: bool) -> None:
    """cmeta (dm-cache only) and cdata over the cache device; *fresh*: the
    start of the metadata (writecache: of the data) is zeroed, so that the
    kernel formats a new cache instead of taking an old one's blocks."""
    cache = volume.cache
    assert cache is not None
    pool, name, claim = volume.pool, volume.name, pools.owner(volume.pool)
    if not fresh:
        await check_label(pools, volume)
    header = cache.header_sectors
    areas = [(cdata(pool, name), header + cache.metadata_sectors, cache.data_sectors)]
    if cache.kind == "cache":
        areas.insert(0, (cmeta(pool, name), header, cache.metadata_sectors))
    for device, start, length in areas:
        if await pools.store.get_device(device) is None:
            await pools.devices.create(device, [(0, length, "linear",
                                                 f"{cache.device} {start}")],
                                       persistent=True, claim=claim)
    if fresh:
        first = areas[0][0]
        fd = await pools.kernel(Engine.open_node, first, os.O_RDWR)
        try:
            await pools.kernel.run_slow(_zero, fd, min(ZERO_BYTES, areas[0][2] * 512))
        finally:
            os.close(fd)


def _zero(fd: int, length: int) -> None:
    os.pwrite(fd, bytes(length), 0)
    os.fsync(fd)


async def _remove_cache_devices(pools: PoolCore, volume: VolumeRecord) -> None:
    """The cache's devices gone, and the label on a device taken whole
    wiped (only where it is still the cache's: a name may now be another
    disk's), so the device is free again."""
    claim = pools.owner(volume.pool)
    for device in (corig(volume.pool, volume.name), cmeta(volume.pool, volume.name),
                   cdata(volume.pool, volume.name)):
        try:
            await pools.devices.remove(device, claim=claim)
        except errors.NotFound:
            if await pools.store.get_device(device) is not None:
                await pools.store.remove_device(device)
    cache = volume.cache
    if cache is not None and cache.label_uuid is not None and \
            await _label_is_ours(pools, volume):
        await pools.kernel(Engine.wipe, cache.device, 0, BLOCK)


async def _label(pools: PoolCore, volume: VolumeRecord) -> None:
    """Write the label that names a device taken whole as this cache."""
    cache = volume.cache
    assert cache is not None
    if cache.label_uuid is None:
        return
    record = await pools.pool(volume.pool)
    await pools.kernel(Engine.write_disk, cache.device, 0,
                       Label(record.uuid, cache.label_uuid, 0, 1).encode())


async def _label_is_ours(pools: PoolCore, volume: VolumeRecord) -> bool:
    cache = volume.cache
    assert cache is not None and cache.label_uuid is not None
    record = await pools.pool(volume.pool)
    label, _ = await pools.descriptions.read_label(cache.device)
    return label is not None and (label.pool_uuid, label.device_uuid) == (
        record.uuid, cache.label_uuid)


async def check_label(pools: PoolCore, volume: VolumeRecord) -> None:
    """Busy unless the volume's cache device (taken whole) is still the disk
    it was attached on, as its label says: a path now naming another disk is
    never mapped."""
    cache = volume.cache
    if cache is None or cache.label_uuid is None:
        return  # another volume (known by its DM UUID), or attached before labels
    if not await _label_is_ours(pools, volume):
        raise errors.Busy(f"volume {volume.pool}/{volume.name}: {cache.device} is not the "
                          "disk its cache was attached on (no such label there); it stays "
                          "inactive until the cache's disk is back under that name")


async def activate_cached(pools: PoolCore, volume: VolumeRecord) -> None:
    """Make a cached volume's stack (after an import: a reboot's recovery
    makes it from the device records). The cache device must be there: its
    dirty blocks are the volume's latest writes."""
    assert volume.cache is not None
    present = False
    with contextlib.suppress(OSError, DmError, errors.ServiceError):
        if volume.cache.volume_uuid is not None:  # another pool's volume
            await pools.kernel(Engine.device_info,
                               volume.cache.device.removeprefix("/dev/mapper/"))
        else:
            await pools.kernel(Engine.block_device, volume.cache.device)
        present = True
    if not present:
        raise errors.NotFound(f"volume {volume.pool}/{volume.name}: its cache device "
                              f"{volume.cache.device} is missing (it may hold the volume's "
                              "latest writes): it stays inactive")
    await build_cache_devices(pools, volume, fresh=False)
    claim = pools.owner(volume.pool)
    if await pools.store.get_device(corig(volume.pool, volume.name)) is None:
        await pools.devices.create(corig(volume.pool, volume.name),
                                   await pools.volume_table(replace(volume, cache=None)),
                                   persistent=True, claim=claim)
    await pools.devices.create(volume_device(volume.pool, volume.name), cache_table(volume),
                               uuid=pools.device_uuid(volume), persistent=True, claim=claim)


async def detach(pools: PoolCore, pool: str, name: str, *, uuid: str | None = None,
                 caller: Caller = ROOT, accept: Accept | None = None) -> VolumeRecord:
    async with pools.change(pool) as change:
        volume = await pools.volume(pool, name, uuid)
        await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)
        if volume.cache is None:
            raise errors.InvalidArgument(f"volume {pool}/{name} has no cache")
        device = volume_device(pool, name)
        claim = pools.owner(pool)
        plain = replace(volume, cache=None)

        async def undo(_: Journal) -> None:
            await restore_cache(pools, volume)

        async def finish(_: Journal) -> None:
            await _finish_detach(pools, volume)

        async with intent(pools.store, pools.fault, "cache-detach", f"{pool}/{name}",
                          PoolArgs(pool=pool, volume=volume.to_json()), undo,
                          roll_forward=finish) as journal:
            if accept is not None:
                await change.accepted(volume, accept)
            await journal.mark(DetachStep.CLEAN)
            await pools.devices.reload(device, cache_table(volume, cleaner=True), claim=claim)
            await journal.mark(DetachStep.FLUSH)
            for _ in range(SWAP_TRIES):
                await _flush(pools, device, volume.cache.kind,
                             volume.cache.block_sectors * 512)
                await journal.mark(DetachStep.SWAP)
                if await _swap_when_clean(pools, device, await pools.volume_table(plain),
                                          claim, volume.cache.kind):
                    break
            else:
                raise errors.Busy(f"volume {pool}/{name}: its cache was dirty again at each "
                                  f"of {SWAP_TRIES} tries; it stays attached")
            journal.no_way_back()
            await journal.mark(DetachStep.REMOVE)
            await _remove_cache_devices(pools, volume)
            await journal.mark(DetachStep.RECORD)
            await pools.record_change(pool, update=plain)
    log.info("cache-detach %s/%s: every dirty block written back, %s released", pool, name,
             volume.cache.device)
    return plain


async def _dirty(pools: PoolCore, device: str) -> int:
    _, lines = await pools.kernel(Engine.table_status, device, DmFlags(0))
    return dirty_blocks(lines[0])


async def _flush(pools: PoolCore, device: str, kind: str, block_bytes: int) -> None:
    """Wait for the cleaner to write every dirty block back; the job's
    progress says how much of what was dirty is written. A writecache that
    stops emptying (a writer rewrites the blocks it holds) is left to its
    flush on suspend."""
    first = await _dirty(pools, device)
    best, since = first, asyncio.get_running_loop().time()
    while (left := await _dirty(pools, device)) > 0:
        now = asyncio.get_running_loop().time()
        if left < best:
            best, since = left, now
        elif kind == "writecache" and now - since > WRITECACHE_STALL:
            return
        work_bytes((first - left) * block_bytes, first * block_bytes)
        progress((DetachStep.FLUSH + (1 - left / max(first, 1))) / (len(DetachStep) + 1))
        cancel_point(past_way_back=False)
        await asyncio.sleep(FLUSH_POLL)


async def _swap_when_clean(pools: PoolCore, device: str, table: list[TargetLine],
                           claim: str, kind: str) -> bool:
    """Suspend (in-flight writes land), check that nothing is dirty while
    nothing can write, and swap in *table*; False (resumed as it was) if a
    block is dirty."""
    if kind == "writecache":
        # dm-writecache's cleaner still caches writes to blocks it holds (so
        # that they stay in order): a writer that keeps rewriting them would
        # keep it from ever emptying. Asked to, it writes everything back
        # while it suspends, when nothing can write.
        await pools.devices.message(device, 0, "flush_on_suspend", claim=claim)
    await pools.devices.suspend(device, claim=claim)
    try:
        if await _dirty(pools, device) > 0:
            await pools.devices.resume(device, claim=claim)
            return False
        await pools.devices.load(device, table, claim=claim)
    except BaseException:
        with contextlib.suppress(errors.ServiceError):
            await pools.devices.resume(device, claim=claim)
        raise
    await pools.devices.resume(device, claim=claim)
    await _record_table(pools, device, table)
    return True


async def _record_table(pools: PoolCore, device: str, table: list[TargetLine]) -> None:
    """The device's record takes its new live table (a load and a resume
    do not write it): a reboot re-creates the device from it."""
    await pools.store.update_table(device, table, False)


async def restore_cache(pools: PoolCore, volume: VolumeRecord) -> None:
    """The cache attached as it was (its normal policy), the device resumed:
    a detach undone keeps every dirty block where it is."""
    device = volume_device(volume.pool, volume.name)
    claim = pools.owner(volume.pool)
    info = await pools.kernel(Engine.device_info, device)
    if info.inactive_present:
        await pools.devices.clear(device, claim=claim)
    await pools.devices.reload(device, cache_table(volume), claim=claim)


async def _finish_detach(pools: PoolCore, volume: VolumeRecord) -> None:
    plain = replace(volume, cache=None)
    await _record_table(pools, volume_device(volume.pool, volume.name),
                        await pools.volume_table(plain))
    await _remove_cache_devices(pools, volume)
    await _record_cache(pools, volume, None)


async def _record_cache(pools: PoolCore, volume: VolumeRecord, cache: Cache | None) -> None:
    """The volume's record as it is now, with *cache*: only the cache is
    this operation's to write (a record kept in an intent may be older than
    another change since, a revert's thin id)."""
    now = await pools.recorded(volume)
    if now is not None:
        await pools.record_change(volume.pool, update=replace(now, cache=cache))


def _live_is_cache(lines: list[TargetLine]) -> bool:
    return bool(lines) and lines[0].target_type in ("cache", "writecache")


async def recover(pools: PoolCore, operation: str, volume: VolumeRecord) -> str | None:
    """Settle an interrupted attach or detach by the volume's live table:
    a cache table means attached (a detach is undone), the volume's own
    means detached (an attach is undone)."""
    device = volume_device(volume.pool, volume.name)
    claim = pools.owner(volume.pool)
    try:
        info, lines = await pools.kernel(Engine.table_status, device, DmFlags.DM_STATUS_TABLE)
    except DmError:
        # No device (its cache device late or gone at boot): which table is
        # live cannot be known, and a detach finished now could drop dirty
        # blocks. Left pending, and reported.
        log.error("recovery: %s %s/%s: its device is missing; left for when it is back",
                  operation, volume.pool, volume.name)
        return None
    if not lines:
        log.error("recovery: %s %s/%s: its device has no live table; left pending",
                  operation, volume.pool, volume.name)
        return None
    if info.suspended:
        if info.inactive_present:
            await pools.devices.clear(device, claim=claim)
        await pools.devices.resume(device, claim=claim)
    if operation == "cache-attach":
        attached = volume
        if _live_is_cache(lines):
            await _record_cache(pools, volume, volume.cache)
            return "done"
        await _remove_cache_devices(pools, attached)
        return "rolled_back"
    if _live_is_cache(lines):
        await restore_cache(pools, volume)
        return "rolled_back"
    await _finish_detach(pools, volume)
    return "done"



async def recover_intent(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                         record: PoolRecord | None) -> str | None:
    """After a crash (dmd.service.pools.recovery)."""
    if record is None:
        return "rolled_back"
    pools.claim(args.pool)
    assert args.volume is not None
    return await recover(pools, intent.operation, VolumeRecord.from_json(args.volume))


RECOVERY: dict[str, Recover] = {"cache-attach": recover_intent, "cache-detach": recover_intent}
