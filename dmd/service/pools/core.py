"""The pool family's core: the one writer of pools and volumes, and the seam
every operation on a pool goes through.

``PoolCore`` holds what all operations share (the store, the kernel's
workers, the device service, the pools' locks and descriptions, the jobs)
and the steps more than one of them takes (claims, a pool's devices and
tables, thin ids and the transaction id, a thick volume's room zeroed). Each
operation lives in a module of its own (lifecycle, volumes, thick,
activation, crypt, cache, space, importing) and runs inside
``PoolCore.change``, which hands it a ``PoolChange``: the pool's lock, its
records read once and handed down, the intent journaled with its undo or
finish, the moment it is accepted, what the bus shows meanwhile, and the
description naming it before a step the kernel cannot take back. At its
end, however it ends, the description is brought to the records and the
change settled (the bus shows it). Each of those modules also says how its
operations are finished or undone after a crash: dmd.service.pools.recovery
gathers them into the one list of pool operations.

A pool is laid out by dmd over whole devices an admin hands it: each device
keeps its first 4 MiB for the pool's own description (a label and two
copies of the pool's and its volumes' records: dmd.state.pool_description,
rewritten at the end of every change: dmd.service.pools.descriptions), the
metadata device takes the size the kernel's documentation asks for from the
first device, and the data device is everything else. Its device-mapper
devices are named after it (dmd.service.pools.names):

    P-tmeta  P-tdata  P-tpool   and one  P-V  per active volume V

and claimed (``DeviceService.claims``): raw device calls on them are refused
with Busy, naming the pool. Every device is a persistent managed device, so
after a reboot the device recovery re-creates them in order (each after the
devices its table names), over the pool's own disks only
(dmd.service.pools.guard).

Thin ids are handed out from the pool's ``next_thin_id`` (made durable
before the id is used, and only ever raised), and every change to the set of
thin ids moves the pool's transaction id by one, as described in
dmd.service.journal; the pools' recovery reads it after a crash.
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
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from dmd.engine import (
    NOT_INSTALLED,
    DevId,
    DmError,
    NotABlockDevice,
    TargetLine,
    ThinToolError,
    UdevTimeout,
    UdevWait,
)
from dmd.engine.blockdev import BlockDevice
from dmd.engine.interface import Engine
from dmd.engine.targets import parse_status
from dmd.engine.targets.thin import (
    MAX_THIN_ID,
    ThinPoolStatus,
    delete,
    metadata_sectors,
    set_transaction_id,
)
from dmd.engine.types import MAX_DEVICE_SECTORS, DmFlags
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Caller
from dmd.service.devices.operations import DeviceService, udev_done
from dmd.service.jobs import Job, Jobs, work_bytes
from dmd.service.journal import (
    Journal,
    PoolArgs,
    intent,
)
from dmd.service.locks import DeviceLocks
from dmd.service.pools.descriptions import Descriptions
from dmd.service.pools.names import (
    CLEARTEXT_UUID_PREFIX,
    PoolPart,
    VolumePart,
    claim_prefix,
    cleartext_device,
    cleartext_uuid,
    in_pool,
    parts,
    pool_device,
    pool_devices,
    tpool,
    volume_device,
)
from dmd.service.pools.room import HEADER_SECTORS, thick_table
from dmd.service.pools.tables import (
    DMD_UUID_PREFIX,
    linear,
    part_table,
    pool_part_uuid,
    pool_table,
    thin_table,
    volume_uuid,
)
from dmd.state import (
    IntentRecord,
    PoolLayout,
    PoolRecord,
    Segment,
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
# A device just made or just closed is opened for a moment by udev (its
# probe, through the watch rule): a volume's delete or deactivate waits that
# out, ~1 s in all, before it says Busy (LVM and containerd's devmapper
# snapshotter retry their removes alike).
PROBE_WAITS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4)
UDEV_KEPT = 256  # devices whose udev work is kept to wait for (keep_udev)

@dataclass(frozen=True, slots=True)
class Disk:
    """A block device a pool could be made on (PoolCore.disks)."""

    path: str
    size_bytes: int
    signature: str  # what is on it ("" none): CreatePool overwrites it only with force
    busy: str  # why no pool can take it now ("" none)


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

    @classmethod
    def inactive(cls, record: PoolRecord) -> PoolState:
        """A pool whose devices are not there (yet): its sizes from its record."""
        return cls(None, 0, record.layout.data_sectors * 512, 0,
                   record.layout.metadata_sectors * 512, "inactive")


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
    for all of it either way, unless *meta_sectors* says how much. A spare
    of the metadata's size follows it (LVM's "pmspare", for a repair), where
    the first device has room for both and data after them."""
    usable = [(size // 512) - HEADER_SECTORS for _, size in devices]
    total = sum(usable)
    meta = metadata_sectors(total, block_sectors) if meta_sectors is None else meta_sectors
    if meta >= usable[0]:
        raise errors.InvalidArgument(
            f"{devices[0][0]} is too small for the pool's metadata ({meta * 512} bytes)")
    spare = meta if 2 * meta + block_sectors <= usable[0] else 0
    data: list[Segment] = [Segment(0, HEADER_SECTORS + meta + spare, usable[0] - meta - spare)]
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
                      (Segment(0, HEADER_SECTORS, meta),), tuple(data),
                      spare=(Segment(0, HEADER_SECTORS + meta, spare),) if spare else ())


Accept = Callable[[Any], None]
# A pool's record and its volumes', as the store holds them now (a change's
# records in hand, handed to whoever shows the change: no read again).
Records = tuple[PoolRecord, list[VolumeRecord]]
# Called with a pool's name and its records, if in hand (PoolCore.add_settler).
Settler = Callable[[str, Records | None], Awaitable[None]]


def ignore(_: Any) -> None:
    """An accept for a call nobody waits on (a test, recovery)."""


class Shown:
    """What the bus shows of pools and volumes beyond their records: a
    subject mid-operation (its records are not final), a pool dmd refuses to
    change and why, an encrypted volume waiting for its key. The pool family
    writes it; the bus side reads it, through these methods only."""

    def __init__(self) -> None:
        self._volumes: dict[str, tuple[VolumeRecord, str]] = {}  # uuid -> (volume, state)
        self._pools: dict[str, tuple[PoolRecord, str]] = {}  # name -> (pool, state)
        self._refused: dict[str, str] = {}  # pool name -> why
        self._waiting: dict[str, str] = {}  # volume uuid -> what it waits for

    @property
    def refused(self) -> Mapping[str, str]:
        """Pools this dmd will not change (name -> why): their description
        cannot be trusted, their disks are not theirs, or another manager
        moved their transaction id."""
        return MappingProxyType(self._refused)

    @property
    def waiting(self) -> Mapping[str, str]:
        """Encrypted volumes recorded unlocked that have no cleartext device
        yet (uuid -> what they wait for): dmd.service.pools.crypt."""
        return MappingProxyType(self._waiting)

    def refuse(self, pool: str, why: str) -> None:
        self._refused[pool] = why

    def wait(self, uuid: str, why: str) -> None:
        self._waiting[uuid] = why

    def stop_waiting(self, uuid: str) -> None:
        self._waiting.pop(uuid, None)

    def under_way(self, subject: VolumeRecord | PoolRecord, state: str) -> None:
        if isinstance(subject, VolumeRecord):
            self._volumes[subject.uuid] = (subject, state)
        else:
            self._pools[subject.name] = (subject, state)

    def pool_under_way(self, pool: str) -> tuple[PoolRecord, str] | None:
        return self._pools.get(pool)

    def volumes_under_way(self, pool: str) -> list[tuple[VolumeRecord, str]]:
        return [(v, state) for v, state in self._volumes.values() if v.pool == pool]

    def ended(self, pool: str) -> None:
        """The pool's operation ended: whatever was under way in it (the
        pool's lock made it the only one) is final now."""
        for uuid in [u for u, (v, _) in self._volumes.items() if v.pool == pool]:
            del self._volumes[uuid]
        self._pools.pop(pool, None)


class PoolChange:
    """One operation on one pool, under the pool's lock (``PoolCore.change``
    makes it). Its records are read once and handed down: ``record`` and
    ``volumes`` read the store the first time, and again only when
    something wrote the pool's records around them (an undo, a step of
    another module: the store counts every write of a pool's records,
    ``AsyncStateStore.pool_writes``); its own writes
    (``write``) keep them current.
    """

    def __init__(self, core: PoolCore, pool: str) -> None:
        self.core = core
        self.pool = pool
        self.owner = core.owner(pool)
        # Set by an operation past which its records must not be described
        # again (a destroy that has wiped its disks).
        self.describe_at_end = True
        # A message changed the thin-pool device (PoolCore.send): the bus is
        # shown it once, as the change ends.
        self.messaged = False
        self._record: PoolRecord | None = None
        self._volumes: list[VolumeRecord] | None = None
        self._seen = core.writes[pool]  # the writes the records in hand include
        # udev's work on the nodes the change made or removed, waited for at
        # its end (see udev_done): meanwhile the change goes on. A caller
        # that needs no /dev/mapper name (it uses /dev/dm-N, which the
        # kernel's devtmpfs makes at once) may not wait (udev_sync False,
        # as lvcreate --noudevsync): the change ends when the kernel and the
        # records hold it, and udev's part follows.
        self.udev: list[UdevWait] = []
        self.udev_sync = True

    def _fresh(self) -> None:
        """Drop the records in hand if anything wrote the pool's records
        since they were read."""
        if self._seen != self.core.writes[self.pool]:
            self._record = self._volumes = None
            self._seen = self.core.writes[self.pool]

    async def record(self) -> PoolRecord:
        """The pool's record (NotFound if there is none)."""
        self._fresh()
        if self._record is None:
            self._record = await self.core.pool(self.pool)
        return self._record

    async def volumes(self) -> list[VolumeRecord]:
        self._fresh()
        if self._volumes is None:
            self._volumes = await self.core.store.list_volumes(self.pool)
        return self._volumes

    def known(self) -> Records | None:
        """The records in hand, if the change read both and nothing wrote
        around them since."""
        self._fresh()
        if self._record is None or self._volumes is None:
            return None
        return self._record, self._volumes

    async def volume(self, name: str, uuid: str | None = None) -> VolumeRecord:
        """*uuid*: the volume a caller's object stands for. Read under the
        pool's lock, it makes sure a call on a volume deleted meanwhile never
        reaches another volume given the same name since."""
        for volume in await self.volumes():
            if volume.name == name and uuid in (None, volume.uuid):
                return volume
        await self.record()
        if uuid is not None:
            raise errors.NotFound(f"volume {uuid} ({self.pool}/{name}) is gone")
        raise errors.NotFound(f"no volume {name!r} in pool {self.pool!r}")

    async def check_new_name(self, name: str) -> None:
        if any(v.name == name for v in await self.volumes()):
            raise errors.AlreadyExists(f"pool {self.pool!r} has a volume named {name!r}")

    async def write(self, *, transaction_id: int | None = None,
                    next_thin_id: int | None = None, add: VolumeRecord | None = None,
                    update: VolumeRecord | None = None, remove: str | None = None,
                    layout: PoolLayout | None = None, stopped: bool | None = None) -> None:
        """Record what the operation changed (one transaction: the store's
        ``pool_change``). The records in hand follow: the pool's as the store
        returns it, the volumes changed here as they were written (the pool's
        lock makes this change the only writer of the pool)."""
        self._fresh()
        self._record = await self.core.record_change(
            self.pool, transaction_id=transaction_id, next_thin_id=next_thin_id, add=add,
            update=update, remove=remove, layout=layout, stopped=stopped)
        self._seen = self.core.writes[self.pool]
        if self._volumes is not None:
            volumes = [update if update is not None and v.uuid == update.uuid else v
                       for v in self._volumes if v.uuid != remove]
            self._volumes = [*volumes, *([add] if add is not None else [])]

    async def take_thin_id(self) -> int:
        """The pool's next thin id, durably taken before anything uses it."""
        thin_id = (await self.record()).next_thin_id
        if thin_id > MAX_THIN_ID:
            raise errors.Busy(f"pool {self.pool!r} has used every thin id")
        await self.write(next_thin_id=thin_id + 1)
        return thin_id

    async def udev_done(self) -> None:
        """Wait until udev has done its work on the nodes the change made
        or removed (``udev``): before a step that opens one, and at the end
        of the change, before its caller hears of it. A wait udev does not
        end in time is logged (the device is what the change made it; its
        node follows when udev catches up), not the change's failure."""
        waits, self.udev = self.udev, []
        try:
            while waits:
                try:
                    await self.core.kernel(udev_done, waits[0])
                except UdevTimeout as exc:
                    log.warning("pool %s: %s; the kernel's part is done, udev's follows "
                                "when it catches up", self.pool, exc)
                except Exception as exc:
                    log.error("pool %s: waiting for udev (%s): %s", self.pool,
                              waits[0].what, exc)
                del waits[0]
        finally:
            for wait in waits[1:]:  # cancelled: the first is its worker's to close
                wait.close()

    def give_up_udev(self) -> None:
        """A change that failed (its undo waited for udev where it needed
        to), or one whose caller does not wait for udev (udev_sync)."""
        waits, self.udev = self.udev, []
        for wait in waits:
            wait.close()

    def show(self, subject: VolumeRecord | PoolRecord, state: str) -> None:
        """What the bus shows of *subject* until the change ends ("creating",
        "deleting", "destroying", "importing"): its records are not final."""
        self.core.shown.under_way(subject, state)

    async def accepted(self, subject: Any, accept: Accept) -> None:
        """The request can no longer be refused: the bus shows the change
        begun, then its caller is answered."""
        await self.core.show_begun(self.pool, self.known())
        accept(subject)

    def intent(self, operation: str, subject: str, args: PoolArgs,
               undo: Callable[[Journal], Awaitable[None]] | None = None, *,
               roll_forward: Callable[[Journal], Awaitable[None]] | None = None,
               ) -> contextlib.AbstractAsyncContextManager[Journal]:
        """The operation's intent, journaled (dmd.service.journal)."""
        return intent(self.core.store, self.core.fault, operation, subject, args, undo,
                      roll_forward=roll_forward)

    async def describe_pending(self, operation: str, *,
                               transaction_from: int | None = None,
                               volume: VolumeRecord | None = None,
                               thin_id: int | None = None,
                               layout: PoolLayout | None = None) -> None:
        """Before a step the kernel cannot take back: the description names
        the operation under way (a generation of its own), so that
        ImportPool, after a crash here and the loss of dmd's state, knows
        what the kernel may hold that the records do not
        (dmd.service.pools.importing): a message moving the transaction id
        from *transaction_from* about *volume* (or about *thin_id* alone, a
        revert's copy or the thin id it replaced), or the pool growing to
        *layout* (the description then says the pool is that: an import
        finishes the growth). Its failure fails the operation."""
        record = await self.record()
        written = self.core.descriptions.written.get(record.uuid)
        if written is None or written >= record.generation:
            # Its generation may be described already (without the operation):
            # it takes one of its own. (After a change not yet described, a
            # thin id taken, it has one.)
            await self.write()
            record = await self.record()
        if layout is not None:
            record = replace(record, layout=layout)
        pending: dict[str, Any] = {"operation": operation}
        if transaction_from is not None and volume is not None:
            # A deleted volume is among the description's own: its UUID says
            # which (and a delete never needs more room than there is).
            pending.update(transaction_from=transaction_from,
                           volume={"uuid": volume.uuid} if operation == "volume-delete"
                           else volume.to_json())
        if transaction_from is not None and thin_id is not None:
            pending.update(transaction_from=transaction_from, thin_id=thin_id)
        try:
            await self.core.descriptions.write(record, await self.volumes(), pending)
        except (OSError, DescriptionError) as exc:
            raise errors.Kernel(f"pool {self.pool}: writing its description: {exc}", getattr(
                exc, "errno", 0) or 0) from None
        self.core.described_pending[record.uuid] = record.generation


class PoolCore:
    """Every operation that changes something calls *accept* with its subject
    once the request can no longer be refused (validated, intent durable):
    a Job (dmd.service.jobs) answers its caller then."""

    def __init__(self, devices: DeviceService) -> None:
        self.devices = devices
        self.kernel = devices.kernel
        self.udev_kept: dict[str, UdevWait] = {}  # see keep_udev
        self.store = devices.store
        self.fault = devices.fault
        self.locks = DeviceLocks()
        # Subjects mid-operation, shown while their records are not final:
        # uuid -> (volume, "creating" | "deleting"); name -> (pool, state).
        self.shown = Shown()
        self._settlers: list[tuple[Settler, Settler | None]] = []
        self.jobs = Jobs()
        self.descriptions = Descriptions(self.kernel, devices.fault)
        # Pool UUID -> the generation whose description names an operation
        # under way (describe_pending).
        self.described_pending: dict[str, int] = {}
        # Pool name -> how many writes of its records the store made: records
        # in hand read at another count are stale.
        self.writes = self.store.pool_writes
        # Pool UUID -> why its disks are not its own (None: they are), as
        # found at start-up (recreate_guard).
        self.disks_checked: dict[str, str | None] = {}
        self._disk_survey: asyncio.Future[list[Disk]] | None = None  # see disks
        # Pools stopped (Pool.Stop): refused every change but Start.
        self.stopped: set[str] = set()
        # Pool name -> what thin_check found wrong with its metadata, when
        # its thin-pool device was to be made (check_metadata); refused every
        # change but Repair, Stop, Start and Destroy.
        self.damaged: dict[str, str] = {}
        # Pool name -> its change under way (change()), for send.
        self._changes: dict[str, PoolChange] = {}

    async def as_job(self, operation: str, caller: Caller,
                     call: Callable[[Accept], Awaitable[Any]]) -> tuple[Job, Any]:
        """Run *call(accept)* (one of the methods below, given its accept) as a
        Job: returns once it is accepted, with the job and its subject."""
        return await self.jobs.start(operation, caller.uid, call)

    def add_settler(self, settler: Settler, *, begun: Settler | None = None) -> None:
        """*settler(pool, records)* runs after every change to a pool or its
        volumes, before the change's caller hears of it (the bus shows it
        then). *begun*, if given, runs as a change is accepted, before any
        of its work: then only its subjects under way (``PoolChange.show``)
        are new, not the kernel's figures or the pool's space."""
        self._settlers.append((settler, begun))

    async def settle(self, pool: str, records: Records | None = None) -> None:
        """Show a change (*records*: the pool's as they are now, if in hand)."""
        await self._run_settlers(pool, records, [s for s, _ in self._settlers])

    async def show_begun(self, pool: str, records: Records | None = None) -> None:
        """Show a change accepted, its subjects under way (see add_settler)."""
        await self._run_settlers(pool, records, [b for _, b in self._settlers if b is not None])

    @staticmethod
    async def _run_settlers(pool: str, records: Records | None,
                            settlers: list[Settler]) -> None:
        for settler in settlers:
            try:
                await settler(pool, records)
            except Exception:
                log.exception("pool %s: settling the change failed", pool)

    @staticmethod
    def device_uuid(volume: VolumeRecord) -> str:
        return volume_uuid(volume.uuid)

    @contextlib.asynccontextmanager
    async def change(self, pool: str, *, stopped: bool = False,
                     damaged: bool = False) -> AsyncIterator[PoolChange]:
        """One change at a time to a pool; described and settled however it
        ends. A stopped pool is refused (NotActive) unless *stopped*, one
        whose metadata thin_check found damaged (Corrupt) unless *damaged*."""
        async with self.locks.hold(pool):
            if pool in self.shown.refused:
                raise errors.Busy(f"pool {pool!r} is not changed by dmd: "
                                  f"{self.shown.refused[pool]}")
            if pool in self.damaged and not damaged:
                raise errors.Corrupt(f"pool {pool!r}: its metadata is damaged "
                                     f"({self.damaged[pool]}): Repair mends it")
            if pool in self.stopped and not stopped:
                raise errors.NotActive(f"pool {pool!r} is stopped: Start it first")
            change = self._changes[pool] = PoolChange(self, pool)
            try:
                yield change
            except BaseException:
                change.give_up_udev()
                raise
            finally:
                del self._changes[pool]
                # The lock makes this operation the only one on the pool, so
                # whatever is pending in it is this operation's.
                self.shown.ended(pool)
                records = (await self.describe(pool, change.known())
                           if change.describe_at_end else None)
                # udev worked on the change's nodes meanwhile.
                try:
                    if change.udev_sync:
                        await change.udev_done()
                    else:
                        self.keep_udev(change.udev)
                        change.udev = []
                finally:
                    if change.messaged:
                        await self.devices.events.settle([tpool(pool)])
                    await self.settle(pool, records)

    @staticmethod
    def check_fits(record: PoolRecord, volumes: list[VolumeRecord],
                   volume: VolumeRecord) -> None:
        """LimitExceeded unless the pool's description, with *volume* added
        to *volumes* (or put in place of the record of its UUID), fits in its
        copy on the devices: refused before any work, so every change dmd
        makes can be described (and the pool imported from its devices)."""
        volumes = [v for v in volumes if v.uuid != volume.uuid]
        size = len(Description(record.generation + 1, record, (*volumes, volume)).payload())
        # The description naming the operation under way holds its record
        # once more (describe_pending).
        size += len(json.dumps(volume.to_json(), separators=(",", ":"),
                               ensure_ascii=False).encode()) + 128
        if size > PAYLOAD_ROOM:
            raise errors.LimitExceeded(
                f"pool {record.name!r}: its description would take {size} bytes, more than "
                f"the {PAYLOAD_ROOM} its devices keep for it (fewer or shorter labels, or "
                "another pool)")

    async def describe(self, pool: str, known: Records | None = None, *,
                       checked: bool = False) -> Records | None:
        """Bring the description on the pool's devices to the generation of
        its records (nothing to do if it is there); *known*: those records,
        in hand; *checked*: a stopped pool's disks were checked just now (a
        repair). A failure is logged: the records stand, and the next change
        or start-up writes it again. Returns the records, where it holds them."""
        volumes: list[VolumeRecord] | None = None
        record: PoolRecord | None
        if known is not None:
            record, volumes = known
        else:
            record = await self.store.get_pool(pool)
        if record is None or pool in self.shown.refused or (record.stopped and not checked):
            # A stopped pool's disks are checked by Start before anything is
            # written to them (their paths may name other disks by now).
            return None
        if self.described_pending.pop(record.uuid, None) == record.generation:
            # The description there names an operation that has ended: the
            # one without it gets a generation of its own.
            record = await self.record_change(pool)
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
                return None
            await self.record_change(pool, layout=labelled.layout)
            record, volumes = await self.pool(pool), None
        if self.descriptions.written.get(record.uuid) == record.generation:
            return (record, volumes) if volumes is not None else None
        try:
            if volumes is None:
                volumes = await self.store.list_volumes(pool)
            await self.descriptions.write(record, volumes)
        except (OSError, DescriptionError) as exc:
            log.error("pool %s: could not write its description (generation %d): %s; "
                      "written again at its next change or dmd's next start", pool,
                      record.generation, exc)
        return (record, volumes) if volumes is not None else None

    @staticmethod
    def owner(pool: str) -> str:
        return f"pool {pool!r}"

    async def start(self) -> None:
        """Claim the names of every recorded pool; know the stopped ones."""
        for pool in await self.store.list_pools():
            self.claim(pool.name)
            if pool.stopped:
                self.stopped.add(pool.name)

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

    def claim(self, pool: str) -> None:
        prefix = claim_prefix(pool)
        self.devices.claims[self.owner(pool)] = lambda name: in_pool(name, prefix)

    def release(self, pool: str) -> None:
        self.devices.claims.pop(self.owner(pool), None)

    async def check_authorized(self, caller: Caller, action: Action, subject: str,
                         owner_uid: int | None = None) -> None:
        await self.devices.authorize(caller, action, subject)
        if owner_uid is not None and caller.uid not in (0, owner_uid):
            raise errors.NotAuthorized(
                f"{subject} belongs to uid {owner_uid}; uid {caller.uid} may not change it")

    async def check_volume_authorized(self, caller: Caller, pool: str, name: str,
                                      uuid: str | None = None) -> None:
        """NotAuthorized unless *caller* may change the volume (its owner or
        root, and the authority agrees): asked before a call reads a key the
        caller sent, so that another's caller learns nothing of the volume
        or its keys."""
        volume = await self.volume(pool, name, uuid)
        await self.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)

    async def pools(self) -> list[PoolRecord]:
        return await self.store.list_pools()

    async def pool(self, name: str) -> PoolRecord:
        record = await self.store.get_pool(name)
        if record is None:
            raise errors.NotFound(f"no pool named {name!r}")
        return record

    @staticmethod
    def check_uncached(volume: VolumeRecord, what: str) -> None:
        if volume.cache is not None:
            raise errors.Busy(f"volume {volume.pool}/{volume.name} has a cache: DetachCache "
                              f"before {what} it")

    async def in_kernel(self, device: str) -> bool:
        """Whether the kernel holds a device of that name (anyone's)."""
        try:
            await self.kernel(Engine.device_info, device)
        except DmError:
            return False
        return True

    async def check_not_a_cache(self, volume: VolumeRecord) -> None:
        """Busy if *volume* is another volume's cache: that volume's record
        and devices name it by its path."""
        for other in await self.store.list_volumes():
            if other.cache is not None and other.cache.volume_uuid == volume.uuid:
                raise errors.Busy(f"volume {volume.pool}/{volume.name} is the cache of volume "
                                  f"{other.pool}/{other.name}: DetachCache first")

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

    async def pool_state(self, pool: str, record: PoolRecord | None = None, *,
                         commit: bool = True) -> PoolState:
        """*record*: the pool's, where it is not in the store (yet).
        *commit* False: the kernel does not commit the pool's metadata
        first (DM_NOFLUSH; its used blocks are then as of its last commit,
        at most a second old, while its transaction id and mode are exact):
        a commit writes the metadata and flushes the data device."""
        record = record or await self.pool(pool)
        try:
            _, lines = await self.kernel(Engine.table_status, tpool(pool),
                                         DmFlags(0) if commit else DmFlags.DM_NOFLUSH)
        except DmError:
            if pool in self.damaged:
                return replace(PoolState.inactive(record), mode="damaged")
            return PoolState.inactive(record)
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

    async def check_metadata(self, record: PoolRecord) -> None:
        """thin_check of the pool's metadata device (made, no thin-pool
        device over it; dmd.service.pools.repair): Corrupt, and the pool
        known damaged until a check passes, unless whole."""
        pool = record.name
        try:
            found = await self.kernel.slow(Engine.thin_check,
                                           pool_device(pool, PoolPart.TMETA))
        except ThinToolError as exc:
            if exc.status == NOT_INSTALLED:
                # Without the tools, pools are made as before (not refused
                # all at once at a boot): the kernel's own checks stand.
                log.warning("pool-check %s: not checked: %s", pool, exc)
                return
            raise errors.Failed(f"pool {pool!r}: its metadata could not be checked: "
                                f"{exc}") from None
        if found.ok:
            self.damaged.pop(pool, None)
            return
        self.damaged[pool] = found.report
        log.error("pool-check %s: metadata damaged: %s", pool, found.report)
        raise errors.Corrupt(f"pool {pool!r}: its metadata is damaged ({found.report}): "
                             "Repair mends it")

    async def kernel_tid(self, pool: str, record: PoolRecord | None = None) -> int:
        state = await self.pool_state(pool, record, commit=False)
        if state.transaction_id is None:
            raise errors.Busy(f"pool {pool!r} is not active")
        return state.transaction_id

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

    async def disks(self, caller: Caller = ROOT) -> list[Disk]:
        """Every block device a pool could be made on, and what keeps each
        from it now (for a client's picker: CreatePool checks again). For
        those who may make pools (it reads every disk's first bytes); calls
        at the same time share one survey, on the slow workers, so no number
        of them holds more than one thread (a disk that hangs a read)."""
        await self.check_authorized(caller, Action.POOL, "disks")
        if self._disk_survey is None or self._disk_survey.done():
            self._disk_survey = asyncio.ensure_future(self._survey_disks())
        return await asyncio.shield(self._disk_survey)

    async def _survey_disks(self) -> list[Disk]:
        surveyed = await self.kernel.slow(Engine.disks)
        # A pool's disk by its device number (a record may name it by another
        # path), and a whole disk by the pool on one of its partitions.
        taken: dict[tuple[int, int], str] = {}
        for pool in await self.store.list_pools():
            for path in pool.layout.devices:
                number = await self.kernel(Engine.device_number, path)
                if number is not None:
                    taken[number] = pool.name
        owners = {s.path: taken.get(s.device) for s in surveyed}
        parts_taken = {s.parent: owners[s.path] for s in surveyed
                       if s.parent and owners[s.path] is not None}
        found = []
        for s in surveyed:
            signature = s.signature or ""
            busy = (f"a device of pool {owners[s.path]}" if owners[s.path] is not None else
                    f"a partition of it is a device of pool {parts_taken[s.path]}"
                    if s.path in parts_taken else
                    "a disk of a dmd pool this dmd does not know (ImportPool it)"
                    if signature == "dmd_pool" else
                    "in use (mounted, or held by another device)" if s.in_use else
                    f"smaller than {MIN_DEVICE_BYTES} bytes"
                    if s.size_bytes < MIN_DEVICE_BYTES else "")
            found.append(Disk(s.path, s.size_bytes, signature, busy))
        return found

    async def check_free_devices(self, paths: list[str], force: bool) -> list[tuple[str, int]]:
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

    async def wipe_metadata(self, plan: PoolLayout) -> None:
        """Zero the start of the pool's metadata: the kernel then sees no pool
        there (a new one is formatted, an old one cannot come back)."""
        meta = plan.metadata[0]
        await self.kernel(Engine.wipe, plan.devices[meta.device], meta.start * 512,
                          WIPE_BYTES)

    async def own_devices(self, pool: str) -> tuple[list[str], set[str]]:
        """The pool's devices in the kernel, and the names of its device
        records. The pool's: a name that begins as the pool's, and either a
        record (dmd made or adopted it) or a UUID dmd or cryptsetup gives
        (one made just before a crash, its record never written); not
        another tool's ``tank-x``."""
        prefix = claim_prefix(pool)
        recorded = {r.name for r in await self.store.list_devices() if in_pool(r.name, prefix)}
        # cryptsetup's UUID alone does not make a device dmd's (a user's own
        # mapping over a volume has one too): only under the cleartext name
        # of one of the pool's encrypted volumes.
        cleartexts = {cleartext_device(pool, v.name)
                      for v in await self.store.list_volumes(pool) if v.encryption}
        present = [d.name for d in await self.kernel(Engine.list_devices)
                   if in_pool(d.name, prefix)
                   and (d.name in recorded or (d.uuid or "").startswith(DMD_UUID_PREFIX)
                        or (d.name in cleartexts
                            and (d.uuid or "").startswith(CLEARTEXT_UUID_PREFIX)))]
        return present, recorded

    async def remove_pool_devices(self, pool: str, *, closed: bool = False) -> None:
        """Remove the pool's devices (``own_devices``), volumes first; each is
        tried; then the records of every device of the pool. *closed*: each
        once closed (udev's probe of a device just made or written waited
        out), Busy if it stays open (Stop, Repair)."""
        claim = self.owner(pool)
        internal = pool_devices(pool)
        names, recorded = await self.own_devices(pool)
        # Cleartext devices first: each holds its volume's device.
        order = sorted((n for n in names if n not in internal),
                       key=lambda n: (parts(n)[2:] != [VolumePart.CRYPT], n))
        order += [n for n in internal if n in names]
        for device in order:
            with contextlib.suppress(errors.NotFound):
                if closed:
                    await self.remove_closed(device, claim)
                else:
                    await self.devices.remove(device, claim=claim)
        # and the records of those the kernel did not have (start-up did
        # not make them: a damaged pool's, say)
        for record in await self.store.list_devices():
            if record.name in recorded:
                await self.store.remove_device(record.name)

    async def create_pool_devices(self, record: PoolRecord, *parts: PoolPart) -> None:
        """Make *parts* of the pool's own devices, as its record lays them out:
        persistent, claimed by the pool."""
        for part in parts:
            await self.devices.create(pool_device(record.name, part), part_table(record, part),
                                      uuid=pool_part_uuid(record.uuid, part), persistent=True,
                                      claim=self.owner(record.name))

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
                                          linear(grown.layout, segments), claim=claim)
        await self.devices.reload(tpool(grown.name), pool_table(grown), claim=claim)
        await self.record_change(grown.name, layout=grown.layout)

    async def restore_layout(self, record: PoolRecord) -> None:
        """Put the data and metadata devices back as *record* lays them out."""
        await self.restore_data(record)
        await self.devices.reload(pool_device(record.name, PoolPart.TMETA),
                                  linear(record.layout, record.layout.metadata),
                                  claim=self.owner(record.name))

    async def restore_data(self, record: PoolRecord) -> None:
        """Put the data device back as *record* lays it out (a grow that did
        not reach the pool's table)."""
        await self.devices.reload(pool_device(record.name, PoolPart.TDATA),
                                  linear(record.layout, record.layout.data),
                                  claim=self.owner(record.name))

    async def record_change(self, pool: str, *, transaction_id: int | None = None,
                            next_thin_id: int | None = None, add: VolumeRecord | None = None,
                            update: VolumeRecord | None = None, remove: str | None = None,
                            layout: PoolLayout | None = None,
                            stopped: bool | None = None) -> PoolRecord:
        """The one writer of a pool's records (the store's ``pool_change``):
        the store counts it, so a change's records in hand are known to be
        current without reading them again."""
        return await self.store.pool_change(
            pool, transaction_id=transaction_id, next_thin_id=next_thin_id, add=add,
            update=update, remove=remove, layout=layout, stopped=stopped)

    async def send(self, pool: str, message: str) -> None:
        """Within a change, the bus is shown the thin-pool device's new state
        once, as the change ends, not after each message (an operation sends
        two, and each showing reads the device again: its status twice, its
        record, its dependencies)."""
        change = self._changes.get(pool)
        if change is not None:
            change.messaged = True
        await self.devices.message(tpool(pool), 0, message, claim=self.owner(pool),
                                   settle=change is None)

    async def delete_thin(self, pool: str, thin_id: int, whose: str) -> None:
        """Delete thin id *thin_id* (*whose*: for the log); one the pool no
        longer has (ENODATA: deleted already, or never made) is fine."""
        try:
            await self.send(pool, delete(thin_id))
        except errors.Kernel as exc:
            if exc.errno != errno.ENODATA:
                log.error("%s: could not delete thin id %d of pool %s: %s", whose, thin_id,
                          pool, exc)
                raise

    async def commit_tid(self, pool: str, current: int) -> int:
        await self.send(pool, set_transaction_id(current, current + 1))
        return current + 1

    def keep_udev(self, waits: list[UdevWait]) -> None:
        """udev's work on devices a change made without waiting for it
        (udev_sync False): kept by device, waited for before that device is
        removed (udev's probe of a new device holds it open, for seconds
        under load); the oldest closed past UDEV_KEPT (done long since)."""
        for wait in waits:
            old = self.udev_kept.pop(wait.name, None) if wait.name else None
            if old is not None:
                old.close()
            if wait.name:
                self.udev_kept[wait.name] = wait
            else:
                wait.close()
        while len(self.udev_kept) > UDEV_KEPT:
            self.udev_kept.pop(next(iter(self.udev_kept))).close()

    async def remove_closed(self, device: str, claim: str,
                            later: list[UdevWait] | None = None) -> None:
        """Remove a volume's *device* once it is closed: udev's work on it
        that nobody waited for is waited for first (keep_udev), then a
        moment's open is waited out (PROBE_WAITS); Busy (naming its users)
        if it stays open. Each wait looks at the open count alone (one
        ioctl): who has it open is asked once, at the end."""
        kept = self.udev_kept.pop(device, None)
        if kept is not None:
            try:
                await self.kernel(udev_done, kept)
            except Exception as exc:  # udev's lateness is no reason to refuse
                log.warning("remove %s: waiting for udev's earlier work: %s", device, exc)
        for wait in PROBE_WAITS:
            try:
                info = await self.kernel(Engine.device_info, device)
            except DmError:
                break  # gone: the remove says NotFound
            if not info.open_count:
                break
            await asyncio.sleep(wait)
        await self.devices.remove(device, claim=claim, later=later)

    async def remove_volume_devices(self, volume: VolumeRecord) -> None:
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

    async def zero_segments(self, layout_: PoolLayout, segments: tuple[Segment, ...]) -> None:
        """Zero *segments* of the pool's devices (a thick volume's new room:
        what a deleted volume, or whatever the disk held, left there)."""
        total, done = sum(seg.length for seg in segments) * 512, 0
        for seg in segments:
            path = layout_.devices[seg.device]
            work_bytes(done, total)
            try:
                await self.kernel.slow(Engine.wipe, path, seg.start * 512, seg.length * 512)
                done += seg.length * 512
            except OSError as exc:
                code = exc.errno or 0
                raise errors.Kernel(f"zeroing {seg.length} sectors of {path} at sector "
                                    f"{seg.start}: {os.strerror(code)}", code) from None
        work_bytes(done, total)

    async def volume_table(self, volume: VolumeRecord) -> list[TargetLine]:
        if volume.thick is not None:
            record = await self.pool(volume.pool)
            await self.check_devices(record)
            return thick_table(record.layout, volume.thick)
        assert volume.thin_id is not None
        return thin_table(volume.pool, volume.thin_id, volume.size_bytes)

    async def recorded(self, volume: VolumeRecord) -> VolumeRecord | None:
        """The volume's record as it is now (by its UUID), or None."""
        return next((v for v in await self.store.list_volumes(volume.pool)
                     if v.uuid == volume.uuid), None)


# How an operation cut short by a crash is finished or undone, from its
# intent, its arguments and the pool's record (None if there is none):
# "done", "rolled_back", or None to leave it pending for an admin.
Recover = Callable[[PoolCore, IntentRecord, PoolArgs, PoolRecord | None],
                   Awaitable[str | None]]
