"""A pool's space: what is left on its devices, growing its data or metadata
into it, and telling the world when neither can grow.

A pool made with ``data-size`` (or over devices that grew) keeps part of its
devices unallocated. When the pool runs low, on the kernel's event (the low
water mark: fired once per resume, so every check also runs after each of
dmd's own resumes and at start-up), dmd extends the data device by
``EXTEND_PERCENT`` of its size (at least what brings it back over the mark),
or the metadata device, from that room, as a journaled operation
(``pool-extend``: the table of tdata or tmeta reloaded larger, then the
pool's; past the pool's reload it rolls forward). With no room left it
reports ``low`` once and ``full`` once the kernel says out of data space,
until an AddDevice (or a delete) brings space back.

A full pool with on-full "queue" holds its writes; after the pool's
``no_space_timeout`` seconds without space dmd reloads its table with
``error_if_no_space`` so that they fail (the kernel's own timeout is a module
parameter shared by every pool on the machine, LVM's too: dmd reads it, never
sets it, and the shorter of the two wins). Space back, the table queues again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from dmd.engine import DmFlags
from dmd.engine.interface import Engine
from dmd.engine.targets.thin import MAX_METADATA_SECTORS
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Caller
from dmd.service.journal import PoolArgs, PoolExtendStep
from dmd.service.pools.core import (
    EXTEND_PERCENT,
    Accept,
    PoolCore,
    Records,
    Recover,
    ignore,
    metadata_growth,
)
from dmd.service.pools.core import metadata_low as metadata_short
from dmd.service.pools.names import PoolPart, pool_device
from dmd.service.pools.names import tpool as tpool_name
from dmd.service.pools.room import carve, room_sectors
from dmd.service.pools.tables import linear, pool_table
from dmd.state import IntentRecord, PoolLayout, PoolRecord, Segment

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class Space:
    """One reading of a pool's space (bytes)."""

    data_used: int
    data_total: int
    metadata_used: int
    metadata_total: int
    room: int  # unallocated on the pool's devices
    mode: str
    metadata_low_water: int = 0  # the kernel's mark: its event comes below it


SpaceListener = Callable[[str, str, Space], None]  # (pool, "low" | "full" | "ok", space)


def extended(record: PoolRecord, data_sectors: int, metadata_sectors: int,
             taken: tuple[Segment, ...] = ()) -> PoolLayout:
    """The layout with *data_sectors* more data (whole blocks) and
    *metadata_sectors* more metadata, from the room thick volumes (*taken*)
    leave."""
    layout = record.layout
    if metadata_sectors:
        layout = replace(layout, metadata=(*layout.metadata,
                                           *carve(layout, metadata_sectors, taken)))
    if data_sectors:
        data_sectors -= data_sectors % record.block_sectors
        if data_sectors <= 0:
            raise errors.InvalidArgument("less than one data block to add")
        layout = replace(layout, data=(*layout.data, *carve(layout, data_sectors, taken)))
    return layout


async def extend_pool(pools: PoolCore, pool: str, data_bytes: int = 0,
                      metadata_bytes: int = 0, *, caller: Caller = ROOT,
                      accept: Accept = ignore) -> PoolRecord:
    """Grow the pool's data and/or metadata into its devices' free space."""
    async with pools.change(pool) as change:
        record = await change.record()
        await pools.check_authorized(caller, Action.POOL, pool, record.owner_uid)
        await pools.check_devices(record)
        grown_layout = extended(record, data_bytes // 512, metadata_bytes // 512,
                                await pools.thick_segments(pool))
        grown = replace(record, layout=grown_layout)
        claim = pools.owner(pool)

        async def undo(journal: object) -> None:
            await pools.restore_layout(record)

        async def finish(_: object) -> None:
            await pools.finish_layout(grown)

        async with change.intent("pool-extend", pool,
                                 PoolArgs(pool=pool, layout=grown_layout.to_json()), undo,
                                 roll_forward=finish) as journal:
            await change.accepted(grown, accept)
            await change.describe_pending("pool-extend", layout=grown_layout)
            await journal.mark(PoolExtendStep.DEVICES)
            if grown_layout.data != record.layout.data:
                await pools.devices.reload(pool_device(pool, PoolPart.TDATA),
                                           linear(grown_layout, grown_layout.data), claim=claim)
            if grown_layout.metadata != record.layout.metadata:
                await pools.devices.reload(pool_device(pool, PoolPart.TMETA),
                                           linear(grown_layout, grown_layout.metadata),
                                           claim=claim)
            await journal.mark(PoolExtendStep.POOL)
            journal.no_way_back()
            await pools.finish_layout(grown, devices=False)
    log.info("pool-extend %s: data %d -> %d bytes, metadata %d -> %d bytes", pool,
             record.layout.data_sectors * 512, grown_layout.data_sectors * 512,
             record.layout.metadata_sectors * 512, grown_layout.metadata_sectors * 512)
    return grown


