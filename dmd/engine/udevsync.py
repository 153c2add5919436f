"""Knowing when udev is done with a device, without libdm's SysV semaphores.

libdm passes a semaphore "cookie" in ``event_nr`` and blocks until udev's rules
decrement it; those semaphores leak whenever a process dies in between. dmd
only puts udev *flags* in the cookie's high half (so the rules treat our
devices like dmsetup's) and listens on udev's own netlink multicast group for
the event udevd broadcasts once it has run every rule and RUN program for the
device: a ``change`` carrying our DM_COOKIE and the device's name after a
resume or rename, a ``remove`` after a remove. The socket is opened before the
ioctl, so the event cannot slip by. If the socket cannot be had, or it
overflows, dmd falls back to watching what udev leaves behind: the
``/dev/mapper/<name>`` link on the right dev_t and udev's database record.

Without a running udevd (containers, initramfs, tests) the engine can create
and remove the ``/dev/mapper`` nodes itself, as libdm's fallback does.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dmd.engine.types import DM_UDEV_FLAGS_SHIFT, UdevFlags

log = logging.getLogger(__name__)

UDEV_CONTROL = Path("/run/udev/control")
UDEV_DATA = Path("/run/udev/data")

# What dmsetup sends when udev runs: udev owns the nodes (no library fallback)
# and our uevent is the primary one, so 10-dm.rules and 13-dm-disk.rules run
# in full (by-id links, blkid, systemd units).
DEFAULT_UDEV_FLAGS = (
    UdevFlags.DM_UDEV_PRIMARY_SOURCE_FLAG | UdevFlags.DM_UDEV_DISABLE_LIBRARY_FALLBACK
)


class UdevSync(enum.Enum):
    """How the engine learns that a device's node is ready."""

    WAIT = "wait"  # udevd runs: wait for its links and database record
    NODES = "nodes"  # no udevd: create and remove /dev/mapper nodes ourselves
    NONE = "none"  # neither: return as soon as the ioctl does

    @classmethod
    def detect(cls) -> UdevSync:
        return cls.WAIT if UDEV_CONTROL.exists() else cls.NODES


class UdevTimeout(TimeoutError):
    """udev did not finish with a device in time."""


def cookie(flags: UdevFlags = DEFAULT_UDEV_FLAGS) -> int:
    """The ``event_nr`` value carrying udev flags and no semaphore."""
    return int(flags) << DM_UDEV_FLAGS_SHIFT


NETLINK_KOBJECT_UEVENT = 15
UDEV_MONITOR_GROUP = 2  # udevd re-broadcasts processed events here (group 1 is the kernel's)
_UDEV_MAGIC = 0xFEEDCAFE
_UDEV_HEADER = struct.Struct("=8sIIII")  # prefix, magic (big-endian), header size, props off/len

Properties = dict[str, str]


def parse_udev_message(data: bytes) -> Properties | None:
    """Decode one libudev monitor message; None for anything else."""
    if len(data) < _UDEV_HEADER.size or not data.startswith(b"libudev\0"):
        return None
    _prefix, magic_be, _size, props_off, props_len = _UDEV_HEADER.unpack_from(data)
    if socket.ntohl(magic_be) != _UDEV_MAGIC:
        return None
    props: Properties = {}
    for item in data[props_off : props_off + props_len].split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            props[key.decode(errors="replace")] = value.decode(errors="replace")
    return props


class UdevEvents:
    """A udev monitor socket opened before an ioctl, read after it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_KOBJECT_UEVENT)
        try:
            # Room for a storm of other devices' events while we wait for ours.
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, UDEV_MONITOR_GROUP))

    def close(self) -> None:
        self.sock.close()

    def wait(self, match: Callable[[Properties], bool], deadline: float) -> bool:
        """True once an event satisfies *match*; False on timeout or overflow."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return False
            try:
                data = self.sock.recv(1 << 16)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    return False  # events were lost: let the caller look instead
                raise
            props = parse_udev_message(data)
            if props is not None and match(props):
                return True


class UdevWait:
    """udev's work after one ioctl, not waited for by the call that made it:
    its caller goes on meanwhile, and waits (``wait``: blocking, on a worker
    thread) once it needs the node, or gives up (``close``). The monitor
    socket was opened before the ioctl, so no event is missed however late
    the wait begins. ``device_suspend`` and ``device_remove`` make one when
    given a list to add it to."""

    def __init__(self, wait: Callable[[UdevEvents | None], None],
                 events: UdevEvents | None, what: str, name: str = "") -> None:
        # *name*: the device's, for a caller that keeps waits by device
        self._wait, self._events, self.what, self.name = wait, events, what, name

    def wait(self) -> None:
        """Until udev has done its work (UdevTimeout if it does not)."""
        try:
            self._wait(self._events)
        finally:
            self.close()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def _is_device(props: Properties, device: tuple[int, int]) -> bool:
    return props.get("MAJOR") == str(device[0]) and props.get("MINOR") == str(device[1])


