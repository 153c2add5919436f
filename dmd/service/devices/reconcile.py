"""Keeping the inventory equal to the kernel when others change it.

dmd shares the kernel with LVM, cryptsetup, multipath and people running
dmsetup. Three kinds of news arrive, all of them hints (the kernel is the
truth, read again before anything is shown):

- kernel events: DM_DEV_ARM_POLL on a control handle wakes dmd when a device
  is created, removed or renamed, a table goes live, or a target raises an
  event. A *sync* lists the devices (one ioctl, with each one's event number)
  and refreshes only the ones that are new, renamed, still without a table,
  or whose event number moved; devices no longer listed are dropped.
- uevents from udev: they carry udev's view (symlinks, filesystem), and a
  change uevent follows every resume, including the swap of a new table,
  which moves no event number. The named device is refreshed.
- timers: a sync every minute (one ioctl) for whatever a lost event hid,
  and an audit every ten minutes: a sync plus each device's status flags and
  live table, for what neither source reports (a suspend or a table load by
  another tool).

Requests are coalesced: while a sync runs, any number of further requests
make it run once more, so a storm of hundreds of events costs a handful of
listings and one refresh per device that changed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dmd.engine import DeviceInfo, DmError, DmFlags, TargetLine
from dmd.engine.interface import Engine
from dmd.service.devices.inventory import DeviceView, Inventory, UdevInfo
from dmd.service.events import ChangeKind
from dmd.state.redact import redact_table

log = logging.getLogger(__name__)

# How many refreshes a sync runs at once: the engine's worker pool bounds the
# ioctls anyway; this only bounds the tasks.
REFRESH_BATCH = 16

# The share of time syncs may take while kernel events keep coming. Every
# change dmd makes itself is already read back by the operation (the service
# settles it), so a sync is only for others' changes; at 10,000 devices a
# listing costs tens of milliseconds and dmd's own creates fire an event each.
SYNC_DUTY = 0.2

# How many devices an audit reads in one worker job.
AUDIT_BATCH = 128

DmEventListener = Callable[[DeviceView, list[TargetLine]], None]


def _read_statuses(engine: Engine, names: list[str]
                   ) -> list[tuple[DeviceInfo, list[TargetLine]] | None]:
    """Each device's flags and live table, None for one the kernel no longer
    has under that name (runs on a worker thread)."""
    out: list[tuple[DeviceInfo, list[TargetLine]] | None] = []
    for name in names:
        try:
            out.append(engine.table_status(name, DmFlags.DM_STATUS_TABLE))
        except DmError:
            out.append(None)
    return out


def _differs(view: DeviceView, info: DeviceInfo, live: list[TargetLine]) -> bool:
    return (info.device != view.device or info.suspended != view.suspended
            or info.open_count != view.open_count or info.event_nr != view.event_nr
            or info.inactive_present != bool(view.inactive_table)
            or info.active_present != bool(view.live_table)
            or info.uuid != view.uuid
            or tuple(redact_table(live)[0]) != view.live_table)


@dataclass(frozen=True, slots=True)
class UdevEvent:
    """One uevent for a dm device, as the udev door hands it over."""

    action: str  # "add", "change", "remove", ...
    device: tuple[int, int]
    name: str | None  # DM_NAME; None when udev's dm rules have not named it
    info: UdevInfo


class Coalesced:
    """Runs an async job on request; requests made while it runs make it run
    once more after, never concurrently and never more than once more.

    *duty*: the largest share of time back-to-back runs may spend on their
    overhead. A job returns the seconds of overhead it spent (or None: all
    of it); asked for again, it waits overhead * (1 - duty) / duty before the
    next run, so a cost that grows with the number of devices (a listing)
    cannot take over the daemon while dmd's own operations keep the kernel's
    event firing, while the useful part (refreshing what changed) is not
    held back. With few devices the overhead is tiny and so is the wait."""

    def __init__(self, job: Callable[[], Awaitable[float | None]], what: str,
                 duty: float = 1.0) -> None:
        assert 0 < duty <= 1
        self._job, self._what = job, what
        self._rest = (1 - duty) / duty
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self.runs = 0

    def request(self) -> None:
        if self._task is not None:
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                self._again = False
                self.runs += 1
                started = time.monotonic()
                overhead: float | None = None
                try:
                    overhead = await self._job()
                except Exception:
                    log.exception("%s failed", self._what)
                if not self._again:
                    break
                if self._rest:
                    spent = time.monotonic() - started if overhead is None else overhead
                    await asyncio.sleep(spent * self._rest)
        finally:
            self._task = None

    async def idle(self) -> None:
        """Wait until no run is in progress or pending."""
        while self._task is not None:
            await asyncio.shield(self._task)


class Reconciler:
    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self.service = inventory.service
        self._sync = Coalesced(self.sync, "sync", SYNC_DUTY)
        self._audit = Coalesced(self.audit, "audit")
        self._dm_event_listeners: list[DmEventListener] = []
        self._tasks: set[asyncio.Task[None]] = set()
        inventory.subscribe(self._on_view)

    def on_dm_event(self, listener: DmEventListener) -> None:
        self._dm_event_listeners.append(listener)

    # -- hints in ------------------------------------------------------------
    def kernel_event(self) -> None:
        self._sync.request()

    def udev_event(self, event: UdevEvent) -> None:
        self.inventory.apply_udev(event.device, None if event.action == "remove"
                                  else event.info)
        if event.action == "remove" or event.name is None:
            self._sync.request()
        else:
            self._spawn(self.inventory.refresh(event.name, check_drift=True))

    def overflow(self) -> None:
        """Some hints were lost: compare everything."""
        log.warning("events were lost; auditing every device")
        self._audit.request()

    def request_sync(self) -> None:
        self._sync.request()

    def request_audit(self) -> None:
        self._audit.request()

    async def settled(self) -> None:
        """Wait until every hint received so far has been acted on."""
        while self._tasks or self._sync._task or self._audit._task:
            await self._sync.idle()
            await self._audit.idle()
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)

    @property
    def syncs(self) -> int:
        return self._sync.runs

    @property
    def audits(self) -> int:
        return self._audit.runs

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- comparing -----------------------------------------------------------
    async def sync(self) -> float:
        """Refresh every device that is new, renamed or has a new event number;
        drop the ones the kernel no longer lists. Returns the seconds spent
        finding them (the listing: its cost grows with every device), not
        the refreshes (each one a device that needed it)."""
        started = time.monotonic()
        listed = await self.service.kernel(Engine.list_devices)
        stale: list[str] = []
        seen: set[tuple[int, int]] = set()
        for entry in listed:
            seen.add(entry.device)
            view = self.inventory.by_device(entry.device)
            if view is not None and view.managed and view.name != entry.name:
                await self._follow_rename(view.name, entry.name)
            # No live table yet: most likely made a moment ago, its table is
            # coming (a swap moves no event number, so it would go unseen).
            if view is None or view.name != entry.name or not view.live_table or (
                    entry.event_nr is not None and entry.event_nr != view.event_nr):
                stale.append(entry.name)
        for view in [v for v in self.inventory if v.device not in seen]:
            if view.managed:
                await self._follow_remove(view.name)
            self.inventory.drop_device(view.device)
        overhead = time.monotonic() - started
        await self._refresh_all(stale)
        return overhead

    # -- managed devices changed by others: records follow the kernel ---------
    async def _follow_rename(self, old: str, new: str) -> None:
        """Another tool renamed a managed device: its record takes the new
        name (and says so), so dmd's records never name what is not there."""
        store = self.service.store
        async with self.service.locks.hold(old, new):
            # dmd's own rename holds both locks and has moved the record already.
            if await store.get_device(old) is None or await store.get_device(new) is not None:
                return
            await store.rename_device(old, new)
            await store.set_drifted(new, f"renamed outside dmd (was {old!r})")
        log.warning("drift %s: renamed outside dmd (was %s); its record follows", new, old)

    async def _follow_remove(self, name: str) -> None:
        """Another tool removed a managed device. A persistent one keeps its
        record (dmd re-creates it at its next start) and is marked drifted;
        any other's record goes, as the device did."""
        store = self.service.store
        async with self.service.locks.hold(name):
            # The record first: after dmd's own remove it is gone already,
            # and the kernel need not be asked.
            record = await store.get_device(name)
            if record is None:
                return
            if await self._present(name):
                return  # dmd's own remove-and-recreate, or a race: the kernel has it
            if record.persistent:
                await store.set_drifted(name, "removed outside dmd; re-created at dmd's next start")
                log.warning("drift %s: removed outside dmd; kept (persistent)", name)
            else:
                await store.remove_device(name)
                log.warning("drift %s: removed outside dmd; its record is dropped", name)

    async def _present(self, name: str) -> bool:
        try:
            await self.service.kernel(Engine.device_info, name)
        except DmError as exc:
            return exc.errno != errno.ENXIO  # in doubt, a record is kept
        return True

    async def audit(self) -> None:
        """A sync, then each device's status flags and live table against its
        view (one ioctl a device, AUDIT_BATCH of them to a worker job: an
        audit of 1,000 devices is a few thread hand-overs, not thousands)."""
        await self.sync()
        views = list(self.inventory)
        stale: list[str] = []
        for i in range(0, len(views), AUDIT_BATCH):
            batch = views[i:i + AUDIT_BATCH]
            read = await self.service.kernel(_read_statuses,
                                             [view.name for view in batch])
            for view, status in zip(batch, read, strict=True):
                if status is None or _differs(view, *status):
                    stale.append(view.name)  # gone or renamed: the refresh says which
        await self._refresh_all(stale)

    async def _refresh_all(self, stale: list[str]) -> None:
        for i in range(0, len(stale), REFRESH_BATCH):
            await asyncio.gather(*(self.inventory.refresh(name, check_drift=True)
                                   for name in stale[i:i + REFRESH_BATCH]))

    def _on_view(self, kind: ChangeKind, before: DeviceView | None,
                 after: DeviceView | None) -> None:
        # Whichever refresh saw it first (a uevent's, a sync's, dmd's own):
        # a device whose event number moved had a kernel event.
        if kind is ChangeKind.CHANGED and before is not None and after is not None \
                and after.event_nr != before.event_nr:
            self._spawn(self._dm_event(after))

    async def _dm_event(self, view: DeviceView) -> None:
        """The kernel raised an event on *view*'s device: tell listeners, with
        the status that goes with it."""
        try:
            _, status = await self.service.kernel(Engine.table_status,
                                                  view.name, DmFlags(0))
        except DmError as exc:
            log.info("event %s: status unreadable: %s", view.name, exc)
            return
        log.info("event %s: event number %d", view.name, view.event_nr)
        for listener in list(self._dm_event_listeners):
            try:
                listener(view, status)
            except Exception:
                log.exception("event listener failed on %s", view.name)
