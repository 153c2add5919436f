"""The device-mapper control interface: one method per ioctl.

``DM`` is synchronous and thread-safe for concurrent calls (each call builds its
own buffer; the kernel serializes what it must). It never touches asyncio:
callers in an event loop run it in a worker thread. Calls that can block on
I/O for a long time:

* ``device_suspend`` with ``DM_SUSPEND`` and without ``DM_NOFLUSH`` waits for
  in-flight I/O to drain (unbounded on a dead path, e.g. multipath with
  queue_if_no_path);
* ``device_wait`` sleeps until the device's event number moves;
* ``device_remove``/``remove_all`` may flush; every call that waits for udev
  (resume, remove, rename) waits up to ``udev_timeout`` seconds.

The clear-rename-remove kernel bug: on Debian's 6.1 and 6.12 kernels, clearing
a loaded inactive table, then renaming the device, then removing it double-frees
in dm_ima_measure_on_device_remove and corrupts kernel memory. ``DM`` remembers
the devices it cleared and refuses to rename them (``UnsafeOperation``) until
they are removed; removing them directly is safe. Another process can still
walk into the bug: the guard covers what goes through this handle.

Key material: tables of ``crypt`` and key-bearing ``integrity`` targets are
loaded with ``DM_SECURE_DATA`` (the kernel wipes its copies), table reads are
always made with it, and no exception or log line carries table parameters.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

from dmd.engine import blockdev, ioctl, luks, thintools
from dmd.engine.blockdev import BlockDevice
from dmd.engine.ioctl import DM_IOCTL_SIZE, Command, Header
from dmd.engine.keys import carries_key
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
    block_device_number,
    dev_t,
    major_minor,
    validate_flags,
    validate_name,
    validate_table,
)
from dmd.engine.udevsync import NodeWatcher, UdevSync, UdevWait, cookie

BLKZEROOUT = 0x127F  # _IO(0x12, 127), linux/fs.h: zero a byte range of a block device

log = logging.getLogger(__name__)

CONTROL_PATH = "/dev/mapper/control"


def mapper_path(name: str) -> str:
    """The node udev makes for the device-mapper device *name*."""
    return f"/dev/mapper/{name}"

# Commands whose answer can outgrow a bare header start with this much room;
# the rest send only what they must (the kernel copies data_size both ways).
_OUTPUT_COMMANDS = frozenset({
    Command.DM_LIST_DEVICES, Command.DM_TABLE_STATUS, Command.DM_TABLE_DEPS,
    Command.DM_LIST_VERSIONS, Command.DM_TARGET_MSG, Command.DM_DEV_WAIT,
    Command.DM_GET_TARGET_VERSION,
})
_FIRST_OUTPUT_SIZE = 16 * 1024
# On DM_BUFFER_FULL grow by this factor: 16 KiB -> 256 KiB -> 4 MiB covers
# tens of thousands of devices in at most three tries, and the size that
# worked is remembered so the next call needs one.
_GROWTH = 16
_MAX_BUFFER = 256 * 1024 * 1024

def _as_devid(dev: DevId | str) -> DevId:
    return dev if isinstance(dev, DevId) else DevId.name(dev)


def dev_majors(proc_devices: str = "/proc/devices") -> list[int]:
    """Block majors the kernel registered for device-mapper."""
    majors: list[int] = []
    in_block = False
    with open(proc_devices) as f:
        for line in f:
            if line.startswith("Block devices:"):
                in_block = True
                continue
            parts = line.split()
            if in_block and len(parts) == 2 and parts[1] == "device-mapper":
                majors.append(int(parts[0]))
    return majors


class DM:
    """An open handle on /dev/mapper/control."""

    def __init__(
        self,
        path: str = CONTROL_PATH,
        *,
        udev_sync: UdevSync | None = None,
        udev_timeout: float = 10.0,
        dev_dir: str = "/dev",
    ) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            hint = {
                2: "is device-mapper in this kernel? (modprobe dm_mod)",
                13: "opening it needs root (CAP_SYS_ADMIN)",
                1: "opening it needs root (CAP_SYS_ADMIN)",
                19: "the kernel has no device-mapper driver",
            }.get(exc.errno or 0, "")
            raise DmError(exc.errno or 0, "open", path).with_traceback(None) from (
                OSError(exc.errno, f"cannot open {path}: {exc.strerror}. {hint}".strip())
            )
        self.path = path
        self.nodes = NodeWatcher(udev_sync or UdevSync.detect(), Path(dev_dir),
                                 timeout=udev_timeout)
        self._sizes: dict[Command, int] = {}
        self._sizes_lock = threading.Lock()
        self._cleared: set[tuple[int, int]] = set()
        self.ioctl_count = 0  # for benchmarks and tests of the buffer-full retry

    # -- lifecycle ---------------------------------------------------------
    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._fd

    # -- the one ioctl routine ---------------------------------------------
    def _ioctl(
        self,
        command: Command,
        dev: DevId | None = None,
        *,
        flags: int = 0,
        event_nr: int = 0,
        payload: bytes = b"",
        target_count: int = 0,
        devnum: int = 0,
        name: str = "",
        uuid: str = "",
    ) -> tuple[Header, bytearray]:
        if dev is not None:
            if dev.is_uuid:
                uuid = dev.value
            else:
                name = dev.value
        needed = DM_IOCTL_SIZE + ioctl.align8(len(payload))
        size = max(needed, self._sizes.get(command,
                   _FIRST_OUTPUT_SIZE if command in _OUTPUT_COMMANDS else needed))
        label = str(dev) if dev is not None else (name or None)
        while True:
            buf = bytearray(size)
            buf[:DM_IOCTL_SIZE] = ioctl.pack_header(
                data_size=size, name=name, uuid=uuid, flags=flags, event_nr=event_nr,
                dev=devnum, target_count=target_count,
            )
            buf[DM_IOCTL_SIZE : DM_IOCTL_SIZE + len(payload)] = payload
            self.ioctl_count += 1
            try:
                fcntl.ioctl(self._fd, command.request, buf, True)
            except OSError as exc:
                raise DmError(exc.errno or 0, command.name, label) from None
            header = ioctl.unpack_header(buf)
            if not header.flags & DmFlags.DM_BUFFER_FULL:
                if size > self._sizes.get(command, 0) and command in _OUTPUT_COMMANDS:
                    with self._sizes_lock:
                        self._sizes[command] = max(size, self._sizes.get(command, 0))
                return header, buf
            if size >= _MAX_BUFFER:
                raise DmError(105, command.name, label)  # ENOBUFS
            size = min(size * _GROWTH, _MAX_BUFFER)

    @staticmethod
    def _info(header: Header) -> DeviceInfo:
        return DeviceInfo(
            name=header.name,
            uuid=header.uuid,
            device=major_minor(header.dev),
            open_count=header.open_count,
            event_nr=header.event_nr,
            flags=ioctl.flags_of(header),
            target_count=header.target_count,
            version=header.version,
        )

    # -- global commands ---------------------------------------------------
    def version(self) -> tuple[int, int, int]:
        header, _ = self._ioctl(Command.DM_VERSION)
        return header.version

    def remove_all(self, flags: DmFlags = DmFlags(0)) -> DeviceInfo:
        """Remove every unused device (DM_DEFERRED_REMOVE allowed)."""
        flags = validate_flags(flags, DmFlags.DM_DEFERRED_REMOVE)
        header, _ = self._ioctl(Command.DM_REMOVE_ALL, flags=flags)
        return self._info(header)

    def list_devices(self) -> list[Device]:
        # DM_UUID asks the kernel (4.37+) to append each device's UUID.
        header, buf = self._ioctl(Command.DM_LIST_DEVICES, flags=DmFlags.DM_UUID)
        return [
            Device(e.name, major_minor(e.dev), e.event_nr, e.uuid)
            for e in ioctl.unpack_name_list(buf, header.data_start, header.data_size,
                                            header.version)
        ]

    def list_versions(self) -> list[TargetVersion]:
        header, buf = self._ioctl(Command.DM_LIST_VERSIONS)
        return ioctl.unpack_versions(buf, header.data_start, header.data_size)

    def get_target_version(self, name: str) -> tuple[int, int, int]:
        """Version of one target type; the kernel may load its module."""
        if not name or len(name.encode()) >= 128:
            raise InvalidArgument(f"target name {name!r} is not valid")
        header, buf = self._ioctl(Command.DM_GET_TARGET_VERSION, name=name)
        versions = ioctl.unpack_versions(buf, header.data_start, header.data_size)
        return versions[0].version

    def arm_poll(self) -> None:
        """Arm the control fd: poll() on ``fileno()`` reports the next DM event."""
        self._ioctl(Command.DM_DEV_ARM_POLL)

    def open_events(self) -> ArmedControl:
        """The kernel's global DM event: a control handle of its own (the
        armed state belongs to the open file), armed."""
        return ArmedControl(DM(self.path, udev_sync=UdevSync.NONE))

    def dev_majors(self) -> list[int]:
        return dev_majors()

    def device_number(self, path: str) -> tuple[int, int] | None:
        """(major, minor) of the block device at *path*, as tables print it."""
        return block_device_number(path)

    def block_device(self, path: str) -> BlockDevice:
        """Size, in-use state and signature of *path* (NotABlockDevice if it
        is none)."""
        return blockdev.probe(path)

    def wipe(self, path: str, offset: int, length: int) -> None:
        """Zero *length* bytes of block device *path* from byte *offset* (a
        new thin pool's metadata must start zeroed, or the kernel opens what
        was there before)."""
        blockdev.wipe(path, offset, length)

    def disks(self) -> list[blockdev.DiskSurvey]:
        """The block devices a pool could be made on, surveyed without an
        exclusive open (blockdev.survey_disks)."""
        return blockdev.survey_disks()

    def read_disk(self, path: str, offset: int, length: int) -> bytes:
        """*length* bytes of block device *path* from byte *offset* (a pool's
        label and description, in the header its layout reserves)."""
        return blockdev.read(path, offset, length)

    def write_disk(self, path: str, offset: int, data: bytes) -> None:
        """Write *data* at byte *offset* of block device *path*, durably."""
        blockdev.write(path, offset, data)

    def open_node(self, id: DevId | str, flags: int) -> int:
        """An open file descriptor of the device's block node (``os.open``
        *flags*, close-on-exec added): /dev/mapper/NAME, checked to be this
        device's node after the open, so a node that udev has not yet moved
        (or that someone replaced) is never handed out in its place."""
        info = self.device_info(id)
        try:
            fd = os.open(mapper_path(info.name), flags | os.O_CLOEXEC)
        except FileNotFoundError:  # no table was ever made live: udev made no node
            raise DmError(errno.ENXIO, "open", info.name) from None
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode) or (
                os.major(st.st_rdev), os.minor(st.st_rdev)) != info.device:
            os.close(fd)
            raise DmError(errno.ENXIO, "open", info.name)
        return fd

    def zero_range(self, id: DevId | str, offset: int, length: int) -> None:
        """Make *length* bytes of the device from *offset* read as zeros
        (BLKZEROOUT: the device's own way, write-zeroes or writes, done
        before it returns). Byte counts are whole 512-byte sectors."""
        if offset % 512 or length % 512 or offset < 0 or length < 0:
            raise InvalidArgument("zero_range takes whole 512-byte sectors")
        fd = self.open_node(id, os.O_WRONLY)
        try:
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
        finally:
            os.close(fd)

    def luks_open(self, id: DevId | str, name: str, key: bytes | bytearray) -> DeviceInfo:
        """Map the LUKS2 volume on device *id* as *name* (cryptsetup open:
        see dmd.engine.luks); the new device's info."""
        info = self.device_info(id)
        luks.open_mapping(mapper_path(info.name), name, key)
        return self.device_info(name)

    # -- a thin pool's metadata (dmd.engine.thintools) ------------------------
    def _node(self, id: DevId | str, tool: str) -> str:
        """The device's node; busy while a device is stacked on it (an
        active pool: the tools open it exclusively, and say so only in
        words). Not its open count: udev's probe opens it for a moment after
        each tool that wrote it."""
        info = self.device_info(id)
        major, minor = info.device
        try:
            holders = os.listdir(f"/sys/dev/block/{major}:{minor}/holders")
        except OSError:
            holders = []
        if holders:
            raise thintools.ThinToolError(
                1, f"{tool}: {info.name}: Device or resource busy (held by {holders[0]})")
        return mapper_path(info.name)

    def thin_check(self, id: DevId | str) -> thintools.MetadataCheck:
        """thin_check of the metadata on device *id* (no active pool over it)."""
        return thintools.check(self._node(id, "thin_check"))

    def thin_repair(self, source: DevId | str, dest: DevId | str, transaction_id: int,
                    block_sectors: int, data_blocks: int) -> None:
        """thin_repair of device *source*'s metadata into device *dest*."""
        thintools.repair(self._node(source, "thin_repair"), self._node(dest, "thin_repair"),
                         transaction_id,
                         block_sectors, data_blocks)

    def thin_ids(self, id: DevId | str) -> list[int]:
        """The thin ids in the metadata on device *id*."""
        return thintools.thin_ids(self._node(id, "thin_ls"))

    # -- per-device commands -----------------------------------------------
    def device_create(
        self,
        name: str,
        uuid: str | None = None,
        flags: DmFlags = DmFlags(0),
        *,
        device: tuple[int, int] | None = None,
    ) -> DeviceInfo:
        """Create an empty device (no table). ``DM_PERSISTENT_DEV`` asks for *device*."""
        validate_name(name)
        udev_uuid = DevId.uuid(uuid).value if uuid else ""
        flags = validate_flags(flags, DmFlags.DM_PERSISTENT_DEV | DmFlags.DM_READONLY)
        devnum = 0
        if flags & DmFlags.DM_PERSISTENT_DEV:
            if device is None:
                raise InvalidArgument("DM_PERSISTENT_DEV needs device=(major, minor)")
            devnum = dev_t(*device)
        header, _ = self._ioctl(Command.DM_DEV_CREATE, name=name, uuid=udev_uuid,
                                flags=flags, devnum=devnum, event_nr=cookie())
        info = self._info(header)
        log.info("created %s (%d:%d)", name, *info.device)
        return info

    def device_remove(self, id: DevId | str, flags: DmFlags = DmFlags(0),
                      later: list[UdevWait] | None = None) -> DeviceInfo:
        """Remove a device; returns what it was, with the kernel's answer flags.
        *later*: udev's work (the node going) is added to it as a UdevWait
        instead of waited for here.

        The kernel's reply to DM_DEV_REMOVE carries no device number, so the
        device is looked up first: the udev wait and the kernel-bug guard both
        need to know which dev_t went away.
        """
        dev = _as_devid(id)
        flags = validate_flags(flags, DmFlags.DM_DEFERRED_REMOVE)
        before = self.device_info(dev)
        events = self.nodes.open_events()
        try:
            header, _ = self._ioctl(Command.DM_DEV_REMOVE, dev, flags=flags, event_nr=cookie())
            answer = ioctl.flags_of(header)
            info = dataclasses.replace(
                before,
                flags=answer & (DmFlags.DM_UEVENT_GENERATED | DmFlags.DM_DEFERRED_REMOVE)
                | before.flags & ~DmFlags.DM_DEFERRED_REMOVE,
            )
            if not answer & DmFlags.DM_DEFERRED_REMOVE:
                self._cleared.discard(info.device)
            if answer & DmFlags.DM_UEVENT_GENERATED:
                name, device = info.name, info.device
                # Named by no device: nothing waits for a removed node
                # later, so a caller that keeps waits by device (one that
                # goes on without udev) closes it at once, not holding its
                # monitor socket.
                wait = UdevWait(lambda ev: self.nodes.disappeared(name, device, ev), events,
                                f"removing /dev/mapper/{name}")
                events = None  # the wait's now
                self.nodes.now_or_later(wait, later)
        finally:
            if events is not None:
                events.close()
        log.info("%s %s", "deferred removal of" if answer & DmFlags.DM_DEFERRED_REMOVE
                 else "removed", info.name)
        return info

    def device_rename(self, old_name: DevId | str, new_id: DevId) -> DeviceInfo:
        """Rename a device, or set its UUID when *new_id* is a ``DevId.uuid``."""
        dev = _as_devid(old_name)
        flags = DmFlags.DM_UUID if new_id.is_uuid else DmFlags(0)
        old = dev.value
        if dev.is_uuid or self._cleared:
            current = self.device_info(dev)
            old = current.name
            if current.device in self._cleared:
                raise UnsafeOperation(
                    f"refusing to rename {old!r}: its inactive table was cleared, and renaming "
                    "it now makes the kernel double free on remove "
                    "(dm_ima_measure_on_device_remove, Linux 6.1-6.12); remove it instead"
                )
        with self.nodes.listening() as events:
            header, _ = self._ioctl(Command.DM_DEV_RENAME, dev, flags=flags, event_nr=cookie(),
                                    payload=ioctl.pack_string(new_id.value))
            # The kernel answers with the name the request carried: report the new one.
            info = self._info(header)
            if new_id.is_uuid:
                info = dataclasses.replace(info, uuid=new_id.value)
            else:
                info = dataclasses.replace(info, name=new_id.value)
            if not new_id.is_uuid and info.flags & DmFlags.DM_UEVENT_GENERATED \
                    and info.active_present:
                self.nodes.renamed(old, new_id.value, info.device, events)
        log.info("renamed %s to %s %s", dev, "uuid" if new_id.is_uuid else "name", new_id.value)
        return info

    def device_suspend(self, id: DevId | str, flags: DmFlags = DmFlags(0),
                       later: list[UdevWait] | None = None) -> DeviceInfo:
        """Suspend with ``DM_SUSPEND``; resume (swapping in a loaded table)
        without it. *later*: udev's work after a resume (the node made or
        changed) is added to it as a UdevWait instead of waited for here."""
        dev = _as_devid(id)
        flags = validate_flags(
            flags,
            DmFlags.DM_SUSPEND | DmFlags.DM_SKIP_LOCKFS | DmFlags.DM_NOFLUSH
            | DmFlags.DM_READONLY,
        )
        resuming = not flags & DmFlags.DM_SUSPEND
        events = self.nodes.open_events() if resuming else None
        try:
            header, _ = self._ioctl(Command.DM_DEV_SUSPEND, dev, flags=flags,
                                    event_nr=cookie() if resuming else 0)
            info = self._info(header)
            if resuming and info.active_present and info.flags & DmFlags.DM_UEVENT_GENERATED:
                name, device = info.name, info.device
                wait = UdevWait(lambda ev: self.nodes.appeared(name, device, ev), events,
                                f"adding /dev/mapper/{name}", name)
                events = None  # the wait's now
                self.nodes.now_or_later(wait, later)
        finally:
            if events is not None:
                events.close()
        log.info("%s %s", "resumed" if resuming else "suspended", info.name)
        return info

    def device_info(self, id: DevId | str) -> DeviceInfo:
        header, _ = self._ioctl(Command.DM_DEV_STATUS, _as_devid(id))
        return self._info(header)

    def device_wait(self, id: DevId | str, flags: DmFlags = DmFlags(0),
                    event_nr: int | None = None) -> tuple[DeviceInfo, list[TargetLine]]:
        """Block until the device's event number differs from *event_nr* (default: now)."""
        dev = _as_devid(id)
        flags = validate_flags(flags, DmFlags.DM_QUERY_INACTIVE_TABLE | DmFlags.DM_STATUS_TABLE)
        if event_nr is None:
            event_nr = self.device_info(dev).event_nr
        header, buf = self._ioctl(Command.DM_DEV_WAIT, dev, flags=flags, event_nr=event_nr)
        return self._info(header), ioctl.unpack_table(buf, header.data_start, header.target_count)

    def table_load(self, id: DevId | str, table: Sequence[Sequence[object]],
                   flags: DmFlags = DmFlags(0)) -> DeviceInfo:
        """Load *table* into the inactive slot (``DM_READONLY`` makes it read-only)."""
        dev = _as_devid(id)
        lines = validate_table(table)
        flags = validate_flags(flags, DmFlags.DM_READONLY | DmFlags.DM_SECURE_DATA)
        if carries_key(lines):
            flags |= DmFlags.DM_SECURE_DATA
        header, _ = self._ioctl(Command.DM_TABLE_LOAD, dev, flags=flags,
                                payload=ioctl.pack_table(lines), target_count=len(lines))
        log.info("loaded %d-line table into %s", len(lines), dev)
        return self._info(header)

    def table_clear(self, id: DevId | str) -> DeviceInfo:
        """Drop the inactive table. The device may not be renamed afterwards (see above)."""
        header, _ = self._ioctl(Command.DM_TABLE_CLEAR, _as_devid(id))
        info = self._info(header)
        self._cleared.add(info.device)
        return info

    def table_deps(self, id: DevId | str, flags: DmFlags = DmFlags(0)) -> list[tuple[int, int]]:
        """The (major, minor) of every device the table uses."""
        flags = validate_flags(flags, DmFlags.DM_QUERY_INACTIVE_TABLE)
        header, buf = self._ioctl(Command.DM_TABLE_DEPS, _as_devid(id), flags=flags)
        return [major_minor(d) for d in ioctl.unpack_deps(buf, header.data_start)]

    def table_status(self, id: DevId | str, flags: DmFlags = DmFlags(0)
                     ) -> tuple[DeviceInfo, list[TargetLine]]:
        """Status lines, or the table with ``DM_STATUS_TABLE``."""
        flags = validate_flags(
            flags, DmFlags.DM_STATUS_TABLE | DmFlags.DM_QUERY_INACTIVE_TABLE
            | DmFlags.DM_NOFLUSH | DmFlags.DM_IMA_MEASUREMENT,
        )
        if flags & DmFlags.DM_STATUS_TABLE:
            flags |= DmFlags.DM_SECURE_DATA  # a crypt table read back holds the key
        header, buf = self._ioctl(Command.DM_TABLE_STATUS, _as_devid(id), flags=flags)
        return self._info(header), ioctl.unpack_table(buf, header.data_start, header.target_count)

    def target_msg(self, id: DevId | str, sector: int | None, message: str
                   ) -> tuple[DeviceInfo, str | None]:
        """Send *message* to the target at *sector*; returns its output, if any."""
        dev = _as_devid(id)
        if not isinstance(message, str) or not message or "\0" in message:
            raise InvalidArgument("a message must be a non-empty string without NUL")
        sector = sector or 0
        if not 0 <= sector < 1 << 64:
            raise InvalidArgument("sector out of range")
        flags = DmFlags.DM_SECURE_DATA if message.split()[0] == "key" else DmFlags(0)
        header, buf = self._ioctl(Command.DM_TARGET_MSG, dev, flags=flags,
                                  payload=ioctl.pack_message(sector, message))
        out = None
        if header.flags & DmFlags.DM_DATA_OUT:
            out = ioctl.unpack_string(buf, header.data_start, header.data_size)
        return self._info(header), out


class ArmedControl:
    """A control handle armed with DM_DEV_ARM_POLL: readable at the next
    event. Arming never waits, so acknowledge() may run on an event loop."""

    def __init__(self, dm: DM) -> None:
        self._dm = dm
        dm.arm_poll()

    def fileno(self) -> int:
        return self._dm.fileno()

    def acknowledge(self) -> None:
        self._dm.arm_poll()

    def close(self) -> None:
        self._dm.close()