class NodeWatcher:
    """Waits for (or makes) /dev/mapper nodes according to a UdevSync mode."""

    def __init__(self, mode: UdevSync, dev_dir: Path = Path("/dev"),
                 udev_data: Path = UDEV_DATA, timeout: float = 10.0) -> None:
        self.mode = mode
        self.mapper_dir = dev_dir / "mapper"
        self.udev_data = udev_data
        self.timeout = timeout

    def open_events(self) -> UdevEvents | None:
        """udev's monitor socket, opened before an ioctl (WAIT mode; None
        when there is none: the wait polls instead). The caller closes it."""
        if self.mode is UdevSync.WAIT:
            try:
                return UdevEvents()
            except OSError as exc:
                log.debug("no udev monitor socket (%s): will poll instead", exc)
        return None

    def now_or_later(self, wait: UdevWait, later: list[UdevWait] | None) -> None:
        """Wait for udev now, or hand *wait* to *later* (its caller's, to wait
        for once it needs the node). Without udevd the wait is the engine's
        own work on the node, done now whatever the caller asked: a wait
        given up must never leave a node naming a freed device number."""
        if later is None or self.mode is not UdevSync.WAIT:
            wait.wait()
        else:
            later.append(wait)

    @contextlib.contextmanager
    def listening(self) -> Iterator[UdevEvents | None]:
        """Open udev's monitor socket for the span of one operation (WAIT mode)."""
        events = self.open_events()
        try:
            yield events
        finally:
            if events is not None:
                events.close()

    def _event_then_poll(self, events: UdevEvents | None, match: Callable[[Properties], bool],
                         done: Callable[[], bool], what: str, timeout: float | None,
                         device: tuple[int, int]) -> None:
        limit = self.timeout if timeout is None else timeout
        if events is not None:
            if events.wait(match, time.monotonic() + limit):
                return
            log.warning("udev's event for %s was not seen; checking its results instead", what)
        self._poll(done, what, 0.0 if events is not None else timeout, device)

    def node(self, name: str) -> Path:
        return self.mapper_dir / name

    def _node_is(self, name: str, device: tuple[int, int]) -> bool:
        try:
            st = os.stat(self.node(name))
        except OSError:
            return False
        return stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == device

    def _db_names(self, device: tuple[int, int], name: str) -> bool:
        try:
            record = (self.udev_data / f"b{device[0]}:{device[1]}").read_text()
        except OSError:
            return False
        return f"S:mapper/{name}\n" in record or f"E:DM_NAME={name}\n" in record

    def _poll(self, done: object, what: str, timeout: float | None,
              device: tuple[int, int] | None = None) -> None:
        assert callable(done)
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        delay = 0.0005
        while not done():
            if time.monotonic() >= deadline:
                raise UdevTimeout(f"udev did not finish {what} within {limit:g} s"
                                  + (f" ({self._describe(device)})" if device else ""))
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _describe(self, device: tuple[int, int]) -> str:
        """What udev has done so far, for the timeout message."""
        db = self.udev_data / f"b{device[0]}:{device[1]}"
        try:
            names = [ln[2:] for ln in db.read_text().splitlines()
                     if ln.startswith(("S:mapper/", "E:DM_NAME="))]
            record = f"udev record lists {names}"
        except OSError:
            record = "no udev record"
        links = sorted(p.name for p in self.mapper_dir.iterdir()
                       if p.name != "control" and self._node_is(p.name, device)
                       ) if self.mapper_dir.is_dir() else []
        return f"{record}; /dev/mapper links to {device[0]}:{device[1]}: {links}"

    def appeared(self, name: str, device: tuple[int, int], events: UdevEvents | None = None,
                 timeout: float | None = None) -> None:
        """After a resume: udev has processed the device and its node is usable."""
        if self.mode is UdevSync.WAIT:
            self._event_then_poll(
                events,
                lambda p: p.get("ACTION") == "change" and _is_device(p, device)
                and "DM_COOKIE" in p and p.get("DM_NAME") == name,
                lambda: self._node_is(name, device) and self._db_names(device, name),
                f"adding /dev/mapper/{name}", timeout, device,
            )
        elif self.mode is UdevSync.NODES:
            self._make_node(name, device)

    def disappeared(self, name: str, device: tuple[int, int], events: UdevEvents | None = None,
                    timeout: float | None = None) -> None:
        """After a remove: udev has forgotten the device and its node."""
        if self.mode is UdevSync.WAIT:
            db = self.udev_data / f"b{device[0]}:{device[1]}"
            self._event_then_poll(
                events,
                lambda p: p.get("ACTION") == "remove" and _is_device(p, device),
                lambda: not self._node_is(name, device) and not db.exists(),
                f"removing /dev/mapper/{name}", timeout, device,
            )
        elif self.mode is UdevSync.NODES:
            self._drop_node(name, device)

    def renamed(self, old: str, new: str, device: tuple[int, int],
                events: UdevEvents | None = None, timeout: float | None = None) -> None:
        """After a rename: udev has processed the new name."""
        if self.mode is UdevSync.WAIT:
            self._event_then_poll(
                events,
                lambda p: p.get("ACTION") == "change" and _is_device(p, device)
                and "DM_COOKIE" in p and p.get("DM_NAME") == new,
                lambda: self._node_is(new, device) and self._db_names(device, new),
                f"renaming /dev/mapper/{old} to {new}", timeout, device,
            )
        elif self.mode is UdevSync.NODES:
            self._drop_node(old, device)
            self._make_node(new, device)

    def _make_node(self, name: str, device: tuple[int, int]) -> None:
        if self._node_is(name, device):
            return
        self.mapper_dir.mkdir(parents=True, exist_ok=True)
        path = self.node(name)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(*device))
        log.debug("made node %s for %d:%d", path, *device)

    def _drop_node(self, name: str, device: tuple[int, int]) -> None:
        if not self._node_is(name, device):
            return
        try:
            self.node(name).unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
