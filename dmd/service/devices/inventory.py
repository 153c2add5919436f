"""What the kernel holds, as dmd shows it: one view per device, whoever made it.

The inventory is the read side of dmd. Clients read views (D-Bus properties,
GetManagedObjects) without touching the kernel, so reads never wait behind a
slow operation; the kernel is read only to refresh a view after a change
(dmd's own, or a hint from udev) or on a rescan.

Refreshes are coalesced per device name: while one is running, further
requests for the same name mark it dirty and it runs once more, so a storm of
hints costs one extra read per device, not one per hint.

A refresh prompted by something other than dmd's own call (udev, a kernel
event, an audit) also checks a managed device for drift, holding the device's
lock: dmd's own operation on it has then finished and updated its record, so
only a change made behind dmd's back is flagged.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from dmd.engine import DmError, DmFlags, InvalidArgument, TargetLine, validate_name
from dmd.engine.interface import Engine
from dmd.service import errors
from dmd.service.devices.drift import live_differs
from dmd.service.devices.operations import DeviceService, validated
from dmd.service.events import ChangeKind
from dmd.state.redact import redact_table

log = logging.getLogger(__name__)

SECTOR = 512


@dataclass(frozen=True, slots=True)
class UdevInfo:
    """What udev knows of a device, from its database or its last uevent."""

    symlinks: tuple[str, ...] = ()
    fs_type: str = ""
    fs_uuid: str = ""
    # udev has processed the device and its rules ran in full (dm's rules
    # disable the rest while a device is not ready, e.g. made without a table).
    ready: bool = False


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device as clients see it: key material is already redacted."""

    name: str
    uuid: str
    device: tuple[int, int]
    suspended: bool
    read_only: bool
    open_count: int
    event_nr: int
    live_table: tuple[TargetLine, ...]
    inactive_table: tuple[TargetLine, ...]
    dependencies: tuple[tuple[int, int], ...]
    managed: bool = False
    persistent: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    drifted: bool = False
    udev: UdevInfo = UdevInfo()

    @property
    def size_bytes(self) -> int:
        return sum(line.length for line in self.live_table) * SECTOR


Listener = Callable[[ChangeKind, DeviceView | None, DeviceView | None], None]


def _redacted(table: list[TargetLine]) -> tuple[TargetLine, ...]:
    return tuple(redact_table(table)[0])


