"""Pools and volumes: what a service asks for ("20 GiB from that pool"),
made of thin-provisioning devices it never has to learn about.

A pool is laid out by dmd over whole devices an admin hands it: each device
keeps its first 4 MiB for the pool's own description (a label and two
copies of the pool's and its volumes' records: dmd.state.pool_description,
rewritten at the end of every change: dmd.service.pools.descriptions), the
metadata device takes the size the kernel's documentation asks for from the
first device, and the data device is everything else. Its device-mapper devices are named after it:

    P-tmeta  P-tdata  P-tpool   and one  P-V  per active volume V

and claimed (``DeviceService.claims``): raw device calls on them are refused
with Busy, naming the pool. Every device is a persistent managed device, so
after a reboot the service's recovery re-creates them in order (each after
the devices its table names).

Thin ids are handed out from the pool's ``next_thin_id`` (made durable
before the id is used, and only ever raised), and every change to the set of
thin ids moves the pool's transaction id by one, as described in
dmd.service.journal; ``recover_pools`` reads it after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from dmd.engine import DevId, DmError, DmFlags, NotABlockDevice, TargetLine, luks
from dmd.engine.blockdev import BlockDevice
from dmd.engine.interface import Engine
from dmd.engine.targets import parse_status
from dmd.engine.targets.thin import (
    MAX_METADATA_SECTORS,
    MAX_THIN_ID,
    MIN_METADATA_SECTORS,
    ThinPoolParams,
    ThinPoolStatus,
    create_snap,
    create_thin,
    delete,
    metadata_sectors,
    set_transaction_id,
    valid_block_sectors,
)
from dmd.engine.types import MAX_DEVICE_SECTORS
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Caller
from dmd.service.devices.operations import DeviceService, check_labels
from dmd.service.jobs import Job, Jobs, cancel_point, progress
from dmd.service.journal import (
    Journal,
    PoolArgs,
    PoolCreateStep,
    PoolDestroyStep,
    PoolGrowStep,
    SnapshotStep,
    ThickResizeStep,
    VolumeActivateStep,
    VolumeCreateStep,
    VolumeDeleteStep,
    VolumeResizeStep,
    intent,
)
from dmd.service.locks import DeviceLocks
from dmd.service.pools import cache as cached
from dmd.service.pools import crypt as crypt
from dmd.service.pools.crypt import EncryptionRequest
from dmd.service.pools.descriptions import Descriptions
from dmd.service.pools.filesystems import check_filesystem, make_filesystem
from dmd.service.pools.names import (
    PoolName,
    PoolPart,
    VolumeName,
    VolumePart,
    check_cleartext,
    claim_prefix,
    cleartext_device,
    cleartext_uuid,
    in_pool,
    parts,
    pool_device,
    pool_devices,
    pool_of,
    tpool,
    volume_device,
)
from dmd.service.pools.room import HEADER_SECTORS, allocate, check_stripes, thick_table
from dmd.state import (
    Cache,
    DeviceRecord,
    Encryption,
    PoolLayout,
    PoolRecord,
    Segment,
    Thick,
    VolumeRecord,
)
from dmd.state.pool_description import (
    PAYLOAD_ROOM,
    Description,
    DescriptionError,
)

log = logging.getLogger(__name__)

MIN_DEVICE_BYTES = 16 << 20
DEFAULT_BLOCK_SECTORS = 128  # 64 KiB, LVM's default for thin pools
WIPE_BYTES = 1 << 20  # of the metadata's start: the kernel then formats a new pool
EXTEND_PERCENT = 20  # LVM's thin_pool_autoextend_percent default
METADATA_LOW_PERCENT = 20  # metadata free below this: extend it too
UNDO_BUSY_WAITS = (*[0.2] * 25, None)  # seconds between tries of an undo's remove
POOL_OPERATIONS = frozenset({"pool-create", "pool-destroy", "pool-grow", "pool-import",
                             "pool-extend",
                             "volume-create", "volume-snapshot", "volume-delete",
                             "volume-create-thick", "volume-delete-thick",
                             "volume-resize-thick", "cache-attach", "cache-detach",
                             "volume-activate", "volume-deactivate", "volume-resize"})


@dataclass(frozen=True, slots=True)
class PoolState:
    """What the kernel says of a pool now (None where the pool is not active)."""

    transaction_id: int | None
    data_used_bytes: int
    data_total_bytes: int
    metadata_used_bytes: int
    metadata_total_bytes: int
    # ok, out-of-data-space, out-of-metadata-space, read-only, needs-check, inactive
    mode: str
    # Metadata free below this raises the pool's event: min(4 MiB, a quarter
    # of the metadata device), fixed by the kernel.
    metadata_low_water_bytes: int = 0


def metadata_low(used: int, total: int, low_water: int) -> bool:
    """Under METADATA_LOW_PERCENT free, or at the kernel's own mark (a
    quarter free on a small metadata device, 4 MiB on a large one: its
    event says so, and it comes once)."""
    return total > 0 and (100.0 * (total - used) / total <= METADATA_LOW_PERCENT
                          or total - used <= low_water)


def metadata_growth(total: int) -> int:
    """How much a low metadata device grows by: EXTEND_PERCENT, at least
    1 MiB, in whole 4 KiB metadata blocks."""
    return max(total * EXTEND_PERCENT // 100, 1 << 20) // 4096 * 4096


def check_size(size_bytes: int) -> int:
    """A volume size in bytes, rounded up to whole 512-byte sectors."""
    if not isinstance(size_bytes, int) or isinstance(size_bytes, bool) or size_bytes <= 0:
        raise errors.InvalidArgument(f"a volume size is a positive number of bytes, "
                                     f"not {size_bytes!r}")
    sectors = -(-size_bytes // 512)
    if sectors > MAX_DEVICE_SECTORS:
        raise errors.InvalidArgument(
            f"{size_bytes} bytes is larger than the kernel's largest device "
            f"({MAX_DEVICE_SECTORS * 512} bytes)")
    return sectors * 512


def layout(devices: list[tuple[str, int]], block_sectors: int,
           data_sectors: int | None = None, meta_sectors: int | None = None) -> PoolLayout:
    """Metadata from the first device after its header, data over the rest
    of it and every other device, in whole data blocks; with *data_sectors*,
    only that much data (rounded down to whole blocks), the rest left free
    for the pool to grow into (dmd.service.pools.space). The metadata is sized
    for all of it either way, unless *meta_sectors* says how much."""
    usable = [(size // 512) - HEADER_SECTORS for _, size in devices]
    total = sum(usable)
    meta = metadata_sectors(total, block_sectors) if meta_sectors is None else meta_sectors
    if meta >= usable[0]:
        raise errors.InvalidArgument(
            f"{devices[0][0]} is too small for the pool's metadata ({meta * 512} bytes)")
    data: list[Segment] = [Segment(0, HEADER_SECTORS + meta, usable[0] - meta)]
    data += [Segment(i, HEADER_SECTORS, n) for i, n in enumerate(usable) if i > 0]
    extra = sum(s.length for s in data) % block_sectors
    if data_sectors is not None:
        extra = max(extra, sum(s.length for s in data) - data_sectors // block_sectors
                    * block_sectors)
    while extra:  # whole blocks only (or no more than asked): trim the tail
        last = data[-1]
        cut = min(extra, last.length)
        data[-1:] = [replace(last, length=last.length - cut)] if last.length > cut else []
        extra -= cut
    if sum(s.length for s in data) < block_sectors:
        raise errors.InvalidArgument("the devices leave no room for data")
    return PoolLayout(tuple(p for p, _ in devices), tuple(s for _, s in devices),
                      (Segment(0, HEADER_SECTORS, meta),), tuple(data))


def _linear(layout_: PoolLayout, segments: tuple[Segment, ...]) -> list[TargetLine]:
    lines, at = [], 0
    for seg in segments:
        lines.append(TargetLine(at, seg.length, "linear",
                                f"{layout_.devices[seg.device]} {seg.start}"))
        at += seg.length
    return lines


def _pool_table(record: PoolRecord, *, fail_writes: bool = False) -> list[TargetLine]:
    """*fail_writes*: writes to the full pool fail, whatever its on-full (a
    queueing pool past its no-space-timeout)."""
    data = record.layout.data_sectors
    low_water = data // record.block_sectors * record.low_water_percent // 100
    params = ThinPoolParams(f"/dev/mapper/{pool_device(record.name, PoolPart.TMETA)}",
                            f"/dev/mapper/{pool_device(record.name, PoolPart.TDATA)}",
                            record.block_sectors, low_water,
                            error_if_no_space=fail_writes or record.on_full == "error")
    return [TargetLine(0, data, "thin-pool", params.to_params())]


def _thin_table(pool: str, thin_id: int, size_bytes: int) -> list[TargetLine]:
    return [TargetLine(0, size_bytes // 512, "thin", f"/dev/mapper/{tpool(pool)} {thin_id}")]


def volume_uuid(uuid: str) -> str:
    """The device-mapper UUID of the device of the volume with UUID *uuid*."""
    return f"DMD-VOL-{uuid}"


Accept = Callable[[Any], None]


def _ignore(_: Any) -> None:
    pass


class PoolService:
    """Every method that changes something calls *accept* with its subject
    once the request can no longer be refused (validated, intent durable):
    a Job (dmd.service.jobs) answers its caller then. The only writer of
    pools and volumes."""

    def __init__(self, devices: DeviceService) -> None:
        self.devices = devices
        self.kernel = devices.kernel
        self.store = devices.store
        self.fault = devices.fault
        self.locks = DeviceLocks()
        # Subjects mid-operation, shown while their records are not final:
        # uuid -> (volume, "creating" | "deleting"); name -> (pool, state).
        self.pending: dict[str, tuple[VolumeRecord, str]] = {}
        self.pending_pools: dict[str, tuple[PoolRecord, str]] = {}
        self._settlers: list[Callable[[str], Awaitable[None]]] = []
        self.jobs = Jobs()
        self.descriptions = Descriptions(self.kernel, devices.fault)
        # Pools this dmd will not change (name -> why): their description
        # cannot be trusted, or another manager moved their transaction id.
        self.refused: dict[str, str] = {}
        # Encrypted volumes recorded unlocked that have no cleartext device
        # yet (uuid -> what they wait for): dmd.service.pools.crypt.
        self.waiting: dict[str, str] = {}
        # Pool UUID -> the generation whose description names an operation
        # under way (describe_pending).
        self._pending_described: dict[str, int] = {}
        # Pool UUID -> why its disks are not its own (None: they are), as
        # found at start-up (recreate_guard).
        self._disks_checked: dict[str, str | None] = {}
        devices.recreate_guards.append(self.recreate_guard)

    async def as_job(self, operation: str, caller: Caller,
                     call: Callable[[Accept], Awaitable[Any]]) -> tuple[Job, Any]:
        """Run *call(accept)* (one of the methods below, given its accept) as a
        Job: returns once it is accepted, with the job and its subject."""
        return await self.jobs.start(operation, caller.uid, call)

    def add_settler(self, settler: Callable[[str], Awaitable[None]]) -> None:
        """*settler(pool)* runs after every change to a pool or its volumes,
        before the change's caller hears of it (the bus shows it then)."""
        self._settlers.append(settler)

    async def _settle(self, pool: str) -> None:
        for settler in list(self._settlers):
            try:
                await settler(pool)
            except Exception:
                log.exception("pool %s: settling the change failed", pool)

    async def settle_now(self, pool: str) -> None:
        """Show a change made outside an operation (the waiting of a volume)."""
        await self._settle(pool)

    async def accept_now(self, pool: str, subject: Any, accept: Accept) -> None:
        """Show the change begun and answer its caller (an operation of
        another module, inside ``changing``)."""
        await self._accepted(pool, subject, accept)

    @staticmethod
    def device_uuid(volume: VolumeRecord) -> str:
        return volume_uuid(volume.uuid)

    async def _accepted(self, pool: str, subject: Any, accept: Accept) -> None:
        await self._settle(pool)
        accept(subject)

    @contextlib.asynccontextmanager
    async def changing(self, pool: str) -> AsyncIterator[None]:
        """One change at a time to a pool; settled however it ends."""
        async with self.locks.hold(pool):
            if pool in self.refused:
                raise errors.Busy(f"pool {pool!r} is not changed by dmd: {self.refused[pool]}")
            try:
                yield
            finally:
                # The lock makes this operation the only one on the pool, so
                # whatever is pending in it is this operation's.
                for key in [k for k, (v, _) in self.pending.items() if v.pool == pool]:
                    del self.pending[key]
                self.pending_pools.pop(pool, None)
                await self.describe(pool)
                await self._settle(pool)

    async def check_fits(self, record: PoolRecord, volume: VolumeRecord) -> None:
        """LimitExceeded unless the pool's description, with *volume* added
        (or put in place of the record of its UUID), fits in its copy on the
        devices: refused before any work, so every change dmd makes can be
        described (and the pool imported from its devices)."""
        volumes = [v for v in await self.store.list_volumes(record.name)
                   if v.uuid != volume.uuid]
        size = len(Description(record.generation + 1, record, (*volumes, volume)).payload())
        # The description naming the operation under way holds its record
        # once more (describe_pending).
        size += len(json.dumps(_volume_json(volume), separators=(",", ":"),
                               ensure_ascii=False).encode()) + 128
        if size > PAYLOAD_ROOM:
            raise errors.LimitExceeded(
                f"pool {record.name!r}: its description would take {size} bytes, more than "
                f"the {PAYLOAD_ROOM} its devices keep for it (fewer or shorter labels, or "
                "another pool)")

    async def describe_pending(self, pool: str, operation: str, *,
                               transaction_from: int | None = None,
                               volume: VolumeRecord | None = None,
                               layout: PoolLayout | None = None) -> None:
        """Before a step the kernel cannot take back: the description names
        the operation under way (a generation of its own), so that
        ImportPool, after a crash here and the loss of dmd's state, knows
        what the kernel may hold that the records do not
        (dmd.service.pools.importing): a message moving the transaction id from
        *transaction_from* about *volume*, or the pool growing to *layout*
        (the description then says the pool is that: an import finishes the
        growth). Its failure fails the operation."""
        await self.store.pool_change(pool)
        record = await self.pool(pool)
        if layout is not None:
            record = replace(record, layout=layout)
        pending: dict[str, Any] = {"operation": operation}
        if transaction_from is not None and volume is not None:
            # A deleted volume is among the description's own: its UUID says
            # which (and a delete never needs more room than there is).
            pending.update(transaction_from=transaction_from,
                           volume={"uuid": volume.uuid} if operation == "volume-delete"
                           else _volume_json(volume))
        try:
            await self.descriptions.write(record, await self.store.list_volumes(pool), pending)
        except (OSError, DescriptionError) as exc:
            raise errors.Kernel(f"pool {pool}: writing its description: {exc}", getattr(
                exc, "errno", 0) or 0) from None
        self._pending_described[record.uuid] = record.generation

    async def describe(self, pool: str) -> None:
        """Bring the description on the pool's devices to the generation of
        its records (nothing to do if it is there). A failure is logged: the
        records stand, and the next change or start-up writes it again."""
        record = await self.store.get_pool(pool)
        if record is None or pool in self.refused:
            return
        if self._pending_described.pop(record.uuid, None) == record.generation:
            # The description there names an operation that has ended: the
            # one without it gets a generation of its own.
            await self.store.pool_change(pool)
            record = await self.pool(pool)
        if len(record.layout.ids) != len(record.layout.devices):
            # Recorded before devices had labels: each gets its UUID now, on
            # the device first (a crash between leaves labels no record
            # names, written again next time; never a record of labels
            # that are not there).
            labelled = replace(record, layout=replace(
                record.layout, ids=tuple(str(uuidlib.uuid4()) for _ in record.layout.devices)))
            try:
                await self.descriptions.label(labelled)
            except OSError as exc:
                log.error("pool %s: could not label its devices: %s", pool, exc)
                return
            await self.store.pool_change(pool, layout=labelled.layout)
            record = await self.pool(pool)
        if self.descriptions.written.get(record.uuid) == record.generation:
            return
        try:
            await self.descriptions.write(record, await self.store.list_volumes(pool))
        except (OSError, DescriptionError) as exc:
            log.error("pool %s: could not write its description (generation %d): %s; "
                      "written again at its next change or dmd's next start", pool,
                      record.generation, exc)

    @staticmethod
    def owner(pool: str) -> str:
        return f"pool {pool!r}"

    async def start(self) -> None:
        """Claim the names of every recorded pool."""
        for pool in await self.store.list_pools():
            self._claim(pool.name)

    async def check_devices(self, record: PoolRecord) -> None:
        """Busy unless every path of the pool's layout still names the disk
        the pool was laid on: the label there says so (its pool's and its
        own UUID). A path is looked up again at every table load; a disk
        renamed (another disk now under that name) is refused, never
        written: ImportPool finds the pool's disks by their labels."""
        layout_ = record.layout
        if len(layout_.ids) != len(layout_.devices):
            return  # recorded before devices had labels: its next change gives them
        for index, path in enumerate(layout_.devices):
            label, why = await self.descriptions.read_label(path)
            why = why or "the label of another device"
            if label is None or (label.pool_uuid, label.device_uuid) != (
                    record.uuid, layout_.ids[index]):
                raise errors.Busy(
                    f"pool {record.name!r}: {path} is not the disk the pool was laid on "
                    f"({why}); nothing was written to it (ImportPool finds a pool's disks "
                    "by their labels)")

    async def recreate_guard(self, device: DeviceRecord) -> str | None:
        """DeviceService.recreate_guards: a pool's devices are re-created at
        start-up only over the pool's own disks."""
        pool = pool_of(device.name)
        record = await self.store.get_pool(pool) if pool is not None else None
        if record is None or not in_pool(device.name, claim_prefix(pool or "")):
            return None
        if record.uuid not in self._disks_checked:
            try:
                await self.check_devices(record)
                self._disks_checked[record.uuid] = None
            except errors.Busy as exc:
                self._disks_checked[record.uuid] = str(exc)
                self.refused[record.name] = str(exc)
        if self._disks_checked[record.uuid] is not None:
            return self._disks_checked[record.uuid]
        split = parts(device.name)
        if len(split) == 2 or (len(split) == 3 and split[2] in (VolumePart.CMETA,
                                                                 VolumePart.CDATA)):
            # A cache's areas, and the volume's device over them: over the
            # cache's own disk only (its label says).
            volume = next((v for v in await self.store.list_volumes(record.name)
                           if v.name == split[1]), None)
            if volume is not None:
                try:
                    await cached.check_label(self, volume)
                except errors.Busy as exc:
                    return str(exc)
        return None

    def _claim(self, pool: str) -> None:
        self.devices.claims[claim_prefix(pool)] = self.owner(pool)

    def _release(self, pool: str) -> None:
        self.devices.claims.pop(claim_prefix(pool), None)

    async def check_authorized(self, caller: Caller, action: Action, subject: str,
                         owner_uid: int | None = None) -> None:
        await self.devices.authorize(caller, action, subject)
        if owner_uid is not None and caller.uid not in (0, owner_uid):
            raise errors.NotAuthorized(
                f"{subject} belongs to uid {owner_uid}; uid {caller.uid} may not change it")

    # -- reads -----------------------------------------------------------------
    async def pools(self) -> list[PoolRecord]:
        return await self.store.list_pools()

    async def pool(self, name: str) -> PoolRecord:
        record = await self.store.get_pool(name)
        if record is None:
            raise errors.NotFound(f"no pool named {name!r}")
        return record

    @staticmethod
    def _uncached(volume: VolumeRecord, what: str) -> None:
        if volume.cache is not None:
            raise errors.Busy(f"volume {volume.pool}/{volume.name} has a cache: DetachCache "
                              f"before {what} it")

    async def thick_segments(self, pool: str) -> tuple[Segment, ...]:
        """The segments of the pool's devices its thick volumes hold."""
        return tuple(s for v in await self.store.list_volumes(pool) if v.thick is not None
                     for s in v.thick.segments)

    async def volumes(self, pool: str | None = None) -> list[VolumeRecord]:
        return await self.store.list_volumes(pool)

    async def volume(self, pool: str, name: str, uuid: str | None = None) -> VolumeRecord:
        """*uuid*: the volume a caller's object stands for. Read under the
        pool's lock, it makes sure a call on a volume deleted meanwhile never
        reaches another volume given the same name since."""
        for volume in await self.store.list_volumes(pool):
            if volume.name == name and uuid in (None, volume.uuid):
                return volume
        await self.pool(pool)
        if uuid is not None:
            raise errors.NotFound(f"volume {uuid} ({pool}/{name}) is gone")
        raise errors.NotFound(f"no volume {name!r} in pool {pool!r}")

    async def own_device(self, volume: VolumeRecord) -> bool:
        """Whether the volume's device is recorded; Busy when a device of its
        name is recorded that is not the volume's (its DM UUID says whose)."""
        device = await self.store.get_device(volume_device(volume.pool, volume.name))
        if device is None:
            return False
        if device.uuid != volume_uuid(volume.uuid):
            raise errors.Busy(f"device {device.name} is not volume {volume.pool}/{volume.name}'s "
                              f"(its DM UUID is {device.uuid!r})")
        return True

    async def open_node(self, volume: VolumeRecord, flags: int, *,
                        cleartext: bool = False) -> int:
        """An open descriptor of the volume's device (or its cleartext), found
        by its DM UUID, so that whatever holds its name, the descriptor is
        this volume's and nobody else's."""
        if cleartext:
            assert volume.encryption is not None
            target = DevId.uuid(cleartext_uuid(volume.encryption.luks_uuid,
                                               cleartext_device(volume.pool, volume.name)))
        else:
            target = DevId.uuid(volume_uuid(volume.uuid))
        return int(await self.kernel(Engine.open_node, target, flags))

    async def pool_state(self, pool: str, record: PoolRecord | None = None) -> PoolState:
        """*record*: the pool's, where it is not in the store (yet)."""
        record = record or await self.pool(pool)
        try:
            _, lines = await self.kernel(Engine.table_status, tpool(pool))
        except DmError:
            return PoolState(None, 0, record.layout.data_sectors * 512, 0,
                             record.layout.metadata_sectors * 512, "inactive")
        status = parse_status("thin-pool", lines[0].params)
        assert isinstance(status, ThinPoolStatus)
        block = record.block_sectors * 512
        # A reload puts a full pool back in write mode until its next
        # allocation fails: no free block is out of data space all the same.
        full = status.mode == "out_of_data_space" or (
            status.total_data_blocks > 0 and status.used_data_blocks >= status.total_data_blocks)
        # The kernel says "ro" for a pool whose metadata ran out as for one it
        # stopped after an error; only the first goes on once the metadata
        # grows (and its free count is 0: the kernel keeps a reserve unshown).
        mode = ("needs-check" if status.needs_check else
                "out-of-metadata-space" if status.mode == "ro"
                and status.used_metadata_blocks >= status.total_metadata_blocks else
                "read-only" if status.mode == "ro" else "out-of-data-space" if full else "ok")
        low = status.metadata_low_water_mark_blocks
        return PoolState(status.transaction_id, status.used_data_blocks * block,
                         status.total_data_blocks * block, status.used_metadata_blocks * 4096,
                         status.total_metadata_blocks * 4096, mode,
                         (min(1024, status.total_metadata_blocks // 4) if low is None else low)
                         * 4096)

    async def _kernel_tid(self, pool: str, record: PoolRecord | None = None) -> int:
        state = await self.pool_state(pool, record)
        if state.transaction_id is None:
            raise errors.Busy(f"pool {pool!r} is not active")
        return state.transaction_id

    # -- pools -------------------------------------------------------------------
    async def create_pool(self, name: str, paths: list[str], *, force: bool = False,
                          block_size: int | None = None, on_full: str = "queue",
                          low_water_percent: int = 20, data_size: int | None = None,
                          no_space_timeout: int = 60, metadata_size: int | None = None,
                          caller: Caller = ROOT,
                          accept: Accept = _ignore) -> PoolRecord:
        await self.check_authorized(caller, Action.POOL, name)
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
        async with self.changing(name):
            if await self.store.get_pool(name) is not None:
                raise errors.AlreadyExists(f"a pool named {name!r} exists")
            sized = await self._check_devices(paths, force)
            plan = replace(layout(sized, block_sectors,
                                  data_size // 512 if data_size is not None else None,
                                  -(-metadata_size // 4096) * 8 if metadata_size else None),
                           ids=tuple(str(uuidlib.uuid4()) for _ in sized))
            record = PoolRecord(name, str(uuidlib.uuid4()), caller.uid, block_sectors, on_full,
                                low_water_percent, 0, 0, plan,
                                no_space_timeout=no_space_timeout)
            for device in pool_devices(name):
                if (await self.devices.store.get_device(device)) is not None:
                    raise errors.AlreadyExists(f"a device named {device} exists")
            self._claim(name)
            try:
                await self._make_pool(record, accept)
            except BaseException:
                self._release(name)
                raise
        log.info("pool-create %s: %d device(s), %d bytes of data", name, len(paths),
                 plan.data_sectors * 512)
        return record

    async def free_devices(self, paths: list[str]) -> list[BlockDevice]:
        """What each of *paths* is, refused unless it is a block device that
        no recorded pool has and nobody holds open."""
        taken = {p: pool.name for pool in await self.store.list_pools()
                 for p in pool.layout.devices}
        found = []
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise errors.InvalidArgument(f"a pool device is an absolute path, not {path!r}")
            if path in taken:
                raise errors.Busy(f"{path} is a device of pool {taken[path]!r}")
            try:
                facts = await self.kernel(Engine.block_device, path)
            except NotABlockDevice as exc:
                raise errors.InvalidArgument(str(exc)) from None
            except OSError as exc:
                raise errors.InvalidArgument(f"{path}: {exc.strerror}") from None
            if facts.in_use:
                raise errors.Busy(f"{path} is in use (mounted, or held by another device)")
            found.append(facts)
        return found

    async def _check_devices(self, paths: list[str], force: bool) -> list[tuple[str, int]]:
        """free_devices, and none with a signature (unless *force*; another
        pool's never) or too small: what a new pool or AddDevice may take."""
        sized = []
        for facts in await self.free_devices(paths):
            path = facts.path
            if facts.signature == "dmd_pool" or (facts.signature and not force):
                raise errors.Busy(
                    f"{path} carries a {facts.signature} signature; pass force to overwrite it"
                    if facts.signature != "dmd_pool" else f"{path} belongs to another dmd pool")
            if facts.size_bytes < MIN_DEVICE_BYTES:
                raise errors.InvalidArgument(
                    f"{path} is {facts.size_bytes} bytes; a pool device needs at least "
                    f"{MIN_DEVICE_BYTES}")
            sized.append((path, facts.size_bytes))
        return sized

    async def _make_pool(self, record: PoolRecord, accept: Accept) -> None:
        name, plan, claim = record.name, record.layout, self.owner(record.name)

        async def undo(journal: Journal) -> None:
            await self._remove_pool_devices(name)
            if journal.step >= PoolCreateStep.POOL:  # the kernel may have formatted it
                await self._wipe_metadata(plan)
            await self.descriptions.unlabel(plan.devices, plan.ids)

        async with intent(self.store, self.fault, "pool-create", name,
                          PoolArgs(pool=name, layout=plan.to_json()), undo) as journal:
            self.pending_pools[name] = (record, "creating")
            await self._accepted(name, record, accept)
            await journal.mark(PoolCreateStep.WIPE)
            for path in plan.devices:  # old signatures, and any old description
                await self.kernel(Engine.wipe, path, 0, HEADER_SECTORS * 512)
            await self._wipe_metadata(plan)
            await self.descriptions.label(record)
            await journal.mark(PoolCreateStep.DEVICES)
            await self.devices.create(pool_device(name, PoolPart.TMETA),
                                      _linear(plan, plan.metadata),
                                      uuid=f"DMD-POOL-{record.uuid}-tmeta", persistent=True,
                                      claim=claim)
            await self.devices.create(pool_device(name, PoolPart.TDATA),
                                      _linear(plan, plan.data),
                                      uuid=f"DMD-POOL-{record.uuid}-tdata", persistent=True,
                                      claim=claim)
            await journal.mark(PoolCreateStep.POOL)
            await self.devices.create(tpool(name), _pool_table(record),
                                      uuid=f"DMD-POOL-{record.uuid}-tpool", persistent=True,
                                      claim=claim)
            await journal.mark(PoolCreateStep.RECORD)
            await self.store.add_pool(record)

    async def _wipe_metadata(self, plan: PoolLayout) -> None:
        """Zero the start of the pool's metadata: the kernel then sees no pool
        there (a new one is formatted, an old one cannot come back)."""
        meta = plan.metadata[0]
        await self.kernel(Engine.wipe, plan.devices[meta.device], meta.start * 512,
                          WIPE_BYTES)

    async def _remove_pool_devices(self, pool: str) -> None:
        """Remove the pool's devices, volumes first; each is tried."""
        claim = self.owner(pool)
        names = [d.name for d in await self.kernel(Engine.list_devices)]
        internal = pool_devices(pool)
        prefix = claim_prefix(pool)
        # Cleartext devices first: each holds its volume's device.
        order = sorted((n for n in names if in_pool(n, prefix) and n not in internal),
                       key=lambda n: (parts(n)[2:] != [VolumePart.CRYPT], n))
        order += [n for n in internal if n in names]
        for device in order:
            with contextlib.suppress(errors.NotFound):
                await self.devices.remove(device, claim=claim)
        for record in await self.store.list_devices():
            if record.name in internal:
                await self.store.remove_device(record.name)

    async def destroy_pool(self, name: str, *, force: bool = False,
                           caller: Caller = ROOT,
                           accept: Accept = _ignore) -> None:
        """Remove the pool, its devices and records. Refused while it has
        volumes, unless *force* (then they go too, data and all)."""
        async with self.changing(name):
            record = await self.pool(name)
            await self.check_authorized(caller, Action.POOL, name, record.owner_uid)
            volumes = await self.store.list_volumes(name)
            if volumes and not force:
                raise errors.Busy(f"pool {name!r} has {len(volumes)} volume(s); delete them "
                                  "first or pass force")
            for volume in volumes:  # refuse before anything goes if one is open
                device = (cleartext_device if volume.encryption is not None
                          and await crypt.cleartext_present(self, name, volume.name)
                          else volume_device)(name, volume.name)
                with contextlib.suppress(DmError):
                    info = await self.kernel(Engine.device_info, device)
                    if info.open_count:
                        raise errors.Busy(f"volume {volume.name!r} is open")
            async def finish(_: Journal) -> None:
                await self.finish_destroy(record)

            async with intent(self.store, self.fault, "pool-destroy", name,
                              PoolArgs(pool=name), roll_forward=finish) as journal:
                self.pending_pools[name] = (record, "destroying")
                await self._accepted(name, record, accept)
                journal.no_way_back()
                await journal.mark(PoolDestroyStep.DEVICES)
                await self._destroy_devices(record)
                await journal.mark(PoolDestroyStep.RECORD)
                await self._destroy_records(record)
            self._release(name)
        log.info("pool-destroy %s: done", name)

    async def finish_destroy(self, record: PoolRecord) -> None:
        """Finish a destroy from wherever it stopped: each step is skipped if
        it was done."""
        await self._destroy_devices(record)
        await self._destroy_records(record)
        self._release(record.name)

    async def _destroy_devices(self, record: PoolRecord) -> None:
        """Remove the volumes' devices and the pool's, and zero its metadata."""
        claim = self.owner(record.name)
        for volume in await self.store.list_volumes(record.name):
            await crypt.close_cleartext(self, record.name, volume.name)
            with contextlib.suppress(errors.NotFound):
                await self.devices.remove(volume_device(record.name, volume.name), claim=claim)
        await self._remove_pool_devices(record.name)
        await self._wipe_metadata(record.layout)
        await self.descriptions.wipe(record.layout.devices, record.uuid)

    async def _destroy_records(self, record: PoolRecord) -> None:
        for volume in await self.store.list_volumes(record.name):
            await self.store.pool_change(record.name, remove=volume.uuid)
        if await self.store.get_pool(record.name) is not None:
            await self.store.remove_pool(record.name)

    async def add_device(self, pool: str, path: str, *, force: bool = False,
                         caller: Caller = ROOT, accept: Accept = _ignore) -> PoolRecord:
        """Grow the pool's data over one more device: the data device is
        reloaded with a segment of it, then the pool's table with the larger
        size (the kernel grows a pool when its data device grew; it cannot
        shrink one, so past that step the operation rolls forward).

        A pool whose metadata is low (out of it, say) first grows its
        metadata over the start of the new device, in a resume of its own:
        the kernel grows the data before the metadata on a resume, and a
        pool out of metadata space cannot write the larger data space map.
        """
        async with self.changing(pool):
            record = await self.pool(pool)
            await self.check_authorized(caller, Action.POOL, pool, record.owner_uid)
            if path in record.layout.devices:
                raise errors.Busy(f"{path} is a device of pool {pool!r} already")
            await self.check_devices(record)
            [(path, size)] = await self._check_devices([path], force)
            state = await self.pool_state(pool, record)
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
                                       plan.data, (*ids, str(uuidlib.uuid4())))
            grown_layout = replace(with_metadata, data=(
                *plan.data, Segment(new, HEADER_SECTORS + meta, usable)))
            grown = replace(record, layout=grown_layout)
            claim = self.owner(pool)

            async def undo(journal: Journal) -> None:
                if journal.step >= PoolGrowStep.POOL:
                    await self._restore_data(record)
                await self.descriptions.unlabel([path], grown_layout.ids[new:])

            async def finish(_: Journal) -> None:
                if meta:
                    await self.finish_layout(grown)
                else:
                    await self.store.pool_change(pool, layout=grown_layout)

            async with intent(self.store, self.fault, "pool-grow", pool,
                              PoolArgs(pool=pool, layout=grown_layout.to_json()), undo,
                              roll_forward=finish) as journal:
                await self._accepted(pool, grown, accept)
                await journal.mark(PoolGrowStep.WIPE)
                await self.kernel(Engine.wipe, path, 0, HEADER_SECTORS * 512)
                await self.describe_pending(pool, "pool-grow", layout=grown_layout)
                if meta:
                    await journal.mark(PoolGrowStep.METADATA)
                    journal.no_way_back()
                    await self.devices.reload(pool_device(pool, PoolPart.TMETA), _linear(
                        with_metadata, with_metadata.metadata), claim=claim)
                    await self.devices.reload(tpool(pool), _pool_table(
                        replace(record, layout=with_metadata)), claim=claim)
                await journal.mark(PoolGrowStep.DATA)
                await self.devices.reload(pool_device(pool, PoolPart.TDATA), _linear(grown_layout,
                                                                   grown_layout.data),
                                          claim=claim)
                await journal.mark(PoolGrowStep.POOL)
                await self.devices.reload(tpool(pool), _pool_table(grown), claim=claim)
                journal.no_way_back()
                await journal.mark(PoolGrowStep.RECORD)
                await self.store.pool_change(pool, layout=grown_layout)
        log.info("pool-grow %s: %s added, %d bytes of data, %d of metadata", pool, path,
                 grown_layout.data_sectors * 512, grown_layout.metadata_sectors * 512)
        return grown

    async def finish_layout(self, grown: PoolRecord, *, devices: bool = True) -> None:
        """The pool's table reloaded at *grown*'s size (the kernel takes
        larger data and metadata devices on the resume), then the record;
        *devices*: tdata and tmeta first (recovery does not know how far an
        operation got)."""
        claim = self.owner(grown.name)
        for part, segments in ((PoolPart.TDATA, grown.layout.data),
                               (PoolPart.TMETA, grown.layout.metadata)):
            if devices:
                await self.devices.reload(pool_device(grown.name, part),
                                          _linear(grown.layout, segments), claim=claim)
        await self.devices.reload(tpool(grown.name), _pool_table(grown), claim=claim)
        await self.store.pool_change(grown.name, layout=grown.layout)

    async def _restore_layout(self, record: PoolRecord) -> None:
        """Put the data and metadata devices back as *record* lays them out."""
        await self._restore_data(record)
        await self.devices.reload(pool_device(record.name, PoolPart.TMETA),
                                  _linear(record.layout, record.layout.metadata),
                                  claim=self.owner(record.name))

    async def _restore_data(self, record: PoolRecord) -> None:
        """Put the data device back as *record* lays it out (a grow that did
        not reach the pool's table)."""
        await self.devices.reload(pool_device(record.name, PoolPart.TDATA),
                                  _linear(record.layout, record.layout.data),
                                  claim=self.owner(record.name))

    # -- volumes ---------------------------------------------------------------
    async def _new_thin_id(self, pool: PoolRecord) -> int:
        """The next thin id, durably taken before anything uses it."""
        thin_id = pool.next_thin_id
        if thin_id > MAX_THIN_ID:
            raise errors.Busy(f"pool {pool.name!r} has used every thin id")
        await self.store.pool_change(pool.name, next_thin_id=thin_id + 1)
        return thin_id

    async def _send(self, pool: str, message: str) -> None:
        await self.devices.message(tpool(pool), 0, message, claim=self.owner(pool))

    async def _commit_tid(self, pool: str, current: int) -> int:
        await self._send(pool, set_transaction_id(current, current + 1))
        return current + 1

    async def create_volume(self, pool: str, name: str, size_bytes: int, *,
                            labels: Mapping[str, str] | None = None,
                            filesystem: str | None = None,
                            encryption: EncryptionRequest | None = None,
                            thin: bool = True, stripes: int = 1,
                            stripe_size: int | None = None,
                            caller: Caller = ROOT,
                            accept: Accept = _ignore) -> VolumeRecord:
        """*filesystem*: "ext4" or "xfs", made on the new volume as the last
        step (its failure undoes the volume); *encryption*: LUKS2 under it,
        opened (dmd.service.pools.crypt). The request's key is wiped here.
        Not *thin*: a thick volume, its segments taken from the room on the
        pool's devices (dmd.service.pools.room), *stripes* wide."""
        with contextlib.ExitStack() as keys:
            if encryption is not None:
                keys.callback(encryption.wipe)
            await self.check_authorized(caller, Action.VOLUME, f"{pool}/{name}")
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
            async with self.changing(pool):
                record = await self.pool(pool)
                if any(v.name == name for v in await self.store.list_volumes(pool)):
                    raise errors.AlreadyExists(f"pool {pool!r} has a volume named {name!r}")
                if encryption is not None and \
                        await self.store.get_device(cleartext_device(pool, name)) is not None:
                    raise errors.AlreadyExists(f"a device named "
                                               f"{cleartext_device(pool, name)} exists")
                if not thin:
                    return await self._create_thick(
                        record, name, size, stripes, stripe_size, clean_labels, filesystem,
                        encryption, caller, accept)
                tid = await self._kernel_tid(pool, record)
                volume = VolumeRecord(
                    str(uuidlib.uuid4()), pool, name, record.next_thin_id, size, None,
                    caller.uid, clean_labels, True,
                    encryption=Encryption(str(uuidlib.uuid4()), encryption.key_description)
                    if encryption is not None else None)
                await self.check_fits(record, volume)
                thin_id = await self._new_thin_id(record)
                assert thin_id == volume.thin_id
                await self._add_thin(record, volume, tid, create_thin(thin_id),
                                     "volume-create", filesystem=filesystem,
                                     encryption=encryption, accept=accept)
        log.info("volume-create %s/%s: thin id %d, %d bytes%s%s", pool, name, thin_id, size,
                 ", luks2" if encryption else "", f", {filesystem}" if filesystem else "")
        return volume

    async def _add_thin(self, pool: PoolRecord, volume: VolumeRecord, tid: int,
                        message: str, operation: str, *, snapshot: bool = False,
                        origin_device: str | None = None, filesystem: str | None = None,
                        encryption: EncryptionRequest | None = None,
                        accept: Accept = _ignore) -> None:
        """The protocol shared by create and snapshot (see the module);
        *origin_device*: the snapshot's origin device, if it is active;
        *encryption*: a LUKS2 header made on the new (active) volume and
        opened; *filesystem*: made on it (or on its cleartext) at the end."""
        name = pool.name
        claim = self.owner(name)
        steps: Any = SnapshotStep if snapshot else VolumeCreateStep
        suspended = False

        async def undo(journal: Journal) -> None:
            if suspended:
                assert origin_device is not None
                with contextlib.suppress(errors.ServiceError):
                    await self.devices.resume(origin_device, claim=claim)
            await self.undo_thin(name, volume, recorded=journal.step >= steps.ACTIVATE)

        assert volume.thin_id is not None
        args = PoolArgs(pool=name, transaction_from=tid, thin_id=volume.thin_id,
                        volume=_volume_json(volume), origin_uuid=volume.origin_uuid)
        async with intent(self.store, self.fault, operation, f"{name}/{volume.name}",
                          args, undo) as journal:
            self.pending[volume.uuid] = (volume, "creating")
            await self._accepted(name, volume, accept)
            await self.describe_pending(name, operation, transaction_from=tid, volume=volume)
            if snapshot:
                await journal.mark(SnapshotStep.SUSPEND)
            if origin_device is not None:
                await self.devices.suspend(origin_device, claim=claim)
                suspended = True
            await journal.mark(steps.MESSAGE)
            await self._send(name, message)
            await journal.mark(steps.TRANSACTION)
            await self._commit_tid(name, tid)
            if snapshot:
                await journal.mark(SnapshotStep.RESUME)
            if origin_device is not None:
                await self.devices.resume(origin_device, claim=claim)
                suspended = False
            await journal.mark(steps.RECORD)
            await self.store.pool_change(name, transaction_id=tid + 1, add=volume)
            if volume.active:
                await journal.mark(steps.ACTIVATE)
                await self._activate(volume)
            await self._prepare(journal, volume, encryption, filesystem)

    async def _prepare(self, journal: Journal, volume: VolumeRecord,
                       encryption: EncryptionRequest | None, filesystem: str | None) -> None:
        """The last steps of a create: encrypt and open, make a filesystem."""
        if encryption is not None:
            await journal.mark(VolumeCreateStep.ENCRYPT)
            await crypt.format_volume(self, volume, encryption.key, encryption.kdf)
            await journal.mark(VolumeCreateStep.UNLOCK)
            await crypt.open_cleartext(self, volume, encryption.key)
        if filesystem is not None:
            await journal.mark(VolumeCreateStep.FILESYSTEM)
            device = (cleartext_device if encryption else volume_device)(volume.pool,
                                                                        volume.name)
            await make_filesystem(
                lambda: self.kernel(Engine.open_node, device, os.O_RDWR), filesystem,
                volume.name, lambda done: progress(  # the part of the job after the mark
                    (VolumeCreateStep.FILESYSTEM + done) / (len(VolumeCreateStep) + 1)),
                lambda: cancel_point(past_way_back=False))

    # -- thick volumes ------------------------------------------------------------
    async def _create_thick(self, record: PoolRecord, name: str, size: int, stripes: int,
                            stripe_size: int | None, labels: dict[str, str],
                            filesystem: str | None, encryption: EncryptionRequest | None,
                            caller: Caller, accept: Accept) -> VolumeRecord:
        """Allocate, record (the record is what reserves the segments), make
        the device, then encrypt and make a filesystem as a thin volume's
        create does. Undone on error; a crash at any step undoes it all."""
        pool = record.name
        await self.check_devices(record)
        stripe_sectors = check_stripes(record.layout, stripes, stripe_size)
        segments = allocate(record.layout, size // 512, stripes, stripe_sectors,
                            await self.thick_segments(pool))
        thick = Thick(segments, stripes, stripe_sectors)
        volume = VolumeRecord(
            str(uuidlib.uuid4()), pool, name, None, thick.sectors * 512, None, caller.uid,
            labels, True,
            encryption=Encryption(str(uuidlib.uuid4()), encryption.key_description)
            if encryption is not None else None, thick=thick)
        await self.check_fits(record, volume)

        async def undo(journal: Journal) -> None:
            await self.undo_thick(volume)

        async with intent(self.store, self.fault, "volume-create-thick", f"{pool}/{name}",
                          PoolArgs(pool=pool, volume=_volume_json(volume)), undo) as journal:
            self.pending[volume.uuid] = (volume, "creating")
            await self._accepted(pool, volume, accept)
            await journal.mark(VolumeCreateStep.RECORD)
            # Segments a deleted volume held still hold its data: zeroed on
            # the pool's devices before any device maps them.
            await self.zero_segments(record.layout, segments)
            await self.store.pool_change(pool, add=volume)
            await journal.mark(VolumeCreateStep.ACTIVATE)
            await self._activate(volume)
            await self._prepare(journal, volume, encryption, filesystem)
        log.info("volume-create %s/%s: thick, %d segment(s), %d stripe(s), %d bytes%s%s", pool,
                 name, len(segments), stripes, volume.size_bytes,
                 ", luks2" if encryption else "", f", {filesystem}" if filesystem else "")
        return volume

    async def _remove_volume_devices(self, volume: VolumeRecord) -> None:
        """Remove the volume's cleartext and own devices (absent ones are
        fine), waiting out udev's probe of a device just closed."""
        claim = self.owner(volume.pool)
        for device in (cleartext_device(volume.pool, volume.name),
                       volume_device(volume.pool, volume.name)):
            for wait in UNDO_BUSY_WAITS:
                try:
                    await self.devices.remove(device, claim=claim)
                    break
                except errors.NotFound:
                    if await self.store.get_device(device) is not None:
                        await self.store.remove_device(device)
                    break
                except errors.Busy:
                    # A new device was just closed (by mkfs, say): udev's watch
                    # rule has blkid open it for a moment. Nobody else knows it.
                    if wait is None:
                        raise
                    await asyncio.sleep(wait)

    async def undo_thick(self, volume: VolumeRecord) -> None:
        """A thick volume's devices and record gone (what is not there is fine)."""
        await self._remove_volume_devices(volume)
        if any(v.uuid == volume.uuid for v in await self.store.list_volumes(volume.pool)):
            await self.store.pool_change(volume.pool, remove=volume.uuid)

    async def _delete_thick(self, volume: VolumeRecord) -> None:
        """Devices, then the record (which frees the segments): past the
        devices' removal it rolls forward."""
        pool, name = volume.pool, volume.name

        async def finish(_: Journal) -> None:
            await self.undo_thick(volume)

        async with intent(self.store, self.fault, "volume-delete-thick", f"{pool}/{name}",
                          PoolArgs(pool=pool, volume=_volume_json(volume)),
                          roll_forward=finish) as journal:
            await journal.mark(VolumeDeleteStep.DEACTIVATE)
            await crypt.close_cleartext(self, pool, name)
            with contextlib.suppress(errors.NotFound):
                await self.devices.remove(volume_device(pool, name), claim=self.owner(pool))
            journal.no_way_back()
            await journal.mark(VolumeDeleteStep.RECORD)
            await self.store.pool_change(pool, remove=volume.uuid)

    async def _grow_thick(self, volume: VolumeRecord, size: int) -> VolumeRecord:
        """More segments (another run of stripes), recorded (reserved) before
        the device's table takes them; a crash between is finished by
        reloading the recorded table."""
        assert volume.thick is not None
        pool, thick = volume.pool, volume.thick
        record = await self.pool(pool)
        await self.check_devices(record)
        more = allocate(record.layout, (size - volume.size_bytes) // 512, thick.stripes,
                        thick.stripe_sectors, await self.thick_segments(pool))
        grown_thick = replace(thick, segments=(*thick.segments, *more))
        grown = replace(volume, thick=grown_thick, size_bytes=grown_thick.sectors * 512)
        await self.check_fits(record, grown)

        async def undo(journal: Journal) -> None:
            await self.store.pool_change(pool, update=volume)
            if volume.active:
                await self.devices.reload(volume_device(pool, volume.name),
                                          thick_table(record.layout, thick),
                                          claim=self.owner(pool))

        async with intent(self.store, self.fault, "volume-resize-thick",
                          f"{pool}/{volume.name}",
                          PoolArgs(pool=pool, volume=_volume_json(grown),
                                   old_size=volume.size_bytes), undo) as journal:
            # Zeroed on the pool's devices first, active volume or not: no
            # device maps them before, so nobody ever reads what they held.
            await journal.mark(ThickResizeStep.ZERO)
            await self.zero_segments(record.layout, more)
            await journal.mark(ThickResizeStep.RECORD)
            await self.store.pool_change(pool, update=grown)
            if volume.active:
                await journal.mark(ThickResizeStep.RELOAD)
                await self.devices.reload(volume_device(pool, volume.name),
                                          thick_table(record.layout, grown_thick),
                                          claim=self.owner(pool))
        return grown

    async def zero_segments(self, layout_: PoolLayout, segments: tuple[Segment, ...]) -> None:
        """Zero *segments* of the pool's devices (a thick volume's new room:
        what a deleted volume, or whatever the disk held, left there)."""
        for seg in segments:
            path = layout_.devices[seg.device]
            try:
                await self.kernel.slow(Engine.wipe, path, seg.start * 512, seg.length * 512)
            except OSError as exc:
                code = exc.errno or 0
                raise errors.Kernel(f"zeroing {seg.length} sectors of {path} at sector "
                                    f"{seg.start}: {os.strerror(code)}", code) from None

    async def undo_thin(self, pool: str, volume: VolumeRecord, *, recorded: bool) -> None:
        """Take a thin id back out (deleting what is not there is fine) and
        leave the records at the kernel's transaction id."""
        await self._remove_volume_devices(volume)
        await self._delete_thin(pool, volume)
        tid = await self._kernel_tid(pool)
        tid = await self._commit_tid(pool, tid)
        await self.store.pool_change(pool, transaction_id=tid,
                                     remove=volume.uuid if recorded else None)

    async def _delete_thin(self, pool: str, volume: VolumeRecord) -> None:
        """Delete the volume's thin id; one the pool no longer has (ENODATA:
        deleted already, or never made) is fine."""
        assert volume.thin_id is not None
        try:
            await self._send(pool, delete(volume.thin_id))
        except errors.Kernel as exc:
            if exc.errno != errno.ENODATA:
                log.error("volume %s/%s: could not delete thin id %d: %s", pool, volume.name,
                          volume.thin_id, exc)
                raise

    async def activate_recorded(self, pool: str) -> None:
        """Every active volume without its device record (an import, or
        records taken from the devices) gets its device, or, where the
        kernel has it (made by a dmd whose database was lost), its record."""
        names = {d.name for d in await self.kernel(Engine.list_devices)}
        for volume in await self.store.list_volumes(pool):
            device = volume_device(pool, volume.name)
            if not volume.active or await self.store.get_device(device) is not None:
                continue
            if device in names:
                info = await self.kernel(Engine.device_info, device)
                if info.uuid != volume_uuid(volume.uuid):
                    raise errors.AlreadyExists(f"{device} exists and is not volume "
                                               f"{volume.uuid}")
                await self.devices.adopt(device, persistent=True, claim=self.owner(pool))
                log.info("volume %s/%s: its device recorded", pool, volume.name)
            else:
                await self._activate(volume)
                log.info("volume %s/%s: activated", pool, volume.name)

    async def _activate(self, volume: VolumeRecord) -> None:
        if volume.cache is not None:
            await cached.activate_cached(self, volume)
            return
        await self.devices.create(
            volume_device(volume.pool, volume.name), await self.volume_table(volume),
            uuid=volume_uuid(volume.uuid), persistent=True, claim=self.owner(volume.pool))

    async def volume_table(self, volume: VolumeRecord) -> list[TargetLine]:
        if volume.thick is not None:
            record = await self.pool(volume.pool)
            await self.check_devices(record)
            return thick_table(record.layout, volume.thick)
        assert volume.thin_id is not None
        return _thin_table(volume.pool, volume.thin_id, volume.size_bytes)

    async def snapshot(self, pool: str, origin: str, name: str, *,
                       activate: bool = True, labels: Mapping[str, str] | None = None,
                       uuid: str | None = None, caller: Caller = ROOT,
                       accept: Accept = _ignore) -> VolumeRecord:
        """A new volume holding *origin*'s data as it is now. An active origin
        is suspended for the moment of the copy and resumed on every path."""
        name = VolumeName(name, pool)
        clean_labels = check_labels(labels or {})
        async with self.changing(pool):
            record = await self.pool(pool)
            source = await self.volume(pool, origin, uuid)
            await self.check_authorized(caller, Action.VOLUME, f"{pool}/{origin}", source.owner_uid)
            if any(v.name == name for v in await self.store.list_volumes(pool)):
                raise errors.AlreadyExists(f"pool {pool!r} has a volume named {name!r}")
            if source.thin_id is None:
                raise errors.InvalidArgument(f"{origin!r} is a thick volume: only thin "
                                             "volumes have snapshots")
            if source.encryption is not None:
                check_cleartext(pool, name)
            # Its latest writes may be in the cache, not yet in the thin volume.
            self._uncached(source, "snapshotting")
            tid = await self._kernel_tid(pool, record)
            # An encrypted origin's snapshot carries its header: the same
            # keys open it, locked until asked (it is a copy, not a second use).
            volume = VolumeRecord(str(uuidlib.uuid4()), pool, name, record.next_thin_id,
                                  source.size_bytes, source.uuid, caller.uid, clean_labels,
                                  activate, encryption=replace(source.encryption, unlocked=False)
                                  if source.encryption is not None else None)
            await self.check_fits(record, volume)
            thin_id = await self._new_thin_id(record)
            assert thin_id == volume.thin_id
            origin_device = volume_device(pool, origin) if source.active else None
            await self._add_thin(record, volume, tid, create_snap(thin_id, source.thin_id),
                                 "volume-snapshot", snapshot=True, origin_device=origin_device,
                                 accept=accept)
        log.info("volume-snapshot %s/%s of %s: thin id %d", pool, name, origin, thin_id)
        return volume

    async def delete_volume(self, pool: str, name: str, *, uuid: str | None = None,
                            caller: Caller = ROOT, accept: Accept = _ignore) -> None:
        """Remove the volume's device, delete its thin id, drop its record."""
        async with self.changing(pool):
            volume = await self.volume(pool, name, uuid)
            await self.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)
            self._uncached(volume, "deleting")
            if volume.thin_id is None:
                self.pending[volume.uuid] = (volume, "deleting")
                await self._accepted(pool, volume, accept)
                await self._delete_thick(volume)
                log.info("volume-delete %s/%s: thick, its segments freed", pool, name)
                return
            thin_id = volume.thin_id
            tid = await self._kernel_tid(pool)
            claim = self.owner(pool)

            async def finish(_: Journal) -> None:
                await self.finish_delete(volume, tid)

            async with intent(self.store, self.fault, "volume-delete", f"{pool}/{name}",
                              PoolArgs(pool=pool, transaction_from=tid,
                                       thin_id=volume.thin_id, volume=_volume_json(volume)),
                              roll_forward=finish) as journal:
                self.pending[volume.uuid] = (volume, "deleting")
                await self._accepted(pool, volume, accept)
                await journal.mark(VolumeDeleteStep.DEACTIVATE)
                await crypt.close_cleartext(self, pool, name)
                with contextlib.suppress(errors.NotFound):
                    await self.devices.remove(volume_device(pool, name), claim=claim)
                journal.no_way_back()
                await self.describe_pending(pool, "volume-delete", transaction_from=tid,
                                            volume=volume)
                await journal.mark(VolumeDeleteStep.MESSAGE)
                await self._send(pool, delete(thin_id))
                await journal.mark(VolumeDeleteStep.TRANSACTION)
                await self._commit_tid(pool, tid)
                await journal.mark(VolumeDeleteStep.RECORD)
                await self.store.pool_change(pool, transaction_id=tid + 1, remove=volume.uuid)
        log.info("volume-delete %s/%s: thin id %d deleted", pool, name, volume.thin_id)

    async def finish_delete(self, volume: VolumeRecord, start: int) -> None:
        """Finish a delete from wherever it stopped (recovery, or an error past
        the device's removal): each step is skipped if it was done."""
        pool = volume.pool
        await crypt.close_cleartext(self, pool, volume.name)
        with contextlib.suppress(errors.NotFound):
            await self.devices.remove(volume_device(pool, volume.name), claim=self.owner(pool))
        tid = await self._kernel_tid(pool)
        if tid == start:
            await self._delete_thin(pool, volume)
            tid = await self._commit_tid(pool, start)
        await self.store.pool_change(pool, transaction_id=tid, remove=volume.uuid)

    async def resize_volume(self, pool: str, name: str, size_bytes: int, *,
                            shrink: bool = False, uuid: str | None = None,
                            caller: Caller = ROOT, accept: Accept = _ignore) -> VolumeRecord:
        size = check_size(size_bytes)
        async with self.changing(pool):
            volume = await self.volume(pool, name, uuid)
            await self.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)
            if size < volume.size_bytes and not shrink:
                raise errors.InvalidArgument(
                    f"{size} bytes is smaller than {name!r} ({volume.size_bytes} bytes); "
                    "shrinking loses the data past the new end: pass shrink to do it")
            self._uncached(volume, "resizing")
            for other in await self.store.list_volumes():
                if other.cache is not None and other.cache.volume_uuid == volume.uuid:
                    raise errors.Busy(f"volume {pool}/{name} is the cache of volume "
                                      f"{other.pool}/{other.name}: DetachCache first")
            if volume.encryption is not None and await crypt.cleartext_present(self, pool, name):
                raise errors.Busy(f"volume {pool}/{name} is unlocked: Lock it to resize it "
                                  "(its cleartext device takes the new size when unlocked)")
            if volume.thick is not None:
                if size < volume.size_bytes:
                    raise errors.InvalidArgument(f"{name!r} is a thick volume: it grows, "
                                                 "never shrinks")
                await self._accepted(pool, volume, accept)
                resized = await self._grow_thick(volume, size) \
                    if size > volume.size_bytes else volume
            else:
                assert volume.thin_id is not None
                resized = replace(volume, size_bytes=size)
                await self._accepted(pool, resized, accept)
                async def match_size(_: Journal) -> None:
                    await self.match_size(resized)

                async with intent(self.store, self.fault, "volume-resize", f"{pool}/{name}",
                                  PoolArgs(pool=pool, volume=_volume_json(resized),
                                           old_size=volume.size_bytes),
                                  roll_forward=match_size) as journal:
                    if await self.own_device(volume):
                        await journal.mark(VolumeResizeStep.RELOAD)
                        await self.devices.reload(volume_device(pool, name),
                                                  _thin_table(pool, volume.thin_id, size),
                                                  claim=self.owner(pool))
                        journal.no_way_back()  # the device has its size: the record follows
                    await journal.mark(VolumeResizeStep.RECORD)
                    await self.store.pool_change(pool, update=resized)
        log.info("volume-resize %s/%s: %d -> %d bytes", pool, name, volume.size_bytes,
                 resized.size_bytes)
        return resized

    async def set_active(self, pool: str, name: str, active: bool, *,
                         uuid: str | None = None, caller: Caller = ROOT,
                         accept: Accept = _ignore) -> VolumeRecord:
        """Activate (make its device) or deactivate (remove it; data and record
        stay) a volume."""
        async with self.changing(pool):
            volume = await self.volume(pool, name, uuid)
            await self.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)
            if not active:
                self._uncached(volume, "deactivating")
            changed = replace(volume, active=active)
            await self._accepted(pool, changed, accept)
            device = volume_device(pool, name)
            present = await self.own_device(volume)

            async def match(_: Journal) -> None:
                await self.match_device(volume)

            async with intent(self.store, self.fault,
                              "volume-activate" if active else "volume-deactivate",
                              f"{pool}/{name}", PoolArgs(pool=pool, volume=_volume_json(volume)),
                              match, roll_forward=match) as journal:
                await journal.mark(VolumeActivateStep.DEVICE)
                if active and not present:
                    await self._activate(volume)
                    if volume.encryption is not None and volume.encryption.unlocked:
                        self.waiting[volume.uuid] = "waiting for a key: Unlock with one"
                elif not active and present:
                    await crypt.close_cleartext(self, pool, name)
                    self.waiting.pop(volume.uuid, None)
                    await self.devices.remove(device, claim=self.owner(pool))
                journal.no_way_back()  # the device is what it is to be: the record follows
                await journal.mark(VolumeActivateStep.RECORD)
                if changed != volume:
                    await self.store.pool_change(pool, update=changed)
        return changed

    async def recorded(self, volume: VolumeRecord) -> VolumeRecord | None:
        """The volume's record as it is now (by its UUID), or None."""
        return next((v for v in await self.store.list_volumes(volume.pool)
                     if v.uuid == volume.uuid), None)

    async def match_size(self, resized: VolumeRecord) -> str:
        """Make the volume's recorded size its device's (a thin Resize cut
        short); an inactive volume's record is whole either way (the one
        write of its resize). "done" if it has *resized*'s size now."""
        now = await self.recorded(resized)
        if now is None:
            return "rolled_back"
        size = now.size_bytes
        if await self.own_device(now):
            device = volume_device(now.pool, now.name)
            info, table = await self.kernel(Engine.table_status, device, DmFlags.DM_STATUS_TABLE)
            if info.active_present:
                size = sum(line.length for line in table) * 512
        if size != now.size_bytes:
            await self.store.pool_change(now.pool, update=replace(now, size_bytes=size))
        return "done" if size == resized.size_bytes else "rolled_back"

    async def match_device(self, volume: VolumeRecord) -> str:
        """Make the volume's record say what its device is: active while it
        has one, inactive when not (an Activate or Deactivate cut short, or
        undone); "done" if the record changed, else "rolled_back"."""
        now = await self.recorded(volume)
        if now is None:
            return "rolled_back"
        present = await self.own_device(now)
        if now.active != present:
            await self.store.pool_change(volume.pool, update=replace(now, active=present))
            return "done"
        return "rolled_back"


def _volume_json(volume: VolumeRecord) -> dict[str, Any]:
    raw = asdict(volume)
    raw.pop("created_at", None)
    raw["encryption"] = volume.encryption.to_json() if volume.encryption else None
    raw["thick"] = volume.thick.to_json() if volume.thick else None
    raw["cache"] = volume.cache.to_json() if volume.cache else None
    return raw


def volume_from_json(raw: dict[str, Any]) -> VolumeRecord:
    fields = dict(raw)
    fields["encryption"] = Encryption.from_json(fields.get("encryption"))
    fields["thick"] = Thick.from_json(fields.get("thick"))
    fields["cache"] = Cache.from_json(fields.get("cache"))
    return VolumeRecord(**fields)

