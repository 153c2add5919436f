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

Not modelled: I/O, target status beyond a few simple targets, messages
(every message fails with EINVAL, like a target without a message handler),
and target-specific parameter checks beyond linear, striped, zero and error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dmd.engine.dm import carries_key
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

SIM_MAJOR = 253
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


@dataclass
class _Kernel:
    devices: dict[str, _Dev] = field(default_factory=dict)
    # path -> [major, minor, size in sectors]
    disks: dict[str, list[int]] = field(default_factory=dict)


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
        self._stamp: tuple[int, int] | None = None
        self._changed = threading.Condition(self._lock)
        self.ioctl_count = 0
        # Same guard as DM against the clear-rename-remove kernel bug, so a
        # daemon behaves identically on the simulator.
        self._cleared: set[int] = set()
        # Who holds whom open, computed once per state for read-only calls:
        # recomputing it per device made a scan of N devices cost O(N^2).
        self._holders: dict[tuple[int, int], int] | None = None
        self._reading = False
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                pass

    # -- persistence -------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, write: bool = False) -> Iterator[_Kernel]:
        with self._lock:
            self.ioctl_count += 1
            if write:
                self._holders = None
            self._reading = not write
            try:
                with self._locked_state(write) as state:
                    yield state
            finally:
                self._reading = False
                if write:
                    self._holders = None

    @contextlib.contextmanager
    def _locked_state(self, write: bool) -> Iterator[_Kernel]:
        if self.path is None:
            yield self._state
            if write:
                self._reap_deferred(self._state)
                self._changed.notify_all()
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            self._reload()
            yield self._state
            if write:
                self._reap_deferred(self._state)
                self._save()
                self._changed.notify_all()

    def _reap_deferred(self, k: _Kernel) -> None:
        """Finish deferred removes whose last opener went away (the kernel's
        dm_deferred_remove work)."""
        progress = True
        while progress:
            progress = False
            for dev in list(k.devices.values()):
                if dev.deferred_remove and self._open_count(k, dev) == 0:
                    del k.devices[dev.name]
                    progress = True

    def _reload(self) -> None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._state, self._stamp = _Kernel(), None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._holders = None
        raw = json.loads(self.path.read_text())
        self._state = _Kernel(
            devices={k: _Dev(**v) for k, v in raw["devices"].items()},
            disks={k: list(v) for k, v in raw["disks"].items()},
        )
        self._stamp = stamp

    def _save(self) -> None:
        assert self.path is not None
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = {
            "devices": {k: asdict(v) for k, v in self._state.devices.items()},
            "disks": self._state.disks,
        }
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)
        st = os.stat(self.path)
        self._stamp = (st.st_mtime_ns, st.st_size)

    # -- test hooks (no kernel counterpart) --------------------------------
    def add_disk(self, path: str, major: int, minor: int, size_sectors: int) -> None:
        """Declare a backing block device that tables may reference."""
        with self._locked(write=True) as k:
            k.disks[path] = [major, minor, size_sectors]

    def open_device(self, id: DevId | str, count: int = 1) -> None:
        """Pretend a process opened (count > 0) or closed (count < 0) the device."""
        with self._locked(write=True) as k:
            dev = self._find(k, id, "open")
            dev.external_opens = max(0, dev.external_opens + count)

    def trigger_event(self, id: DevId | str) -> None:
        """Raise the device's event number, as a target reporting an event does."""
        with self._locked(write=True) as k:
            self._find(k, id, "event").event_nr += 1

    # -- lifecycle, as DM --------------------------------------------------
    def close(self) -> None:
        pass

    def __enter__(self) -> SimDM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------
    @staticmethod
    def _find(k: _Kernel, id: DevId | str, command: str) -> _Dev:
        dev = id if isinstance(id, DevId) else DevId.name(id)
        if dev.is_uuid:
            for d in k.devices.values():
                if d.uuid == dev.value:
                    return d
        elif dev.value in k.devices:
            return k.devices[dev.value]
        raise _fail(errno.ENXIO, command, dev)

    def _resolve(self, k: _Kernel, ref: str) -> tuple[tuple[int, int], int] | None:
        """A device reference in params -> ((major, minor), size) or None."""
        if ref in k.disks:
            major, minor, size = k.disks[ref]
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
                for dmaj, dmin, size in k.disks.values():
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

    def _holder_counts(self, k: _Kernel) -> dict[tuple[int, int], int]:
        counts: dict[tuple[int, int], int] = {}
        for other in k.devices.values():
            for table in (other.live, other.inactive):
                for dep in self._deps(k, table):
                    if dep != (SIM_MAJOR, other.minor):
                        counts[dep] = counts.get(dep, 0) + 1
        return counts

    def _open_count(self, k: _Kernel, dev: _Dev) -> int:
        if self._reading:
            if self._holders is None:
                self._holders = self._holder_counts(k)
            counts = self._holders
        else:
            counts = self._holder_counts(k)
        return counts.get((SIM_MAJOR, dev.minor), 0) + dev.external_opens

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
            if not ok:
                raise _fail(errno.EINVAL, "DM_TABLE_LOAD", dev)

    def _areas_fit(self, k: _Kernel, table: list[list[object]]) -> bool:
        """The kernel's device_area_is_invalid, run when a table is swapped in."""
        for _start, length, ttype, params in table:
            args = str(params).split()
            if ttype == "linear" and not self._fits(k, args[0], int(args[1]), int(str(length))):
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

    # -- per-device commands -----------------------------------------------
    def device_create(self, name: str, uuid: str | None = None, flags: DmFlags = DmFlags(0),
                      *, device: tuple[int, int] | None = None) -> DeviceInfo:
        validate_name(name)
        if uuid:
            validate_uuid(uuid)
        flags = validate_flags(flags, DmFlags.DM_PERSISTENT_DEV | DmFlags.DM_READONLY)
        with self._locked(write=True) as k:
            if name in k.devices or (uuid and any(d.uuid == uuid for d in k.devices.values())):
                raise _fail(errno.EBUSY, "DM_DEV_CREATE", name)
            used = {d.minor for d in k.devices.values()}
            if flags & DmFlags.DM_PERSISTENT_DEV:
                if device is None:
                    raise InvalidArgument("DM_PERSISTENT_DEV needs device=(major, minor)")
                if device[0] != SIM_MAJOR or device[1] in used:
                    raise _fail(errno.ENXIO, "DM_DEV_CREATE", name)
                minor = device[1]
            else:
                minor = next(m for m in range(len(used) + 1) if m not in used)
            dev = _Dev(name=name, uuid=uuid or "", minor=minor)
            k.devices[name] = dev
            return self._info(k, dev)

    def device_remove(self, id: DevId | str, flags: DmFlags = DmFlags(0)) -> DeviceInfo:
        flags = validate_flags(flags, DmFlags.DM_DEFERRED_REMOVE)
        with self._locked(write=True) as k:
            dev = self._find(k, id, "DM_DEV_REMOVE")
            if self._open_count(k, dev):
                if flags & DmFlags.DM_DEFERRED_REMOVE:
                    dev.deferred_remove = True
                    return self._info(k, dev)
                raise _fail(errno.EBUSY, "DM_DEV_REMOVE", id)
            del k.devices[dev.name]
            self._cleared.discard(dev.minor)
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
                if any(d.uuid == new_id.value for d in k.devices.values()):
                    raise _fail(errno.EBUSY, "DM_DEV_RENAME", old_name)
                dev.uuid = new_id.value
            else:
                if new_id.value in k.devices:
                    raise _fail(errno.EBUSY, "DM_DEV_RENAME", old_name)
                del k.devices[dev.name]
                dev.name = new_id.value
                k.devices[dev.name] = dev
            return self._info(k, dev, DmFlags.DM_UEVENT_GENERATED)

    def device_suspend(self, id: DevId | str, flags: DmFlags = DmFlags(0)) -> DeviceInfo:
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
                return self._info(k, dev)
            extra = DmFlags(0)
            if dev.inactive is not None and not self._areas_fit(k, dev.inactive):
                # do_resume: suspend, fail the swap, drop the new table, and
                # return with the device still suspended on its old table.
                dev.suspended = True
                dev.inactive, dev.inactive_ro = None, False
                raise _fail(errno.EINVAL, "DM_DEV_SUSPEND", id)
            if dev.inactive is not None:
                dev.live, dev.live_ro = dev.inactive, dev.inactive_ro
                dev.inactive, dev.inactive_ro = None, False
                dev.size_sectors = sum(int(str(line[1])) for line in dev.live)
                dev.suspended = True
            if dev.suspended:
                if dev.live is None:
                    raise _fail(errno.EINVAL, "DM_DEV_SUSPEND", id)
                dev.suspended = False
                extra = DmFlags.DM_UEVENT_GENERATED
            return self._info(k, dev, extra)

    def device_info(self, id: DevId | str) -> DeviceInfo:
        with self._locked() as k:
            return self._info(k, self._find(k, id, "DM_DEV_STATUS"))

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
                           str(p) if flags & DmFlags.DM_STATUS_TABLE else _status(str(t), str(p)))
                for s, n, t, p in table
            ]
            return self._info(k, dev, inactive=inactive), lines

    def target_msg(self, id: DevId | str, sector: int | None, message: str
                   ) -> tuple[DeviceInfo, str | None]:
        if not isinstance(message, str) or not message or "\0" in message:
            raise InvalidArgument("a message must be a non-empty string without NUL")
        with self._locked() as k:
            self._find(k, id, "DM_TARGET_MSG")
            raise _fail(errno.EINVAL, "DM_TARGET_MSG", id)


def _status(target_type: str, params: str) -> str:
    """STATUSTYPE_INFO for the few targets whose status needs no I/O model."""
    if target_type == "striped":
        args = params.split()
        devs = args[2::2]
        return f"{len(devs)} {' '.join(devs)} 1 {'A' * len(devs)}"
    return ""
