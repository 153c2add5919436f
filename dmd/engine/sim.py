"""SimDM: the DM interface without a kernel.

A model of the kernel's device-mapper core good enough for a daemon and its
clients to be developed and tested on a machine without device-mapper or
root: active and inactive tables, suspend state, read-only tables, event
numbers, name/UUID uniqueness, rename, lowest-free minor allocation, devices
held open by the tables of other devices, deferred remove, and the errno the
kernel returns for each mistake. The conformance suite in
tests/engine/test_conformance.py runs unchanged against SimDM and against the
real kernel in the lab; where they differ, the kernel is right and this file
is fixed.

Given a path, the simulated "kernel" lives in that file (JSON, replaced
atomically after each change and re-read when another process changed it),
so devices outlive the daemon as they do on a real machine; deleting the file
is a reboot. Backing disks are declared with ``add_disk``.

Thin pools are modelled as far as a pool manager needs them: a pool's
metadata (its transaction id and thin ids) lives where the kernel keeps it,
on the metadata device's backing disk, so it outlives the pool's devices and
a wipe of the metadata's first block makes a new pool; the pool's messages
(create_thin, create_snap, delete, set_transaction_id) with the kernel's
errno for each mistake; thin tables that must name an existing thin id; the
status lines of both targets. Blocks are never used up: no I/O is modelled.

Not modelled: I/O, target status beyond striped, thin-pool and thin,
messages to other targets (they fail with EINVAL, like a target without a
message handler), and target-specific parameter checks beyond linear,
striped, zero, error, thin-pool and thin.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import json
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmd.engine import luks
from dmd.engine.blockdev import (
    PROBE_BYTES,
    BlockDevice,
    DiskSurvey,
    NotABlockDevice,
    probe_signature,
)
from dmd.engine.keys import carries_key
from dmd.engine.thintools import MetadataCheck, ThinToolError
from dmd.engine.types import (
    Device,
    DeviceInfo,
    DevId,
    DmError,
    DmFlags,
    InvalidArgument,
    TargetLine,
    TargetVersion,
    UnsafeOperation,
    validate_flags,
    validate_name,
    validate_table,
    validate_uuid,
)
from dmd.engine.udevsync import UdevWait

SIM_MAJOR = 253
SIM_CLEAN_RATE = 2000  # dirty cache blocks written back a second
SIM_VERSION = (4, 47, 0)
# What Debian's 6.1 kernel lists with every dm module loaded.
SIM_TARGETS: dict[str, tuple[int, int, int]] = {
    "linear": (1, 4, 0), "striped": (1, 6, 0), "zero": (1, 2, 0), "error": (1, 6, 0),
    "crypt": (1, 24, 0), "delay": (1, 3, 0), "flakey": (1, 5, 0), "snapshot": (1, 16, 0),
    "snapshot-origin": (1, 9, 0), "snapshot-merge": (1, 5, 0), "thin-pool": (1, 23, 0),
    "thin": (1, 23, 0), "cache": (2, 2, 0), "era": (1, 0, 0), "mirror": (1, 14, 0),
    "raid": (1, 15, 1), "multipath": (1, 14, 0), "verity": (1, 8, 1),
    "integrity": (1, 10, 0), "log-writes": (1, 1, 0), "writecache": (1, 6, 0),
    "dust": (1, 0, 0),
}


_DEVICE_REF = re.compile(r"^(\d+):(\d+)$")


def _table_refs(table: list[list[object]] | None) -> list[tuple[int, int]]:
    """The major:minor references in a stored table (device paths were
    turned into major:minor when it was loaded, as the kernel prints them)."""
    refs: list[tuple[int, int]] = []
    for line in table or []:
        for token in str(line[3]).split():
            m = _DEVICE_REF.match(token)
            if m and (ref := (int(m[1]), int(m[2]))) not in refs:
                refs.append(ref)
    return refs


@dataclass
class _Dev:
    name: str
    uuid: str
    minor: int
    live: list[list[object]] | None = None
    inactive: list[list[object]] | None = None
    live_ro: bool = False
    inactive_ro: bool = False
    suspended: bool = False
    event_nr: int = 0
    external_opens: int = 0
    deferred_remove: bool = False
    size_sectors: int = 0
    # A cache target's dirty blocks (set by set_cache_dirty: no I/O is
    # modelled), written back at SIM_CLEAN_RATE a second from cleaning_since
    # while a cleaner table is live; lost_dirty counts those a table swap
    # away from the cache threw away (the kernel would lose those writes).
    cache_dirty: int = 0
    cleaning_since: float = 0.0
    lost_dirty: int = 0
    flush_on_suspend: bool = False  # a writecache asked to write back at its suspend

    def __setattr__(self, attr: str, value: object) -> None:
        owner: _Devices | None = self.__dict__.get("_owner")
        if owner is None:
            object.__setattr__(self, attr, value)
        else:
            owner.changing(self, attr, value)

    def record(self) -> dict[str, object]:
        return {f: self.__dict__[f] for f in _DEV_FIELDS}


_DEV_FIELDS = tuple(f.name for f in fields(_Dev))


class _Devices(dict[str, _Dev]):
    """The devices by name, with what every write needs kept up to date as
    they change (so no call costs O(number of devices)): which names changed
    since the last save, the minors and UUIDs in use, how many tables refer
    to each device, and which devices wait for a deferred remove."""

    def __init__(self) -> None:
        super().__init__()
        self.dirty: set[str] = set()
        self.minors: set[int] = set()
        self._free_minors: list[int] = []  # a heap; may hold minors taken since
        self._next_minor = 0
        self.uuids: dict[str, str] = {}
        self.refs: dict[tuple[int, int], int] = {}
        self.deferred: set[str] = set()

    def __setitem__(self, name: str, dev: _Dev) -> None:
        assert name == dev.name and name not in self
        super().__setitem__(name, dev)
        object.__setattr__(dev, "_owner", self)
        self.dirty.add(name)
        self.minors.add(dev.minor)
        if dev.uuid:
            self.uuids[dev.uuid] = name
        for table in (dev.live, dev.inactive):
            self._count(table, dev, 1)
        if dev.deferred_remove:
            self.deferred.add(name)

    def __delitem__(self, name: str) -> None:
        dev = self[name]
        super().__delitem__(name)
        object.__setattr__(dev, "_owner", None)
        self.dirty.add(name)
        self.minors.discard(dev.minor)
        heapq.heappush(self._free_minors, dev.minor)
        self.uuids.pop(dev.uuid, None)
        for table in (dev.live, dev.inactive):
            self._count(table, dev, -1)
        self.deferred.discard(name)

    def changing(self, dev: _Dev, attr: str, value: object) -> None:
        assert attr not in ("name", "minor"), "re-key the device instead"
        if attr in ("live", "inactive"):
            self._count(getattr(dev, attr), dev, -1)
            self._count(value, dev, 1)  # type: ignore[arg-type]
        elif attr == "uuid":
            self.uuids.pop(dev.uuid, None)
            if value:
                self.uuids[str(value)] = dev.name
        elif attr == "deferred_remove":
            (self.deferred.add if value else self.deferred.discard)(dev.name)
        object.__setattr__(dev, attr, value)
        self.dirty.add(dev.name)

    def _count(self, table: list[list[object]] | None, dev: _Dev, delta: int) -> None:
        for ref in _table_refs(table):
            if ref != (SIM_MAJOR, dev.minor):
                self.refs[ref] = self.refs.get(ref, 0) + delta

    def lowest_free_minor(self) -> int:
        """The kernel's idr_alloc: the lowest minor not in use. Every minor
        below _next_minor that is free was freed, so it is in the heap."""
        while self._free_minors and self._free_minors[0] in self.minors:
            heapq.heappop(self._free_minors)
        while self._next_minor in self.minors:
            self._next_minor += 1
        if self._free_minors:
            return min(self._free_minors[0], self._next_minor)
        return self._next_minor


@dataclass
class _Kernel:
    devices: _Devices = field(default_factory=_Devices)
    # path -> [major, minor, size in sectors, signature or None]
    disks: dict[str, list[Any]] = field(default_factory=dict)
    dirty_disks: set[str] = field(default_factory=set)
    # Thin pools' metadata, by where it lives ("major:minor+offset" of the
    # disk under the metadata device): {"tid": int, "thins": [ids], "maps":
    # {thin id: {block: data block}}, "refs": {data block: how many thins map
    # it}, "free": [data blocks freed], "next": first never-used data block,
    # "low": the low water event was raised since the last resume}. JSON
    # keys are strings.
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    dirty_pools: set[str] = field(default_factory=set)

    def clean(self) -> None:
        self.devices.dirty.clear()
        self.dirty_disks.clear()
        self.dirty_pools.clear()


MAX_THIN_ID = (1 << 24) - 1


class _DiskBytes:
    """Sparse bytes of simulated disks, by key: files in *directory*, or a
    dict of 4 KiB blocks when there is none. Unwritten bytes read as zeros."""

    BLOCK = 4096

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.blocks: dict[str, dict[int, bytes]] = {}

    def read(self, key: str, offset: int, length: int) -> bytes:
        if self.directory is not None:
            try:
                with open(self.directory / key, "rb") as f:
                    f.seek(offset)
                    return f.read(length).ljust(length, b"\0")
            except FileNotFoundError:
                return bytes(length)
        blocks, out = self.blocks.get(key, {}), bytearray()
        for index in range(offset // self.BLOCK, -(-(offset + length) // self.BLOCK)):
            out += blocks.get(index, bytes(self.BLOCK))
        skip = offset % self.BLOCK
        return bytes(out[skip:skip + length])

    def rename(self, old: str, new: str) -> None:
        if self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.directory / old, self.directory / new)
        elif old in self.blocks:
            self.blocks[new] = self.blocks.pop(old)

    def write(self, key: str, offset: int, data: bytes) -> None:
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
            return
        first, end = offset // self.BLOCK, -(-(offset + len(data)) // self.BLOCK)
        span = bytearray(self.read(key, first * self.BLOCK, (end - first) * self.BLOCK))
        at = offset - first * self.BLOCK
        span[at:at + len(data)] = data
        blocks = self.blocks.setdefault(key, {})
        for index in range(first, end):
            chunk = bytes(span[(index - first) * self.BLOCK:(index - first + 1) * self.BLOCK])
            if chunk.strip(b"\0"):
                blocks[index] = chunk
            else:
                blocks.pop(index, None)


def _fail(err: int, command: str, dev: object = None) -> DmError:
    return DmError(err, command, str(dev) if dev is not None else None)


class SimDM:
    """Drop-in replacement for ``dmd.engine.DM`` backed by a model."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 flush_delay: float = 0.0) -> None:
        self.path = Path(path) if path is not None else None
        # How long a suspend that flushes takes: on a real machine it waits
        # for in-flight I/O, which is what makes reads-behind-writes matter.
        self.flush_delay = flush_delay
        self._lock = threading.RLock()
        self._state = _Kernel()
        # Where this process has read the file up to: (st_dev, st_ino), the
        # offset after the last complete line, and the lines since the snapshot.
        self._file_id: tuple[int, int] | None = None
        self._offset = 0
        self._log_lines = 0
        self._changed = threading.Condition(self._lock)
        self.ioctl_count = 0
        # Same guard as DM against the clear-rename-remove kernel bug, so a
        # daemon behaves identically on the simulator.
        self._cleared: set[int] = set()
        # DM's global event: set by the calls that raise it, sent when the
        # call's changes are saved (see open_events).
        self._event_raised = False
        self._event_sources: list[_SimEvents] = []
        self._memfds: dict[str, int] = {}
        self._disk_bytes = _DiskBytes(
            self.path.with_name(self.path.name + ".disks") if self.path is not None else None)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                pass

    # -- persistence -------------------------------------------------------
    # The file is JSON lines: a snapshot of the whole kernel ({"devices": ...,
    # "disks": ...}), then one line per device or disk that changed after it
    # ({"dev": name, "v": fields or null}, {"disk": path, "v": [...] or null}).
    # A write appends the lines of what it changed, under an exclusive flock;
    # every call first reads what other processes appended since its last
    # call. When the log outgrows the kernel it describes, a write replaces
    # the file with a new snapshot (atomically; readers see a new inode and
    # read it whole). So a change costs what it changed, not the whole kernel.
    @contextlib.contextmanager
    def _locked(self, write: bool = False) -> Iterator[_Kernel]:
        with self._lock:
            self.ioctl_count += 1
            if self.path is None:
                try:
                    yield self._state
                finally:
                    if write:
                        self._reap_deferred(self._state)
                        self._state.clean()
                        self._send_event()
                        self._changed.notify_all()
                return
            lock_path = self.path.with_name(self.path.name + ".lock")
            with open(lock_path, "a+") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
                self._catch_up()
                try:
                    yield self._state
                finally:
                    # Also after an error: a refused call may have changed
                    # nothing, or (as the kernel's failed resume) something.
                    if write:
                        self._reap_deferred(self._state)
                        self._append_changes()
                        self._send_event()
                        self._changed.notify_all()

    def _reap_deferred(self, k: _Kernel) -> None:
        """Finish deferred removes whose last opener went away (the kernel's
        dm_deferred_remove work)."""
        progress = True
        while progress:
            progress = False
            for name in list(k.devices.deferred):
                dev = k.devices[name]
                if self._open_count(k, dev) == 0:
                    del k.devices[name]
                    self._event_raised = True
                    progress = True

    # -- DM's global event -------------------------------------------------
    # In memory, each event source is a pipe this object writes to. With a
    # file, the event travels through a FIFO beside it (FILE.events), so a
    # change made by another process (another tool, in tests) wakes dmd as
    # the kernel's event would.
    def open_events(self) -> _SimEvents:
        with self._lock:
            source = _SimEvents(self._fifo())
            if self.path is None:
                self._event_sources.append(source)
            return source

    def _fifo(self) -> Path | None:
        return None if self.path is None else self.path.with_name(self.path.name + ".events")

    def _send_event(self) -> None:
        if not self._event_raised:
            return
        self._event_raised = False
        fifo = self._fifo()
        if fifo is None:
            for source in self._event_sources:
                source.notify()
            return
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # no FIFO, or nobody listening (ENXIO): nobody to tell
            return
        try:
            os.write(fd, b"!")
        except BlockingIOError:
            pass  # full: an event is pending already
        finally:
            os.close(fd)

    def _catch_up(self) -> None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:  # never written, or a "reboot"
            if self._file_id is not None or self._state.devices or self._state.disks \
                    or self._state.pools:
                self._state = _Kernel()
            self._file_id, self._offset, self._log_lines = None, 0, 0
            return
        file_id = (st.st_dev, st.st_ino)
        if file_id != self._file_id or st.st_size < self._offset:
            self._state, self._offset, self._log_lines = _Kernel(), 0, -1
            self._file_id = file_id
        if st.st_size == self._offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        # A writer killed mid-line leaves a torn last line: it is not part of
        # the kernel, and the next writer cuts it off.
        complete = data[:data.rfind(b"\n") + 1]
        for line in complete.splitlines():
            self._apply(json.loads(line))
        self._offset += len(complete)
        self._state.clean()

    def _apply(self, change: dict[str, Any]) -> None:
        k = self._state
        self._log_lines += 1
        if "devices" in change:  # a snapshot
            self._state = k = _Kernel()
            for name, fields_ in change["devices"].items():
                k.devices[name] = _Dev(**fields_)
            k.disks = {path: list(v) for path, v in change["disks"].items()}
            k.pools = dict(change.get("pools", {}))
            self._log_lines = 0
        elif "dev" in change:
            name = change["dev"]
            if name in k.devices:
                del k.devices[name]
            if change["v"] is not None:
                k.devices[name] = _Dev(**change["v"])
        elif "disk" in change:
            if change["v"] is None:
                k.disks.pop(change["disk"], None)
            else:
                k.disks[change["disk"]] = list(change["v"])
        elif "pool" in change:
            if change["v"] is None:
                k.pools.pop(change["pool"], None)
            else:
                k.pools[change["pool"]] = change["v"]

    def _append_changes(self) -> None:
        assert self.path is not None
        k = self._state
        if not k.devices.dirty and not k.dirty_disks and not k.dirty_pools:
            return
        if self._file_id is None or self._log_lines > max(1024, 2 * len(k.devices)):
            self._save()
            return
        lines: list[dict[str, Any]] = [
            {"dev": name, "v": k.devices[name].record() if name in k.devices else None}
            for name in sorted(k.devices.dirty)]
        lines += [{"disk": path, "v": k.disks.get(path)} for path in sorted(k.dirty_disks)]
        lines += [{"pool": key, "v": k.pools.get(key)} for key in sorted(k.dirty_pools)]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        with open(self.path, "r+b") as f:
            f.truncate(self._offset)  # a torn line of a killed writer, if any
            f.seek(self._offset)
            f.write(data)
        self._offset += len(data)
        self._log_lines += len(lines)
        k.clean()

    def save_as(self, path: Path) -> None:
        """Write a kernel filled in memory to *path* at once (a benchmark's
        thousand devices), and keep it there from now on."""
        self.path = path
        self._save()

    def _save(self) -> None:
        """Replace the file with a snapshot of the whole kernel."""
        assert self.path is not None
        k = self._state
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = (json.dumps({"devices": {name: dev.record() for name, dev in k.devices.items()},
                            "disks": k.disks, "pools": k.pools}) + "\n").encode()
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        st = os.stat(self.path)
        self._file_id, self._offset, self._log_lines = (st.st_dev, st.st_ino), len(data), 0
        k.clean()

    def snapshot(self) -> dict[str, Any]:
        """The whole simulated kernel as plain data (what a snapshot line holds)."""
        with self._locked() as k:
            return {"devices": {name: dev.record() for name, dev in sorted(k.devices.items())},
                    "disks": dict(k.disks), "pools": dict(k.pools)}

    # -- test hooks (no kernel counterpart) --------------------------------
    def add_disk(self, path: str, major: int, minor: int, size_sectors: int,
                 signature: str | None = None) -> None:
        """Declare a backing block device that tables may reference;
        *signature*: what a probe of its first blocks finds ("ext4", ...)."""
        with self._locked(write=True) as k:
            k.disks[path] = [major, minor, size_sectors, signature]
            k.dirty_disks.add(path)

    def move_disk(self, path: str, new_path: str, minor: int) -> None:
        """The disk at *path* comes back as *new_path* with another minor
        (a reboot renumbering loop devices, a disk moved to another port):
        its bytes and any pool metadata on it go with it. Refused (EBUSY)
        while a table maps it."""
        with self._locked(write=True) as k:
            if path not in k.disks or new_path in k.disks:
                raise _fail(errno.ENOENT if path not in k.disks else errno.EEXIST, "move",
                            path)
            major, old_minor = k.disks[path][:2]
            if k.devices.refs.get((major, old_minor), 0):
                raise _fail(errno.EBUSY, "move", path)
            old_key = self._disk_key(k, path)
            k.disks[new_path] = [major, minor, *k.disks.pop(path)[2:]]
            k.dirty_disks.update((path, new_path))
            self._disk_bytes.rename(old_key, self._disk_key(k, new_path))
            prefix = f"{major}:{old_minor}+"
            for key in [key for key in k.pools if key.startswith(prefix)]:
                moved = f"{major}:{minor}+{key.removeprefix(prefix)}"
                k.pools[moved] = k.pools.pop(key)
                k.dirty_pools.update((key, moved))

    def open_device(self, id: DevId | str, count: int = 1) -> None:
        """Pretend a process opened (count > 0) or closed (count < 0) the device."""
        with self._locked(write=True) as k:
            dev = self._find(k, id, "open")
            dev.external_opens = max(0, dev.external_opens + count)

    def trigger_event(self, id: DevId | str) -> None:
        """Raise the device's event number, as a target reporting an event does."""
        with self._locked(write=True) as k:
            self._find(k, id, "event").event_nr += 1
            self._event_raised = True

    # -- lifecycle, as DM --------------------------------------------------
    def close(self) -> None:
        with self._lock:
            for fd in self._memfds.values():
                os.close(fd)
            self._memfds.clear()

    def __enter__(self) -> SimDM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------
    @staticmethod
    def _find(k: _Kernel, id: DevId | str, command: str) -> _Dev:
        dev = id if isinstance(id, DevId) else DevId.name(id)
        if dev.is_uuid:
            if dev.value in k.devices.uuids:
                return k.devices[k.devices.uuids[dev.value]]
        elif dev.value in k.devices:
            return k.devices[dev.value]
        raise _fail(errno.ENXIO, command, dev)

    def _resolve(self, k: _Kernel, ref: str) -> tuple[tuple[int, int], int] | None:
        """A device reference in params -> ((major, minor), size) or None."""
        if ref in k.disks:
            major, minor, size = k.disks[ref][:3]
            return (major, minor), size
        candidates: list[tuple[str | None, str | None]] = [(ref, None)]
        if ref.startswith("/dev/mapper/"):
            candidates = [(None, ref.removeprefix("/dev/mapper/"))]
        elif ref.startswith("/dev/dm-") and ref[8:].isdigit():
            candidates = [(f"{SIM_MAJOR}:{ref[8:]}", None)]
        for numeric, name in candidates:
            if name is not None and name in k.devices:
                d = k.devices[name]
                return (SIM_MAJOR, d.minor), d.size_sectors
            if numeric is not None and ":" in numeric:
                major_s, _, minor_s = numeric.partition(":")
                if not (major_s.isdigit() and minor_s.isdigit()):
                    return None
                major, minor = int(major_s), int(minor_s)
                for d in k.devices.values():
                    if major == SIM_MAJOR and d.minor == minor:
                        return (major, minor), d.size_sectors
                for dmaj, dmin, size, *_ in k.disks.values():
                    if (dmaj, dmin) == (major, minor):
                        return (major, minor), size
        return None

    def _deps(self, k: _Kernel, table: list[list[object]] | None) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        for line in table or []:
            for token in str(line[3]).split():
                hit = self._resolve(k, token) if ("/" in token or ":" in token) else None
                if hit and hit[0] not in found:
                    found.append(hit[0])
        return found

    @staticmethod
    def _open_count(k: _Kernel, dev: _Dev) -> int:
        return k.devices.refs.get((SIM_MAJOR, dev.minor), 0) + dev.external_opens

    def _info(self, k: _Kernel, dev: _Dev, extra: DmFlags = DmFlags(0),
              inactive: bool = False) -> DeviceInfo:
        flags = extra
        if dev.suspended:
            flags |= DmFlags.DM_SUSPEND
        if dev.live is not None:
            flags |= DmFlags.DM_ACTIVE_PRESENT
        if dev.inactive is not None:
            flags |= DmFlags.DM_INACTIVE_PRESENT
        if dev.deferred_remove:
            flags |= DmFlags.DM_DEFERRED_REMOVE
        table = dev.inactive if inactive else dev.live
        if (dev.inactive_ro if inactive else dev.live_ro) and table is not None:
            flags |= DmFlags.DM_READONLY
        return DeviceInfo(
            name=dev.name, uuid=dev.uuid, device=(SIM_MAJOR, dev.minor),
            open_count=self._open_count(k, dev), event_nr=dev.event_nr, flags=flags,
            target_count=len(table) if table is not None else 0, version=SIM_VERSION,
        )

    def _check_params(self, k: _Kernel, lines: list[TargetLine], dev: DevId) -> None:
        for line in lines:
            args = line.params.split()
            ok = line.target_type in SIM_TARGETS
            if line.target_type == "zero":
                ok = not args
            elif line.target_type == "linear":
                ok = len(args) == 2 and args[1].isdigit() and self._resolve(k, args[0]) is not None
            elif line.target_type == "striped":
                ok = self._striped_ok(k, args, line.length)
            elif line.target_type == "thin-pool":
                ok = self._pool_params_ok(k, args)
                # pool_ctr: a superblock overwritten fails sb_check (its
                # block number is not where it lies)
                damage = k.pools.get(self._backing(k, args[0]) or "", {}).get("damage", {})
                if ok and damage.get("superblock"):
                    raise _fail(errno.ENOTBLK, "DM_TABLE_LOAD", dev)
            elif line.target_type == "thin":
                self._check_thin(k, args, dev)
            if not ok:
                raise _fail(errno.EINVAL, "DM_TABLE_LOAD", dev)

    # -- thin pools ----------------------------------------------------------
    def _backing(self, k: _Kernel, ref: str, offset: int = 0) -> str | None:
        """Where the first sector of device *ref* lives: "major:minor+offset"
        of a disk, following linear tables down (the pool's metadata lives
        there, not in the dm device, which may come and go)."""
        hit = self._resolve(k, ref)
        if hit is None:
            return None
        (major, minor), _ = hit
        if major == SIM_MAJOR:
            dev = next((d for d in k.devices.values() if d.minor == minor), None)
            table = dev.live if dev is not None else None
            if table and table[0][2] == "linear" and int(str(table[0][0])) == 0:
                target, start = str(table[0][3]).split()
                return self._backing(k, target, offset + int(start))
        return f"{major}:{minor}+{offset}"

    def _pool_params_ok(self, k: _Kernel, args: list[str]) -> bool:
        if len(args) < 4 or not all(a.isdigit() for a in args[2:4]):
            return False
        block = int(args[2])
        if not (128 <= block <= 2 * 1024 * 1024 and block % 128 == 0):
            return False
        return all(self._resolve(k, ref) is not None for ref in args[:2])

    def _pool_key(self, k: _Kernel, table: list[list[object]] | None) -> str | None:
        """The metadata key of the pool a thin-pool table drives."""
        if not table or len(table) != 1 or table[0][2] != "thin-pool":
            return None
        return self._backing(k, str(table[0][3]).split()[0])

    def _pool_of(self, k: _Kernel, ref: str) -> tuple[str, dict[str, Any]] | None:
        """The pool whose device *ref* is (its live or loaded thin-pool table)."""
        hit = self._resolve(k, ref)
        if hit is None or hit[0][0] != SIM_MAJOR:
            return None
        dev = next((d for d in k.devices.values() if d.minor == hit[0][1]), None)
        for table in (dev.live, dev.inactive) if dev is not None else ():
            key = self._pool_key(k, table)
            if key is not None and key in k.pools:
                return key, k.pools[key]
        return None

    def _check_thin(self, k: _Kernel, args: list[str], dev: DevId) -> None:
        if len(args) not in (2, 3) or not args[1].isdigit():
            raise _fail(errno.EINVAL, "DM_TABLE_LOAD", dev)
        pool = self._pool_of(k, args[0])
        if pool is None:
            raise _fail(errno.EINVAL, "DM_TABLE_LOAD", dev)
        if int(args[1]) not in pool[1]["thins"]:
            raise _fail(errno.ENODATA, "DM_TABLE_LOAD", dev)  # __open_device

    def _pool_size_fits(self, k: _Kernel, table: list[list[object]]) -> bool:
        """A thin-pool table going live: its data no smaller than the
        metadata says the pool has (which it then takes, if larger)."""
        key = self._pool_key(k, table)
        if key is None or key not in k.pools:
            return True
        blocks = int(str(table[0][1])) // int(str(table[0][3]).split()[2])
        pool = k.pools[key]
        if blocks < pool.get("blocks", 0):
            return False
        if blocks != pool.get("blocks"):
            k.pools[key] = dict(pool, blocks=blocks)
            k.dirty_pools.add(key)
        return True

    def _open_pool(self, k: _Kernel, table: list[list[object]]) -> None:
        """pool_ctr: a metadata device whose first block is zero is formatted."""
        key = self._pool_key(k, table)
        if key is not None and key not in k.pools:
            k.pools[key] = _new_pool()
            k.dirty_pools.add(key)

    def _thin_opens(self, k: _Kernel, minor: int, thin_id: int) -> int:
        """How many loaded tables (live or not) hold thin *thin_id* of the pool
        device *minor* open: the kernel refuses to delete such a thin."""
        count = 0
        for dev in k.devices.values():
            for table in (dev.live, dev.inactive):
                for line in table or []:
                    if line[2] == "thin":
                        pool_ref, ident = str(line[3]).split()[:2]
                        if pool_ref == f"{SIM_MAJOR}:{minor}" and int(ident) == thin_id:
                            count += 1
        return count

    def _pool_message(self, k: _Kernel, dev: _Dev, message: str) -> None:
        """pool_message in dm-thin.c; each message commits on its own."""
        key = self._pool_key(k, dev.live)
        if key is None or key not in k.pools:
            raise _fail(errno.EINVAL, "DM_TARGET_MSG", dev.name)
        pool = k.pools[key]
        words = message.split()
        def ident(word: str) -> int:
            if not word.isdigit() or int(word) > MAX_THIN_ID:
                raise _fail(errno.EINVAL, "DM_TARGET_MSG", dev.name)
            return int(word)
        pool = _copy_pool(pool)
        thins: list[int] = pool["thins"]
        maps: dict[str, dict[str, int]] = pool["maps"]
        refs: dict[str, int] = pool["refs"]
        if words[0] == "create_thin" and len(words) == 2:
            new = ident(words[1])
            if new in thins:
                raise _fail(errno.EEXIST, "DM_TARGET_MSG", dev.name)
            thins.append(new)
            maps[str(new)] = {}
        elif words[0] == "create_snap" and len(words) == 3:
            new, origin = ident(words[1]), ident(words[2])
            if new in thins:
                raise _fail(errno.EEXIST, "DM_TARGET_MSG", dev.name)
            if origin not in thins:
                raise _fail(errno.ENODATA, "DM_TARGET_MSG", dev.name)
            thins.append(new)
            maps[str(new)] = dict(maps.get(str(origin), {}))  # shares every block
            for block in maps[str(new)].values():
                refs[str(block)] += 1
        elif words[0] == "delete" and len(words) == 2:
            gone = ident(words[1])
            if gone not in thins:
                raise _fail(errno.ENODATA, "DM_TARGET_MSG", dev.name)
            if self._thin_opens(k, dev.minor, gone):
                raise _fail(errno.EBUSY, "DM_TARGET_MSG", dev.name)
            thins.remove(gone)
            for block in maps.pop(str(gone), {}).values():
                _unref(pool, block)
        elif words[0] == "set_transaction_id" and len(words) == 3 \
                and words[1].isdigit() and words[2].isdigit():
            if int(words[1]) != pool["tid"]:
                raise _fail(errno.EINVAL, "DM_TARGET_MSG", dev.name)
            pool = {**pool, "tid": int(words[2])}
        else:
            raise _fail(errno.EINVAL, "DM_TARGET_MSG", dev.name)
        k.pools[key] = {**pool, "thins": sorted(thins)}
        k.dirty_pools.add(key)

    def _pool_status(self, k: _Kernel, dev: _Dev, params: str) -> str:
        args = params.split()
        pool = k.pools.get(self._pool_key(k, dev.live) or "", _new_pool())
        meta = self._resolve(k, args[0])
        meta_blocks = min((meta[1] if meta else 0) // 8, 255 * (1 << 14))
        data_blocks = sum(int(str(line[1])) for line in dev.live or []) // int(args[2])
        features = args[5:5 + int(args[4])] if len(args) > 4 else []
        policy = "error_if_no_space" if "error_if_no_space" in features else "queue_if_no_space"
        discards = ("ignore_discard" if "ignore_discard" in features else
                    "no_discard_passdown" if "no_discard_passdown" in features
                    else "discard_passdown")
        used = len(pool["refs"])
        mode = ("ro" if "read_only" in features else
                "out_of_data_space" if used >= data_blocks else "rw")
        used_meta = 10 + len(pool["thins"]) + used // 64
        return (f"{pool['tid']} {used_meta}/{meta_blocks} {used}/{data_blocks} - {mode} "
                f"{discards} {policy} - {min(meta_blocks // 4, 1024)}")

    def _thin_status(self, k: _Kernel, params: str) -> str:
        pool_ref, ident = params.split()[:2]
        found = self._pool_of(k, pool_ref)
        mapping = found[1]["maps"].get(ident, {}) if found is not None else {}
        if not mapping:
            return "0 -"
        block = self._block_sectors(k, pool_ref)
        return f"{len(mapping) * block} {(max(map(int, mapping)) + 1) * block - 1}"

    def _block_sectors(self, k: _Kernel, pool_ref: str) -> int:
        hit = self._resolve(k, pool_ref)
        assert hit is not None
        dev = next(d for d in k.devices.values() if d.minor == hit[0][1])
        return int(str((dev.live or dev.inactive or [[0, 0, "", "0 0 128"]])[0][3]).split()[2])

    def write(self, id: DevId | str, sector: int, sectors: int) -> None:
        """Pretend a process wrote *sectors* sectors at *sector* of thin device
        *id* (the model keeps no data, only which blocks are mapped): each
        block not mapped, or shared with a snapshot, gets a data block of its
        own. A full pool fails the write with ENOSPC (``error_if_no_space``;
        the kernel would otherwise queue it for ``no_space_timeout``, then
        fail it with EIO: the model fails it with EIO at once). An allocation
        that starts with the free blocks at or below the low water mark raises
        the pool device's event, once per resume."""
        with self._locked(write=True) as k:
            dev = self._find(k, id, "write")
            if not dev.live or len(dev.live) != 1 or dev.live[0][2] != "thin":
                raise _fail(errno.EINVAL, "write", id)
            pool_ref, ident = str(dev.live[0][3]).split()[:2]
            found = self._pool_of(k, pool_ref)
            assert found is not None
            key, pool = found[0], _copy_pool(found[1])
            pool_dev = next(d for d in k.devices.values()
                            if f"{SIM_MAJOR}:{d.minor}" == pool_ref)
            assert pool_dev.live is not None
            block = self._block_sectors(k, pool_ref)
            pool_args = str(pool_dev.live[0][3]).split()
            total = int(str(pool_dev.live[0][1])) // block
            low_water = int(pool_args[3])
            features = pool_args[5:5 + int(pool_args[4])] if len(pool_args) > 4 else []
            mapping = pool["maps"].setdefault(ident, {})
            try:
                for index in range(sector // block, -(-(sector + sectors) // block)):
                    current = mapping.get(str(index))
                    if current is not None and pool["refs"][str(current)] == 1:
                        continue  # its own block: written in place
                    # alloc_data_block: the mark is checked against the free
                    # blocks before this allocation, full pool included.
                    if total - len(pool["refs"]) <= low_water and not pool["low"]:
                        pool["low"] = True
                        pool_dev.event_nr += 1
                        self._event_raised = True
                    if pool["free"]:
                        fresh = pool["free"].pop()
                    elif pool["next"] < total:
                        fresh, pool["next"] = pool["next"], pool["next"] + 1
                    else:
                        full = errno.ENOSPC if "error_if_no_space" in features else errno.EIO
                        raise OSError(full, f"thin pool {pool_dev.name} is out of data space")
                    if current is not None:
                        _unref(pool, current)
                    mapping[str(index)] = fresh
                    pool["refs"][str(fresh)] = 1
            finally:
                k.pools[key] = pool
                k.dirty_pools.add(key)

    def _rearm_low_water(self, k: _Kernel, table: list[list[object]] | None) -> None:
        """pool_resume: the low water event may fire again."""
        key = self._pool_key(k, table)
        if key is not None and key in k.pools and k.pools[key].get("low"):
            k.pools[key] = {**k.pools[key], "low": False}
            k.dirty_pools.add(key)

    # -- a thin pool's metadata (thin-provisioning-tools on a kernel) --------
    # Damage is modelled, not bytes: a pool's metadata may carry {"damage":
    # {"superblock": bool, "lost": [thin ids whose mappings are unreadable]}}
    # (damage_metadata). A damaged superblock fails the pool's table load, as
    # pool_ctr does; lost mappings load, and thin_check finds them.
    def _metadata_key(self, k: _Kernel, id: DevId | str, tool: str) -> str:
        dev = self._find(k, id, tool)
        for other in k.devices.values():  # the tools open it O_EXCL
            for line in other.live or []:
                if line[2] == "thin-pool" and str(line[3]).split()[0] == \
                        f"{SIM_MAJOR}:{dev.minor}":
                    raise ThinToolError(1, f"{tool}: {dev.name}: Device or resource busy")
        key = self._backing(k, f"/dev/mapper/{dev.name}")
        assert key is not None
        return key

    def thin_check(self, id: DevId | str) -> MetadataCheck:
        """As DM.thin_check."""
        with self._locked() as k:
            pool = k.pools.get(self._metadata_key(k, id, "thin_check"))
        damage: dict[str, Any] = (pool.get("damage", {}) if pool is not None
                                  else {"superblock": True})
        if damage.get("superblock"):
            return MetadataCheck(False, "superblock is corrupt; bad checksum in superblock")
        if damage.get("lost"):
            return MetadataCheck(False, "; ".join(
                f"thin device {t} is missing mappings [0, -]" for t in damage["lost"]))
        return MetadataCheck(True)

    def thin_repair(self, source: DevId | str, dest: DevId | str, transaction_id: int,
                    block_sectors: int, data_blocks: int) -> None:
        """As DM.thin_repair: every thin whose mappings were readable, whole;
        the figures given where the superblock was not readable."""
        with self._locked(write=True) as k:
            old = k.pools.get(self._metadata_key(k, source, "thin_repair"))
            key = self._metadata_key(k, dest, "thin_repair")
            if old is None:  # nothing of a pool to find: an empty one
                new = {**_new_pool(), "tid": transaction_id, "blocks": data_blocks}
            else:
                new = _copy_pool(old)
                damage = new.pop("damage", {})
                for lost in damage.get("lost", []):
                    if lost in new["thins"]:
                        new["thins"].remove(lost)
                        for block in new["maps"].pop(str(lost), {}).values():
                            _unref(new, block)
                if damage.get("superblock"):
                    new["tid"] = transaction_id
            k.pools[key] = new
            k.dirty_pools.add(key)

    def thin_ids(self, id: DevId | str) -> list[int]:
        """As DM.thin_ids."""
        with self._locked() as k:
            pool = k.pools.get(self._metadata_key(k, id, "thin_ls"))
        if pool is None or pool.get("damage", {}).get("superblock"):
            raise ThinToolError(1, "bad checksum in superblock")
        return sorted(pool["thins"])

    def damage_metadata(self, path: str, offset: int, *, superblock: bool = False,
                        lost: Sequence[int] = ()) -> None:
        """For tests: the pool metadata at byte *offset* of disk *path* gets
        a damaged superblock, or the mappings of thins *lost* unreadable (as
        a block overwritten while the pool is down)."""
        with self._locked(write=True) as k:
            key = self._backing(k, path, offset // 512)
            if key is None or key not in k.pools:
                raise _fail(errno.ENOENT, "damage_metadata", path)
            k.pools[key] = {**k.pools[key], "damage": {"superblock": superblock,
                                                       "lost": sorted(lost)}}
            k.dirty_pools.add(key)

    def wipe(self, path: str, offset: int, length: int) -> None:
        """As DM.wipe: pool metadata that started there is gone, and so are
        the bytes written there (and a signature a test gave the disk at 0)."""
        with self._locked(write=True) as k:
            key = self._backing(k, path, offset // 512)
            if key is None:
                raise _fail(errno.ENOENT, "wipe", path)
            if key in k.pools:
                del k.pools[key]
                k.dirty_pools.add(key)
            if path in k.disks:
                self._disk_bytes.write(self._disk_key(k, path), offset, bytes(length))
                if offset == 0 and (k.disks[path] + [None])[3] is not None:
                    k.disks[path] = [*k.disks[path][:3], None]
                    k.dirty_disks.add(path)

    # A disk's bytes (what dmd itself writes there: a pool's label and
    # description) live beside the model, one sparse file a disk, so every
    # process sharing the simulator reads what another wrote; in memory for
    # an in-memory simulator. The thin model keeps its own record of data.
    def _disk_key(self, k: _Kernel, path: str) -> str:
        major, minor = k.disks[path][:2]
        return f"{major}_{minor}"

    def _disk_size(self, k: _Kernel, path: str) -> int:
        if path not in k.disks:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return int(k.disks[path][2]) * 512

    def read_disk(self, path: str, offset: int, length: int) -> bytes:
        """As DM.read_disk."""
        with self._locked() as k:
            length = max(0, min(length, self._disk_size(k, path) - offset))
            return self._disk_bytes.read(self._disk_key(k, path), offset, length)

    def write_disk(self, path: str, offset: int, data: bytes) -> None:
        """As DM.write_disk."""
        with self._locked(write=True) as k:
            if offset + len(data) > self._disk_size(k, path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            self._disk_bytes.write(self._disk_key(k, path), offset, data)

    def _areas_fit(self, k: _Kernel, table: list[list[object]]) -> bool:
        """The kernel's device_area_is_invalid, run when a table is swapped in."""
        for _start, length, ttype, params in table:
            args = str(params).split()
            if ttype == "linear" and not self._fits(k, args[0], int(args[1]), int(str(length))):
                return False
            if ttype == "thin-pool" and not self._fits(k, args[1], 0, int(str(length))):
                return False
            if ttype == "striped":
                stripes = int(args[0])
                per_stripe = int(str(length)) // stripes
                if not all(self._fits(k, ref, int(off), per_stripe)
                           for ref, off in zip(args[2::2], args[3::2], strict=True)):
                    return False
        return True

    def _fits(self, k: _Kernel, ref: str, offset: int, length: int) -> bool:
        hit = self._resolve(k, ref)
        return hit is not None and offset + length <= hit[1]

    def _striped_ok(self, k: _Kernel, args: list[str], length: int) -> bool:
        if len(args) < 4 or not args[0].isdigit() or not args[1].isdigit():
            return False
        stripes, chunk = int(args[0]), int(args[1])
        if stripes < 1 or len(args) != 2 + 2 * stripes:
            return False
        if chunk < 8 or chunk & (chunk - 1) or length % stripes or (length // stripes) % chunk:
            return False
        pairs = zip(args[2::2], args[3::2], strict=True)
        return all(off.isdigit() and self._resolve(k, ref) is not None for ref, off in pairs)

    def _normalize(self, k: _Kernel, params: str) -> str:
        """Print device references as the kernel does: major:minor."""
        out = []
        for token in params.split():
            hit = self._resolve(k, token) if token.startswith("/dev/") else None
            out.append(f"{hit[0][0]}:{hit[0][1]}" if hit else token)
        return " ".join(out)

    # -- global commands ---------------------------------------------------
    def version(self) -> tuple[int, int, int]:
        return SIM_VERSION

    def remove_all(self, flags: DmFlags = DmFlags(0)) -> DeviceInfo:
        flags = validate_flags(flags, DmFlags.DM_DEFERRED_REMOVE)
        with self._locked(write=True) as k:
            progress = True
            while progress:
                progress = False
                for dev in list(k.devices.values()):
                    if self._open_count(k, dev) == 0:
                        del k.devices[dev.name]
                        self._event_raised = True
                        progress = True
                    elif flags & DmFlags.DM_DEFERRED_REMOVE:
                        dev.deferred_remove = True
        return DeviceInfo("", "", (0, 0), 0, 0, DmFlags(0), 0, SIM_VERSION)

    def list_devices(self) -> list[Device]:
        with self._locked() as k:
            return [Device(d.name, (SIM_MAJOR, d.minor), d.event_nr, d.uuid)
                    for d in sorted(k.devices.values(), key=lambda d: d.name)]

    def list_versions(self) -> list[TargetVersion]:
        return [TargetVersion(n, v) for n, v in SIM_TARGETS.items()]

    def get_target_version(self, name: str) -> tuple[int, int, int]:
        if name not in SIM_TARGETS:
            raise _fail(errno.EINVAL, "DM_GET_TARGET_VERSION", name)
        return SIM_TARGETS[name]

    def arm_poll(self) -> None:
        pass

    def dev_majors(self) -> list[int]:
        return [SIM_MAJOR]

    def device_number(self, path: str) -> tuple[int, int] | None:
        with self._locked() as k:
            hit = self._resolve(k, path)
        return hit[0] if hit else None

    def disks(self) -> list[DiskSurvey]:
        """As DM.disks: the disks declared (add_disk), none a partition."""
        return [DiskSurvey(path, facts.device, "", facts.size_bytes, facts.signature,
                           facts.in_use)
                for path in sorted(self.snapshot()["disks"])
                for facts in [self.block_device(path)]]

    def block_device(self, path: str) -> BlockDevice:
        with self._locked() as k:
            if path not in k.disks:
                raise NotABlockDevice(f"{path}: no such block device")
            major, minor, size, signature = (k.disks[path] + [None])[:4]
            in_use = k.devices.refs.get((major, minor), 0) > 0
            head = self._disk_bytes.read(self._disk_key(k, path), 0,
                                         min(PROBE_BYTES, size * 512))
            written = probe_signature(head)
            return BlockDevice(path, (major, minor), size * 512, in_use, written or signature)

    # -- per-device commands -----------------------------------------------
    def device_create(self, name: str, uuid: str | None = None, flags: DmFlags = DmFlags(0),
                      *, device: tuple[int, int] | None = None) -> DeviceInfo:
        validate_name(name)
        if uuid:
            validate_uuid(uuid)
        flags = validate_flags(flags, DmFlags.DM_PERSISTENT_DEV | DmFlags.DM_READONLY)
        with self._locked(write=True) as k:
            if name in k.devices or (uuid and uuid in k.devices.uuids):
                raise _fail(errno.EBUSY, "DM_DEV_CREATE", name)
            if flags & DmFlags.DM_PERSISTENT_DEV:
                if device is None:
                    raise InvalidArgument("DM_PERSISTENT_DEV needs device=(major, minor)")
                if device[0] != SIM_MAJOR or device[1] in k.devices.minors:
                    raise _fail(errno.ENXIO, "DM_DEV_CREATE", name)
                minor = device[1]
            else:
                minor = k.devices.lowest_free_minor()
            dev = _Dev(name=name, uuid=uuid or "", minor=minor)
            k.devices[name] = dev
            self._event_raised = True
            return self._info(k, dev)

    def device_remove(self, id: DevId | str, flags: DmFlags = DmFlags(0),
                      later: list[UdevWait] | None = None) -> DeviceInfo:
        flags = validate_flags(flags, DmFlags.DM_DEFERRED_REMOVE)
        if later is not None:  # no udev here: its wait is over at once
            later.append(UdevWait(lambda _: None, None, f"removing {id}"))
        with self._locked(write=True) as k:
            dev = self._find(k, id, "DM_DEV_REMOVE")
            if self._open_count(k, dev):
                if flags & DmFlags.DM_DEFERRED_REMOVE:
                    dev.deferred_remove = True
                    return self._info(k, dev)
                raise _fail(errno.EBUSY, "DM_DEV_REMOVE", id)
            del k.devices[dev.name]
            self._cleared.discard(dev.minor)
            self._event_raised = True
            return self._info(k, dev, DmFlags.DM_UEVENT_GENERATED)

    def device_rename(self, old_name: DevId | str, new_id: DevId) -> DeviceInfo:
        with self._locked(write=True) as k:
            dev = self._find(k, old_name, "DM_DEV_RENAME")
            if dev.minor in self._cleared:
                raise UnsafeOperation(
                    f"refusing to rename {dev.name!r}: its inactive table was cleared "
                    "(kernel double free on remove, Linux 6.1-6.12); remove it instead")
            if new_id.is_uuid:
                if dev.uuid:
                    raise _fail(errno.EINVAL, "DM_DEV_RENAME", old_name)
                if new_id.value in k.devices.uuids:
                    raise _fail(errno.EBUSY, "DM_DEV_RENAME", old_name)
                dev.uuid = new_id.value
            else:
                if new_id.value in k.devices:
                    raise _fail(errno.EBUSY, "DM_DEV_RENAME", old_name)
                del k.devices[dev.name]
                dev.name = new_id.value  # not owned between the two: no index to move
                k.devices[dev.name] = dev
            self._event_raised = True
            return self._info(k, dev, DmFlags.DM_UEVENT_GENERATED)

    def device_suspend(self, id: DevId | str, flags: DmFlags = DmFlags(0),
                       later: list[UdevWait] | None = None) -> DeviceInfo:
        if later is not None and not flags & DmFlags.DM_SUSPEND:
            later.append(UdevWait(lambda _: None, None, f"adding {id}"))
        flags = validate_flags(
            flags,
            DmFlags.DM_SUSPEND | DmFlags.DM_SKIP_LOCKFS | DmFlags.DM_NOFLUSH
            | DmFlags.DM_READONLY,
        )
        if self.flush_delay and flags & DmFlags.DM_SUSPEND and not flags & DmFlags.DM_NOFLUSH:
            time.sleep(self.flush_delay)
        with self._locked(write=True) as k:
            dev = self._find(k, id, "DM_DEV_SUSPEND")
            if flags & DmFlags.DM_SUSPEND:
                dev.suspended = True
                if dev.flush_on_suspend:
                    dev.cache_dirty, dev.cleaning_since = 0, 0.0
                    dev.flush_on_suspend = False
                return self._info(k, dev)
            extra = DmFlags(0)
            if dev.inactive is not None and not self._areas_fit(k, dev.inactive):
                # do_resume: suspend, fail the swap, drop the new table, and
                # return with the device still suspended on its old table.
                dev.suspended = True
                dev.inactive, dev.inactive_ro = None, False
                raise _fail(errno.EINVAL, "DM_DEV_SUSPEND", id)
            if dev.inactive is not None:
                # do_resume swaps the new table in; pool_preresume then fails
                # the resume of a data device smaller than the metadata's data
                # size ("pool target too small"): suspended, on the new table.
                fits = self._pool_size_fits(k, dev.inactive)
                if not fits:
                    self._swap_cache(dev, dev.live, dev.inactive)
                    dev.live, dev.live_ro = dev.inactive, dev.inactive_ro
                    dev.inactive, dev.inactive_ro = None, False
                    dev.size_sectors = sum(int(str(line[1])) for line in dev.live)
            elif dev.suspended and dev.live is not None:
                fits = self._pool_size_fits(k, dev.live)
            else:
                fits = True
            if not fits:
                dev.suspended = True
                raise _fail(errno.EINVAL, "DM_DEV_SUSPEND", id)
            if dev.suspended or dev.inactive is not None:
                self._rearm_low_water(k, dev.inactive or dev.live)
            if dev.inactive is not None:
                self._swap_cache(dev, dev.live, dev.inactive)
                dev.live, dev.live_ro = dev.inactive, dev.inactive_ro
                dev.inactive, dev.inactive_ro = None, False
                self._event_raised = True  # a table swapped in
                dev.size_sectors = sum(int(str(line[1])) for line in dev.live)
                dev.suspended = True
            if dev.suspended:
                if dev.live is None:
                    raise _fail(errno.EINVAL, "DM_DEV_SUSPEND", id)
                dev.suspended = False
                extra = DmFlags.DM_UEVENT_GENERATED
            return self._info(k, dev, extra)

    # -- the cache model ---------------------------------------------------
    @staticmethod
    def _dirty_now(dev: _Dev) -> int:
        if not dev.cleaning_since:
            return dev.cache_dirty
        cleaned = int((time.time() - dev.cleaning_since) * SIM_CLEAN_RATE)
        return max(0, dev.cache_dirty - cleaned)

    def _swap_cache(self, dev: _Dev, old: list[list[object]] | None,
                    new: list[list[object]]) -> None:
        was, becomes = _cache_kind(old), _cache_kind(new)
        remaining = self._dirty_now(dev)
        if was and not becomes:
            dev.lost_dirty = dev.lost_dirty + remaining
            dev.cache_dirty, dev.cleaning_since = 0, 0.0
        elif becomes:
            dev.cache_dirty = remaining
            dev.cleaning_since = time.time() if _cleaner(new) else 0.0

    def set_cache_dirty(self, id: DevId | str, blocks: int) -> None:
        """Pretend writes left *blocks* dirty in the device's cache."""
        with self._locked(write=True) as k:
            dev = self._find(k, id, "cache")
            dev.cache_dirty = blocks
            dev.cleaning_since = time.time() if _cleaner(dev.live) else 0.0

    def lost_cache_blocks(self, id: DevId | str) -> int:
        """Dirty blocks a table swap threw away (0 when no write was lost)."""
        with self._locked() as k:
            return self._find(k, id, "cache").lost_dirty

    def _cache_status(self, k: _Kernel, dev: _Dev, target_type: str, params: str) -> str:
        args = params.split()
        dirty = self._dirty_now(dev)
        if target_type == "writecache":
            block_sectors = int(args[3]) // 512
            found = self._resolve(k, args[2])
            total = (found[1] if found else 0) // block_sectors
            return f"0 {total} {max(0, total - dirty)} 0"
        block = int(args[3])
        found = self._resolve(k, args[1])
        total = (found[1] if found else 0) // block
        count = int(args[4])
        features = args[5:5 + count]
        policy = args[5 + count]
        used = min(total, dirty)
        return (f"8 10/1024 {block} {used}/{total} 0 0 0 0 0 0 {dirty} {count} "
                f"{' '.join(features)} 2 migration_threshold 2048 {policy} 0 rw -")

    def device_info(self, id: DevId | str) -> DeviceInfo:
        with self._locked() as k:
            return self._info(k, self._find(k, id, "DM_DEV_STATUS"))

    def open_node(self, id: DevId | str, flags: int) -> int:
        """As DM.open_node: a file of the device's size stands for its
        node (a sparse file beside the model, or a memfd for an in-memory
        simulator), named by the device's UUID, so what was written is there
        again when a volume is activated again. ``O_EXCL`` is not modelled."""
        with self._locked() as k:
            dev = self._find(k, id, "open")
            if dev.live is None:
                raise _fail(errno.ENXIO, "open", dev.name)
            key, size = f"dev-{dev.uuid or dev.name}", dev.size_sectors * 512
        flags = (flags & ~os.O_EXCL) | os.O_CLOEXEC
        if self._disk_bytes.directory is None:
            with self._lock:
                backing = self._memfds.get(key)
                if backing is None:
                    backing = self._memfds[key] = os.memfd_create(key, os.MFD_CLOEXEC)
                if os.fstat(backing).st_size < size:
                    os.ftruncate(backing, size)
            # A new open file (its own offset), as a second open of a node is.
            return os.open(f"/proc/self/fd/{backing}", flags)
        path = self._disk_bytes.directory / key
        self._disk_bytes.directory.mkdir(parents=True, exist_ok=True)
        sizing = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(sizing).st_size < size:
                os.ftruncate(sizing, size)
        finally:
            os.close(sizing)
        return os.open(path, flags)

    def zero_range(self, id: DevId | str, offset: int, length: int) -> None:
        """As DM.zero_range, on the device's backing file."""
        if offset % 512 or length % 512 or offset < 0 or length < 0:
            raise InvalidArgument("zero_range takes whole 512-byte sectors")
        fd = self.open_node(id, os.O_WRONLY)
        try:
            chunk = bytes(1 << 20)
            for at in range(offset, offset + length, len(chunk)):
                os.pwrite(fd, chunk[:min(len(chunk), offset + length - at)], at)
        finally:
            os.close(fd)

    def luks_open(self, id: DevId | str, name: str, key: bytes | bytearray) -> DeviceInfo:
        """As DM.luks_open, with the real cryptsetup on the device's backing
        file for the header and the key (a wrong key fails as it would), and
        a crypt table of the shape cryptsetup loads (the key by keyring
        reference) for the mapping. I/O does not pass through: the new
        device has a backing file of its own, as any simulated device."""
        fd = self.open_node(id, os.O_RDONLY)
        try:
            luks.test_key(fd, key)
            header = luks.dump(fd)
        finally:
            os.close(fd)
        source = self.device_info(id)
        offset = header.data_offset_bytes // 512
        size = self._size(source.name) - offset
        if size <= 0:
            raise luks.LuksError(1, f"{source.name} is smaller than its LUKS header")
        uuid = f"CRYPT-LUKS2-{header.uuid.replace('-', '')}-{name}"
        try:
            self.device_create(name, uuid)
        except DmError as exc:
            raise luks.DeviceBusy(5, f"Device {name} already exists.") from exc
        params = (f"aes-xts-plain64 :64:logon:cryptsetup:{header.uuid}-d0 0 "
                  f"{source.device[0]}:{source.device[1]} {offset} 1 sector_size:4096")
        self.table_load(name, [(0, size, "crypt", params)])
        return self.device_suspend(name)

    def _size(self, name: str) -> int:
        with self._locked() as k:
            return k.devices[name].size_sectors

    def device_wait(self, id: DevId | str, flags: DmFlags = DmFlags(0),
                    event_nr: int | None = None) -> tuple[DeviceInfo, list[TargetLine]]:
        flags = validate_flags(flags, DmFlags.DM_QUERY_INACTIVE_TABLE | DmFlags.DM_STATUS_TABLE)
        with self._lock:
            start = self.device_info(id).event_nr if event_nr is None else event_nr
            while self.device_info(id).event_nr == start:
                self._changed.wait(0.05 if self.path else None)
            return self.table_status(id, flags)

    def table_load(self, id: DevId | str, table: Sequence[Sequence[object]],
                   flags: DmFlags = DmFlags(0)) -> DeviceInfo:
        lines = validate_table(table)
        flags = validate_flags(flags, DmFlags.DM_READONLY | DmFlags.DM_SECURE_DATA)
        carries_key(lines)  # same rule as the kernel engine; nothing to wipe here
        with self._locked(write=True) as k:
            dev = self._find(k, id, "DM_TABLE_LOAD")
            devid = id if isinstance(id, DevId) else DevId.name(id)
            self._check_params(k, lines, devid)
            if (SIM_MAJOR, dev.minor) in self._deps(k, [list(x) for x in lines]):
                raise _fail(errno.EINVAL, "DM_TABLE_LOAD", id)
            dev.inactive = [[ln.start, ln.length, ln.target_type,
                             self._normalize(k, ln.params)] for ln in lines]
            dev.inactive_ro = bool(flags & DmFlags.DM_READONLY)
            self._open_pool(k, dev.inactive)
            return self._info(k, dev)

    def table_clear(self, id: DevId | str) -> DeviceInfo:
        with self._locked(write=True) as k:
            dev = self._find(k, id, "DM_TABLE_CLEAR")
            dev.inactive, dev.inactive_ro = None, False
            self._cleared.add(dev.minor)
            return self._info(k, dev)

    def table_deps(self, id: DevId | str, flags: DmFlags = DmFlags(0)) -> list[tuple[int, int]]:
        flags = validate_flags(flags, DmFlags.DM_QUERY_INACTIVE_TABLE)
        with self._locked() as k:
            dev = self._find(k, id, "DM_TABLE_DEPS")
            table = dev.inactive if flags & DmFlags.DM_QUERY_INACTIVE_TABLE else dev.live
            return self._deps(k, table)

    def table_status(self, id: DevId | str, flags: DmFlags = DmFlags(0)
                     ) -> tuple[DeviceInfo, list[TargetLine]]:
        flags = validate_flags(
            flags, DmFlags.DM_STATUS_TABLE | DmFlags.DM_QUERY_INACTIVE_TABLE
            | DmFlags.DM_NOFLUSH | DmFlags.DM_IMA_MEASUREMENT,
        )
        inactive = bool(flags & DmFlags.DM_QUERY_INACTIVE_TABLE)
        with self._locked() as k:
            dev = self._find(k, id, "DM_TABLE_STATUS")
            table = (dev.inactive if inactive else dev.live) or []
            lines = [
                TargetLine(int(str(s)), int(str(n)), str(t),
                           _as_printed(str(t), str(p)) if flags & DmFlags.DM_STATUS_TABLE else
                           self._pool_status(k, dev, str(p)) if t == "thin-pool" and not inactive
                           else self._thin_status(k, str(p)) if t == "thin" and not inactive
                           else self._cache_status(k, dev, str(t), str(p))
                           if t in ("cache", "writecache") and not inactive
                           else _status(str(t), str(p)))
                for s, n, t, p in table
            ]
            return self._info(k, dev, inactive=inactive), lines

    def target_msg(self, id: DevId | str, sector: int | None, message: str
                   ) -> tuple[DeviceInfo, str | None]:
        if not isinstance(message, str) or not message or "\0" in message:
            raise InvalidArgument("a message must be a non-empty string without NUL")
        with self._locked(write=True) as k:
            dev = self._find(k, id, "DM_TARGET_MSG")
            if dev.live and len(dev.live) == 1 and dev.live[0][2] == "thin-pool":
                self._pool_message(k, dev, message)
                return self._info(k, dev), None
            if dev.live and len(dev.live) == 1 and dev.live[0][2] == "writecache" and \
                    message in ("flush", "flush_on_suspend"):
                if message == "flush":
                    dev.cache_dirty, dev.cleaning_since = 0, 0.0
                else:
                    dev.flush_on_suspend = True
                return self._info(k, dev), None
            raise _fail(errno.EINVAL, "DM_TARGET_MSG", id)


class _SimEvents:
    """SimDM's KernelEventSource: readable once an event was sent."""

    def __init__(self, fifo: Path | None) -> None:
        self._write_fd = -1
        if fifo is None:
            self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._keep_open = -1
        else:
            with contextlib.suppress(FileExistsError):
                os.mkfifo(fifo, 0o600)
            self._read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            # Held open so that the FIFO never reads as hung up between writers.
            self._keep_open = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._read_fd

    def notify(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._write_fd, b"!")

    def acknowledge(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read_fd, 4096):
                pass

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd, self._keep_open):
            if fd >= 0:
                os.close(fd)
        self._read_fd = self._write_fd = self._keep_open = -1


def _new_pool() -> dict[str, Any]:
    return {"tid": 0, "thins": [], "maps": {}, "refs": {}, "free": [], "next": 0,
            "low": False}


def _copy_pool(pool: dict[str, Any]) -> dict[str, Any]:
    """A pool's metadata to change (what is stored stays as it was if the
    change fails half-way)."""
    return {**_new_pool(), **pool, "thins": list(pool["thins"]),
            "maps": {t: dict(m) for t, m in pool.get("maps", {}).items()},
            "refs": dict(pool.get("refs", {})), "free": list(pool.get("free", []))}


def _unref(pool: dict[str, Any], block: int) -> None:
    left = pool["refs"][str(block)] - 1
    if left:
        pool["refs"][str(block)] = left
    else:
        del pool["refs"][str(block)]
        pool["free"].append(block)


def _as_printed(target: str, params: str) -> str:
    """A table line's params as the kernel prints them back: thin-pool's
    emit_flags() leaves a space after the last word."""
    return params + " " if target == "thin-pool" else params

def _cache_kind(table: list[list[object]] | None) -> str | None:
    kinds = {str(line[2]) for line in table or []} & {"cache", "writecache"}
    return next(iter(kinds), None)


def _cleaner(table: list[list[object]] | None) -> bool:
    """A cache table that writes back its dirty blocks and takes no new
    ones: dm-cache's cleaner policy, dm-writecache's cleaner option."""
    for line in table or []:
        words = str(line[3]).split()
        if line[2] == "cache" and len(words) > 5 and words[5 + int(words[4])] == "cleaner":
            return True
        if line[2] == "writecache" and "cleaner" in words[5:]:
            return True
    return False


def _status(target_type: str, params: str) -> str:
    """STATUSTYPE_INFO for the few targets whose status needs no I/O model."""
    if target_type == "striped":
        args = params.split()
        devs = args[2::2]
        return f"{len(devs)} {' '.join(devs)} 1 {'A' * len(devs)}"
    if target_type == "thin":
        return "0 -"  # an inactive table maps nothing yet
    return ""


if TYPE_CHECKING:
    from dmd.engine.dm import DM
    from dmd.engine.interface import Engine

    def _both_are_engines(dm: DM, sim: SimDM) -> tuple[Engine, Engine]:
        return dm, sim  # mypy checks each against the Protocol

