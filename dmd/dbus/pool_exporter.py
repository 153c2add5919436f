"""Keep one object per pool, per volume and per job in step with the service.

The pool service settles every change through ``refresh`` before the
change's caller hears of it (and before a job's end is announced), so a
client that reads properties after a reply or a Completed signal sees the
new state. Pool usage moves with writes nobody tells dmd about: it is read
again on every change of the pool's devices (a thin-pool event raises the
pool's event number) and every ``USAGE_INTERVAL`` seconds while pools exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from dmd.dbus.bus import DmdBus
from dmd.dbus.declare import CachedObject
from dmd.dbus.job import JobInterface, job_properties
from dmd.dbus.names import NO_OBJECT, job_path, pool_path, volume_path
from dmd.dbus.pool import PoolInterface, pool_properties
from dmd.dbus.volume import VolumeInterface, volume_properties
from dmd.engine import DmError
from dmd.engine.interface import Engine
from dmd.engine.targets import parse_status
from dmd.engine.targets.thin import ThinStatus
from dmd.service.devices.inventory import DeviceView, Inventory
from dmd.service.devices.reconcile import Coalesced
from dmd.service.events import ChangeKind
from dmd.service.jobs import Job, JobEvent
from dmd.service.pools.cache import corig
from dmd.service.pools.core import Records
from dmd.service.pools.names import claim_prefix, cleartext_device, in_pool, volume_device
from dmd.service.pools.service import PoolService, PoolState
from dmd.service.pools.space import Space
from dmd.state import PoolRecord, VolumeRecord

log = logging.getLogger(__name__)

USAGE_INTERVAL = 30.0
# A job's Progress is published at most this often: a quick job's ten steps
# were ten PropertiesChanged signals (each marshalled here and routed by the
# bus daemon) for a job over in a fraction of a second; a long job's
# progress still moves several times a second.
PROGRESS_INTERVAL = 0.25


def _used_bytes(engine: Engine, devices: list[str]) -> dict[str, int]:
    """Mapped bytes of each thin device, in one worker job."""
    used: dict[str, int] = {}
    for name in devices:
        with contextlib.suppress(DmError, ValueError):
            _, lines = engine.table_status(name)
            status = parse_status("thin", lines[0].params) if lines else None
            if isinstance(status, ThinStatus):
                used[name] = status.mapped_sectors * 512
    return used


def _thin_device(volume: VolumeRecord) -> str:
    if volume.cache is not None:
        return corig(volume.pool, volume.name)
    return volume_device(volume.pool, volume.name)


class PoolExporter:
    def __init__(self, bus: DmdBus, pools: PoolService, inventory: Inventory) -> None:
        self.bus, self.pools, self.inventory = bus, pools, inventory
        self.objects: dict[str, CachedObject] = {}
        self._pool_of_path: dict[str, str] = {}  # pool object path -> pool name
        # -> (pool, volume, its UUID: what the object stands for)
        self._volume_of_path: dict[str, tuple[str, str, str]] = {}
        self._paths_of_pool: dict[str, set[str]] = {}
        self._job_results: dict[int, str] = {}
        self._timer: asyncio.Task[None] | None = None
        self._refreshers: dict[str, Coalesced] = {}
        self._used: dict[str, int] = {}  # volume device -> mapped bytes, as last read
        self._states: dict[str, PoolState] = {}  # pool -> its kernel state, as last read
        # Devices of a pool that changed while an operation held it (an
        # origin suspended and resumed, a volume made): read at its settle.
        self._touched: dict[str, set[str]] = {}
        # volume path -> what its properties were last made from
        self._shown: dict[str, tuple[Any, ...]] = {}
        # job path -> when its properties were last published, and the
        # publication of its progress due later (at most one)
        self._job_published: dict[str, float] = {}
        self._progress_due: dict[str, asyncio.TimerHandle] = {}
        pools.add_settler(self._settled, begun=self._begun)
        pools.jobs.subscribe(self._on_job)
        inventory.subscribe(self._on_device)

    async def start(self) -> None:
        for pool in await self.pools.store.list_pools():
            await self.refresh(pool.name)
        self._timer = asyncio.get_running_loop().create_task(self._usage_timer())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    # -- lookups for the router ------------------------------------------------
    def pool_at(self, path: str) -> str | None:
        return self._pool_of_path.get(path)

    def volume_at(self, path: str) -> tuple[str, str, str] | None:
        return self._volume_of_path.get(path)

    @staticmethod
    def job_at(path: str) -> int | None:
        tail = path.rsplit("/", 1)[-1]
        return int(tail) if tail.isdigit() else None

    def space_changed(self, pool: str, level: str, space: Space) -> None:
        """LowSpace or Full on the pool's object (its Mode follows with the
        refresh the pool's event starts)."""
        record = self.pools.shown.pool_under_way(pool)
        path = next((p for p, name in self._pool_of_path.items() if name == pool), None)
        obj = self.objects.get(path) if path is not None else None
        if record is not None or not isinstance(obj, PoolInterface) or level == "ok":
            return
        figures = (space.data_used, space.data_total, space.metadata_used,
                   space.metadata_total)
        if level == "full":
            obj.Full(*figures)
        else:
            obj.LowSpace(*figures)

    # -- pools and volumes -----------------------------------------------------
    async def _settled(self, pool: str, records: Records | None) -> None:
        # An operation's own change: usage is read for the volumes whose
        # devices it made or changed, not for every volume of the pool
        # (O(volumes) ioctls twice an operation); the others on their pool's
        # events and the timer.
        await self.refresh(pool, usage=False, records=records)

    async def _begun(self, pool: str, records: Records | None) -> None:
        # A change accepted, none of its work done: its subjects under way
        # are new, the kernel's figures are as last read (its end reads them).
        await self.refresh(pool, usage=False, records=records, kernel=False)

    async def refresh(self, pool: str, usage: bool = True,
                      records: Records | None = None, kernel: bool = True) -> None:
        """Make the pool's objects show what the service holds now; *usage*:
        read every active volume's mapped bytes again (else only of the
        volumes not read yet); *records*: the pool's, as they are now (else
        read); *kernel* False: nothing read from the kernel that was read
        before (the pool's state, volumes' mapped bytes)."""
        record = records[0] if records is not None else await self.pools.store.get_pool(pool)
        lifecycle = "stopped" if record is not None and record.stopped else "active"
        pending = self.pools.shown.pool_under_way(pool)
        if pending is not None:
            record, lifecycle = pending[0], pending[1]
        paths: set[str] = set()
        if record is not None:
            if lifecycle == "creating":
                state = PoolState.inactive(record)
            elif not kernel and pool in self._states:
                state = self._states[pool]
            else:
                state = self._states[pool] = await self.pools.pool_state(pool, record)
            path = pool_path(record.uuid)
            self._put(path, PoolInterface, pool_properties(record, state, lifecycle,
                                                           self._refused(pool)))
            self._pool_of_path[path] = pool
            paths.add(path)
            paths |= await self._refresh_volumes(
                record, usage, records[1] if records is not None and pending is None else None,
                kernel)
        stale = self._paths_of_pool.get(pool, set()) - paths
        if stale:  # a pool renamed keeps its objects: they are its new name's now
            stale -= set().union(*(p for name, p in self._paths_of_pool.items()
                                   if name != pool))
        for path in stale:
            self._drop(path)
        self._paths_of_pool[pool] = paths
        if not paths:
            del self._paths_of_pool[pool]
            self._states.pop(pool, None)

    def _refused(self, pool: str) -> str:
        """Why dmd refuses changes to *pool*: its disks, or its metadata."""
        if pool in self.pools.shown.refused:
            return self.pools.shown.refused[pool]
        if pool in self.pools.damaged:
            return f"its metadata is damaged ({self.pools.damaged[pool]}): Repair mends it"
        return ""

    async def _refresh_volumes(self, pool: PoolRecord, usage: bool,
                               recorded: list[VolumeRecord] | None, kernel: bool) -> set[str]:
        if recorded is None:
            recorded = await self.pools.store.list_volumes(pool.name)
        volumes: dict[str, tuple[VolumeRecord, str]] = {
            v.uuid: (v, "active" if v.active else "inactive") for v in recorded}
        for volume, state in self.pools.shown.volumes_under_way(pool.name):
            volumes[volume.uuid] = (volume, state)
        # The thin device's mapped blocks: a cached volume's is under its cache.
        active = [_thin_device(v) for v, state in volumes.values()
                  if state != "inactive" and v.thick is None]
        prefix = claim_prefix(pool.name)
        for gone in [d for d in self._used if in_pool(d, prefix) and d not in active]:
            del self._used[gone]
        touched = self._touched.pop(pool.name, set()) if kernel else set()
        unread = [d for d in active if usage or d not in self._used or d in touched]
        if unread and kernel:
            self._used.update(await self.pools.kernel(_used_bytes, unread))
        used = {d: self._used[d] for d in active if d in self._used}
        paths = set()
        known = set(volumes)
        for uuid, (volume, state) in volumes.items():
            device = volume_device(pool.name, volume.name)
            view = self.inventory.get(device)
            minor = view.device[1] if view is not None else None
            if state == "active" and view is None:
                state = "inactive"  # its device is missing (removed behind dmd's back)
            cleartext = (self.inventory.get(cleartext_device(pool.name, volume.name))
                         if volume.encryption is not None else None)
            cleartext_minor = cleartext.device[1] if cleartext is not None else None
            waiting = self.pools.shown.waiting.get(uuid, "")
            path = volume_path(uuid)
            paths.add(path)
            # Most of a large pool's volumes are as they were: their
            # properties are made again only when what they are made from moved.
            # A thick volume holds all of its size.
            used_bytes = (volume.size_bytes if volume.thick is not None
                          else used.get(_thin_device(volume), 0))
            inputs = (volume, pool.uuid, state, used_bytes, minor,
                      volume.origin_uuid in known, cleartext_minor, waiting)
            if self._shown.get(path) == inputs:
                continue
            self._put(path, VolumeInterface, volume_properties(
                volume, pool.uuid, state, used_bytes, minor, known, cleartext_minor, waiting))
            self._shown[path] = inputs
            self._volume_of_path[path] = (pool.name, volume.name, volume.uuid)
        return paths

    def _put(self, path: str, cls: type[CachedObject], values: dict[str, Any]) -> None:
        obj = self.objects.get(path)
        if obj is None:
            obj = self.objects[path] = cls(values)
            self.bus.export(path, obj)
            return
        changed = obj.update(values)
        if changed:
            obj.emit_properties_changed(changed)

    def _drop(self, path: str) -> None:
        obj = self.objects.pop(path, None)
        self._shown.pop(path, None)
        self._pool_of_path.pop(path, None)
        self._volume_of_path.pop(path, None)
        if obj is not None:
            self.bus.unexport(path, obj)

    def _on_device(self, kind: ChangeKind, before: DeviceView | None,
                   after: DeviceView | None) -> None:
        """A pool's device changed (an event on the pool, a volume's device
        made or removed): refresh that pool, unless its own operation is
        running (it settles at its end)."""
        view = after or before
        if view is None or "-" not in view.name:
            return
        pool = view.name.split("-", 1)[0]
        if pool in self._paths_of_pool and self.pools.locks.busy(pool):
            self._touched.setdefault(pool, set()).add(view.name)
        elif pool in self._paths_of_pool:
            refresher = self._refreshers.get(pool)
            if refresher is None:
                refresher = self._refreshers[pool] = Coalesced(
                    lambda: self._quiet_refresh(pool), f"pool {pool} refresh")
            refresher.request()

    async def _quiet_refresh(self, pool: str) -> None:
        try:
            await self.refresh(pool)
        except Exception:
            log.exception("pool %s: refresh failed", pool)

    async def _usage_timer(self) -> None:
        while True:
            await asyncio.sleep(USAGE_INTERVAL)
            for pool in list(self._paths_of_pool):
                if not self.pools.locks.busy(pool):
                    await self._quiet_refresh(pool)

    # -- jobs --------------------------------------------------------------------
    def _subject_path(self, subject: Any) -> str:
        if isinstance(subject, VolumeRecord):
            return volume_path(subject.uuid)
        if isinstance(subject, PoolRecord):
            return pool_path(subject.uuid)
        return NO_OBJECT

    def _job_values(self, job: Job) -> dict[str, Any]:
        subject = self._subject_path(job.subject)
        result = self._subject_path(job.result) if job.result is not None else NO_OBJECT
        if result not in self.objects:
            result = NO_OBJECT  # a deleted volume, a destroyed pool
        return job_properties(job, [subject] if subject != NO_OBJECT else [], result)

    def _on_job(self, job: Job, event: JobEvent) -> None:
        path = job_path(job.id)
        due = self._progress_due.pop(path, None)
        if due is not None:
            due.cancel()
        if event is JobEvent.FORGOTTEN:
            self._job_published.pop(path, None)
            self._drop(path)
            return
        loop = asyncio.get_running_loop()
        if event is JobEvent.PROGRESS:
            wait = self._job_published.get(path, 0.0) + PROGRESS_INTERVAL - loop.time()
            if wait > 0:
                # Published with the job's next event, or once the interval is over.
                self._progress_due[path] = loop.call_later(
                    wait, self._on_job, job, JobEvent.PROGRESS)
                return
        self._job_published[path] = loop.time()
        self._put(path, JobInterface, self._job_values(job))
        if event is JobEvent.FINISHED:
            obj = self.objects[path]
            assert isinstance(obj, JobInterface)
            obj.Completed(job.state.value == "completed", job.error_name, job.error_message)