class _Refresh:
    __slots__ = ("again", "check_drift", "done")

    def __init__(self) -> None:
        self.again = False
        self.check_drift = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class Inventory:
    """Views of every device in the kernel, keyed by dev_t, kept fresh."""

    def __init__(self, service: DeviceService) -> None:
        self.service = service
        self._views: dict[tuple[int, int], DeviceView] = {}
        self._by_name: dict[str, tuple[int, int]] = {}
        self._listeners: list[Listener] = []
        self._refreshing: dict[str, _Refresh] = {}
        self._udev: dict[tuple[int, int], UdevInfo] = {}
        self.refresh_count = 0
        # Every operation of the service returns only once its devices are
        # read again here (see dmd.service.events): one read per change.
        service.events.add_settler(self._settle)

    # -- reading -----------------------------------------------------------
    def __iter__(self) -> Iterator[DeviceView]:
        return iter(list(self._views.values()))

    def __len__(self) -> int:
        return len(self._views)

    def get(self, name: str) -> DeviceView | None:
        dev = self._by_name.get(name)
        return None if dev is None else self._views.get(dev)

    def by_device(self, device: tuple[int, int]) -> DeviceView | None:
        return self._views.get(device)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def find(self, name: str) -> DeviceView:
        """The view of device *name*; one the kernel has but udev or an event
        has not told us of yet is read first."""
        validated(lambda: validate_name(name))
        view = self.get(name)
        if view is None:
            await self.refresh(name)
            view = self.get(name)
        if view is None:
            raise errors.NotFound(f"no device {name!r}")
        return view

    # -- keeping fresh -----------------------------------------------------
    async def _settle(self, names: list[str]) -> None:
        for name in names:
            await self.refresh(name)

    async def refresh(self, name: str, *, check_drift: bool = False) -> None:
        """Re-read device *name* from the kernel; returns once a read that
        started after this call has been applied. *check_drift*: the change
        may not be dmd's (see the module's docstring)."""
        pending = self._refreshing.get(name)
        if pending is not None:
            pending.again = True
            pending.check_drift |= check_drift
            await asyncio.shield(pending.done)
            return
        pending = self._refreshing[name] = _Refresh()
        pending.check_drift = check_drift
        try:
            while True:
                pending.again = False
                check, pending.check_drift = pending.check_drift, False
                await self._refresh_once(name, check)
                if not pending.again:
                    break
        finally:
            del self._refreshing[name]
            pending.done.set_result(None)

    async def _read(self, name: str, records: dict[str, Any] | None = None
                    ) -> DeviceView | None:
        """The device's view now, or None when the kernel has no such name.
        *records* (managed records by name) spares a database read per device."""
        kernel = self.service.kernel
        try:
            info, live = await kernel(Engine.table_status, name, DmFlags.DM_STATUS_TABLE)
            inactive: list[TargetLine] = []
            if info.inactive_present:
                _, inactive = await kernel(Engine.table_status, name,
                    DmFlags.DM_STATUS_TABLE | DmFlags.DM_QUERY_INACTIVE_TABLE)
            deps = await kernel(Engine.table_deps, name) if info.active_present else []
        except DmError as exc:
            if exc.errno == errno.ENXIO:
                return None
            raise
        except InvalidArgument:  # a name the kernel could not hold
            return None
        record = (records.get(name) if records is not None
                  else await self.service.store.get_device(name))
        return self._view(info, live, inactive, deps, record)

    def _view(self, info: Any, live: list[TargetLine], inactive: list[TargetLine],
              deps: list[tuple[int, int]], record: Any) -> DeviceView:
        return DeviceView(
            name=info.name, uuid=info.uuid, device=info.device,
            suspended=info.suspended, read_only=info.read_only,
            open_count=info.open_count, event_nr=info.event_nr,
            live_table=_redacted(live), inactive_table=_redacted(inactive),
            dependencies=tuple(sorted(deps)),
            managed=record is not None,
            persistent=bool(record is not None and record.persistent),
            labels=dict(record.labels) if record is not None else {},
            drifted=bool(record is not None and record.drifted),
            udev=self._udev.get(info.device, UdevInfo()))

    async def _refresh_once(self, name: str, check_drift: bool) -> None:
        self.refresh_count += 1
        try:
            if check_drift:
                async with self.service.locks.hold(name):
                    view = await self._read(name)
                    if view is not None and view.managed and not view.drifted:
                        view = await self._check_drift(view)
            else:
                view = await self._read(name)
        except DmError as exc:
            log.warning("refresh %s: %s", name, exc)
            return
        if view is None:
            self._drop_name(name)
        else:
            self._put(view)

    async def _check_drift(self, view: DeviceView) -> DeviceView:
        record = await self.service.store.get_device(view.name)
        if record is None or not view.live_table or \
                not await live_differs(self.service, view.live_table, list(record.table)):
            return view
        log.warning("drift %s: its live table was changed outside dmd", view.name)
        await self.service.store.set_drifted(view.name, "live table changed outside dmd")
        return replace(view, drifted=True)

    def apply_udev(self, device: tuple[int, int], info: UdevInfo | None) -> None:
        """Take what udev says of *device* (None: udev forgot it)."""
        if info is None:
            self._udev.pop(device, None)
            info = UdevInfo()
        else:
            self._udev[device] = info
        view = self._views.get(device)
        if view is not None and view.udev != info:
            self._put(replace(view, udev=info))

    def drop_device(self, device: tuple[int, int]) -> None:
        """Forget *device*: the kernel no longer has it."""
        self._drop(device)

    async def rescan(self) -> None:
        """Compare every view with the kernel: add, change and drop to match."""
        listed = await self.service.kernel(Engine.list_devices)
        records = {r.name: r for r in await self.service.store.list_devices()}
        seen: set[tuple[int, int]] = set()
        for entry in listed:
            seen.add(entry.device)
            try:
                view = await self._read(entry.name, records)
            except DmError as exc:
                log.warning("rescan %s: %s", entry.name, exc)
                continue
            if view is not None:
                self._put(view)
        for dev in [d for d in self._views if d not in seen]:
            self._drop(dev)

    # -- applying ----------------------------------------------------------
    def _emit(self, kind: ChangeKind, before: DeviceView | None,
              after: DeviceView | None) -> None:
        subject = after if after is not None else before
        for listener in list(self._listeners):
            try:
                listener(kind, before, after)
            except Exception:
                log.exception("inventory listener failed on %s",
                              subject.name if subject is not None else "?")

    def _put(self, view: DeviceView) -> None:
        before = self._views.get(view.device)
        if before is not None and before.name != view.name and \
                self._by_name.get(before.name) == view.device:
            del self._by_name[before.name]
        # Another dev_t may still carry this name in our views (removed and
        # re-made behind our back): the kernel says the name is here now.
        stale = self._by_name.get(view.name)
        if stale is not None and stale != view.device:
            self._drop(stale)
        self._views[view.device] = view
        self._by_name[view.name] = view.device
        if before is None:
            self._emit(ChangeKind.ADDED, None, view)
        elif before != view:
            self._emit(ChangeKind.CHANGED, before, view)

    def _drop_name(self, name: str) -> None:
        dev = self._by_name.get(name)
        if dev is not None:
            self._drop(dev)

    def _drop(self, dev: tuple[int, int]) -> None:
        view = self._views.pop(dev, None)
        if view is None:
            return
        if self._by_name.get(view.name) == dev:
            del self._by_name[view.name]
        self._emit(ChangeKind.REMOVED, view, None)