class SpaceWatch:
    """Checks a pool's space when asked (its event, a resume, start-up) and
    extends it or reports; one check per pool at a time."""

    def __init__(self, pools: PoolCore) -> None:
        self.pools = pools
        self.listeners: list[SpaceListener] = []
        self.reported: dict[str, str] = {}  # pool -> the last "low" / "full" / "ok" said
        self._running: dict[str, asyncio.Task[Space | None]] = {}
        self._again: set[str] = set()  # asked for while a check ran
        # pool -> the task that fails its queued writes at its no-space-timeout
        # (kept, done, while the pool stays full: one timeout per time full).
        self._deadlines: dict[str, asyncio.Task[None]] = {}
        # Pools whose table this dmd knows to queue (only dmd's own timeout
        # makes it fail writes; a dmd before this one may have left it so).
        self._queueing: set[str] = set()
        pools.add_settler(self._changed)

    def listen(self, listener: SpaceListener) -> None:
        self.listeners.append(listener)

    def request(self, pool: str) -> None:
        """Check *pool* soon (its event came, or it changed). A request while
        a check runs makes another run after it: the one running may have
        read the pool before what the request is about (the kernel's event
        comes once)."""
        if pool in self._running:
            self._again.add(pool)
        else:
            self._running[pool] = asyncio.get_running_loop().create_task(self._run(pool))

    async def _changed(self, pool: str, _: Records | None) -> None:
        self.request(pool)

    async def _run(self, pool: str) -> Space | None:
        try:
            return await self.check(pool)
        except errors.NotFound:
            return None  # destroyed meanwhile
        except Exception:
            log.exception("pool %s: space check failed", pool)
            return None
        finally:
            self._running.pop(pool, None)
            if pool in self._again:
                self._again.discard(pool)
                self.request(pool)

    async def settled(self) -> None:
        """Wait for the checks under way (tests, shutdown)."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def close(self) -> None:
        """Stop the timers and wait for them and the checks under way."""
        for task in self._deadlines.values():
            task.cancel()
        await asyncio.gather(*self._deadlines.values(), return_exceptions=True)
        self._deadlines.clear()
        await self.settled()

    async def read(self, pool: str, record: PoolRecord | None = None) -> Space:
        record = record or await self.pools.pool(pool)
        state = await self.pools.pool_state(pool, record)
        room = room_sectors(record.layout, await self.pools.thick_segments(pool)) * 512
        return Space(state.data_used_bytes, state.data_total_bytes, state.metadata_used_bytes,
                     state.metadata_total_bytes, room, state.mode,
                     state.metadata_low_water_bytes)

    async def check(self, pool: str) -> Space:
        record = await self.pools.pool(pool)
        space = await self.read(pool, record)
        if space.data_total == 0 or pool in self.pools.shown.refused or \
                pool in self.pools.stopped:
            return space
        low_data = _free_percent(space.data_used, space.data_total) <= record.low_water_percent
        low_meta = metadata_low(space)
        block = record.block_sectors * 512
        data_bytes = metadata_bytes = 0
        if low_data:
            # EXTEND_PERCENT more, and at least enough to be over the mark again.
            want = max(space.data_total * EXTEND_PERCENT // 100,
                       _to_clear(space.data_used, space.data_total, record.low_water_percent))
            data_bytes = min(-(-want // block) * block, space.room // block * block)
        if low_meta and record.layout.metadata_sectors < MAX_METADATA_SECTORS:
            metadata_bytes = min(metadata_growth(space.metadata_total),
                                 space.room - data_bytes) // 4096 * 4096
        # The metadata first, in a resume of its own: a pool out of metadata
        # space has its metadata read-only, and the kernel grows the data
        # (which writes the data space map there) before the metadata.
        growth = [(0, metadata_bytes)] if metadata_bytes >= 4096 else []
        growth += [(data_bytes, 0)] if data_bytes >= block else []
        for data_more, metadata_more in growth:
            try:
                await extend_pool(self.pools, pool, data_more, metadata_more)
            except errors.ServiceError as exc:
                log.error("pool %s: could not extend it: %s", pool, exc)
                break
        if growth:
            space = await self.read(pool)
            low_data = _free_percent(space.data_used, space.data_total) <= \
                record.low_water_percent
            low_meta = metadata_low(space)
        level = ("full" if space.mode in ("out-of-data-space", "out-of-metadata-space") else
                 "low" if low_data or low_meta else "ok")
        if self.reported.get(pool, "ok") != level:
            self.reported[pool] = level
            if level != "ok":
                log.warning("pool %s: %s: data %d of %d bytes used, metadata %d of %d, "
                            "%d bytes left to grow into", pool, level, space.data_used,
                            space.data_total, space.metadata_used, space.metadata_total,
                            space.room)
            for listener in list(self.listeners):
                listener(pool, level, space)
        try:
            await self._queue_policy(record, level)
        except Exception:
            log.exception("pool %s: could not apply its on-full policy", pool)
        return space


    async def _queue_policy(self, record: PoolRecord, level: str) -> None:
        """Start the no-space-timeout of a queueing pool that became full
        (again at once if the time is up, and a reload, an extension of its
        metadata say, made its writes queue again); a pool no longer full has
        its writes queue again."""
        pool = record.name
        if record.on_full != "queue":
            return
        deadline = self._deadlines.get(pool)
        if level == "full":
            if record.no_space_timeout and (deadline is None or (
                    deadline.done() and not await self._failing_writes(pool))):
                self._deadlines[pool] = asyncio.get_running_loop().create_task(
                    self._fail_writes_after(pool, record.no_space_timeout if deadline is None
                                            else 0))
            return
        if deadline is not None:
            deadline.cancel()
            del self._deadlines[pool]
        elif pool in self._queueing:
            return
        if not await self._failing_writes(pool):
            self._queueing.add(pool)
        else:
            async with self.pools.change(pool):
                # What holds now: an operation may have had the lock meanwhile.
                record = await self.pools.pool(pool)
                state = await self.pools.pool_state(pool, record)
                if state.mode == "out-of-data-space" or not await self._failing_writes(pool):
                    return
                await self.pools.devices.reload(tpool_name(pool), pool_table(record),
                                                claim=self.pools.owner(pool))
                self._queueing.add(pool)
            log.info("pool %s: space again: writes queue when it is full", pool)

    async def _failing_writes(self, pool: str) -> bool:
        _, lines = await self.pools.kernel(Engine.table_status, tpool_name(pool),
                                           DmFlags.DM_STATUS_TABLE)
        return "error_if_no_space" in lines[0].params.split()

    async def _fail_writes_after(self, pool: str, seconds: int) -> None:
        await asyncio.sleep(seconds)
        try:
            async with self.pools.change(pool):
                record = await self.pools.pool(pool)
                state = await self.pools.pool_state(pool, record)
                if state.mode != "out-of-data-space" or await self._failing_writes(pool):
                    return
                log.warning("pool %s: out of data space for %d s: the writes waiting for "
                            "space fail now, and new ones at once, until it has space",
                            pool, record.no_space_timeout)
                self._queueing.discard(pool)
                await self.pools.devices.reload(tpool_name(pool),
                                                pool_table(record, fail_writes=True),
                                                claim=self.pools.owner(pool))
        except errors.NotFound:
            pass  # destroyed meanwhile
        except Exception:
            log.exception("pool %s: could not fail its queued writes", pool)


def what_to_do(record: PoolRecord, mode: str) -> str:
    """For a pool in *mode*, what its owner can do (shown with its Mode)."""
    if mode == "out-of-data-space":
        writes = ("fail" if record.on_full == "error" else
                  f"wait up to {record.no_space_timeout} s for space, then fail"
                  if record.no_space_timeout else "wait for space")
        return (f"the pool is out of data space and its writes {writes}: add a device "
                f"(AddDevice) or delete volumes")
    if mode == "out-of-metadata-space":
        return ("the pool's metadata is full and writes that need a new block fail: add a "
                "device (AddDevice): dmd grows the metadata into it first and the pool "
                "writes again")
    if mode in ("read-only", "needs-check"):
        return ("the kernel stopped the pool's writes after a metadata error: close its "
                "volumes (unmount, stop their users), then Repair: thin_repair writes a "
                "mended copy of the metadata into the pool's spare area")
    if mode == "damaged":
        return ("thin_check found the pool's metadata damaged, so dmd did not make its "
                "thin-pool device and refuses changes (ChangesRefused says what it found): "
                "Repair writes a mended copy into the pool's spare area; volumes whose "
                "mappings it finds come back with their data")
    return ""


def metadata_low(space: Space) -> bool:
    return metadata_short(space.metadata_used, space.metadata_total, space.metadata_low_water)


def _free_percent(used: int, total: int) -> float:
    return 100.0 * (total - used) / total if total else 100.0


def _to_clear(used: int, total: int, low_percent: int) -> int:
    """How much more space puts free above *low_percent* again."""
    # (total + x - used) / (total + x) > p  <=>  x > (used - (1 - p) * total) / (1 - p)
    keep = 1 - low_percent / 100
    return max(0, int((used - keep * total) / keep) + 1)


async def recover_extend(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                         record: PoolRecord | None) -> str | None:
    """After a crash (dmd.service.pools.recovery)."""
    if record is None:
        return "rolled_back"
    assert args.layout is not None
    larger = replace(record, layout=PoolLayout.from_json(args.layout))
    pools.claim(args.pool)
    if intent.step >= PoolExtendStep.POOL:  # the kernel may have taken it: forward
        await pools.finish_layout(larger)
        return "done"
    await pools.restore_layout(record)
    return "rolled_back"


RECOVERY: dict[str, Recover] = {"pool-extend": recover_extend}
