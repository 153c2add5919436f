"""The udev door: uevents for dm devices, read on the event loop, handed to
the reconciler as plain records.

The monitor listens to udev (not the kernel): a uevent arrives after udev's
rules have run, carrying the symlinks and the filesystem blkid found. Its
socket gets a large receive buffer so a storm of hundreds of devices fits;
when it overflows anyway (ENOBUFS), the loss is reported and everything is
compared with the kernel. Nothing here opens a block device.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pyudev

from dmd.service.devices.inventory import UdevInfo
from dmd.service.devices.reconcile import UdevEvent

log = logging.getLogger(__name__)

# What systemd-udevd itself asks for its monitor; needs CAP_NET_ADMIN to go
# past net.core.rmem_max (libudev uses SO_RCVBUFFORCE).
RECEIVE_BUFFER = 128 << 20


def udev_info(properties: Any, initialized: bool = True) -> UdevInfo:
    """UdevInfo from a device's udev properties (a mapping)."""
    links = properties.get("DEVLINKS", "")
    disabled = properties.get("DM_UDEV_DISABLE_OTHER_RULES_FLAG") == "1"
    return UdevInfo(
        symlinks=tuple(sorted(links.split())),
        fs_type=properties.get("ID_FS_TYPE", ""),
        fs_uuid=properties.get("ID_FS_UUID", ""),
        ready=initialized and bool(properties.get("DM_NAME")) and not disabled,
    )


def _is_dm(device: pyudev.Device) -> bool:
    return bool(device.sys_name.startswith("dm-"))


def _event(device: pyudev.Device) -> UdevEvent | None:
    if not _is_dm(device) or not device.device_number:
        return None
    number = device.device_number
    properties = device.properties
    return UdevEvent(
        action=device.action or "change",
        device=(os.major(number), os.minor(number)),
        name=properties.get("DM_NAME") or None,
        info=udev_info(properties),
    )


class UdevMonitor:
    """Feeds ``on_event`` with every dm uevent and calls ``on_lost`` when
    some were dropped (receive buffer overflow, a broken socket)."""

    def __init__(self, on_event: Callable[[UdevEvent], None], on_lost: Callable[[], None],
                 *, receive_buffer: int = RECEIVE_BUFFER) -> None:
        self._on_event, self._on_lost = on_event, on_lost
        self._context = pyudev.Context()
        self._receive_buffer = receive_buffer
        self._monitor: pyudev.Monitor | None = None
        self._socket: socket.socket | None = None  # a dup of the monitor's, to read SO_ERROR
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events = 0
        self.overflows = 0

    def start(self) -> None:
        """Open the socket: from here on no uevent is lost (they queue in it
        until ``attach``)."""
        monitor = pyudev.Monitor.from_netlink(self._context, source="udev")
        monitor.filter_by(subsystem="block", device_type="disk")
        try:
            monitor.set_receive_buffer_size(self._receive_buffer)
        except OSError as exc:  # not root: the kernel's default maximum
            log.warning("udev monitor: receive buffer stays small: %s", exc)
        monitor.start()
        self._monitor = monitor
        self._socket = socket.fromfd(monitor.fileno(), socket.AF_NETLINK, socket.SOCK_RAW)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start handing events over from *loop*."""
        assert self._monitor is not None, "start() first"
        self._loop = loop
        loop.add_reader(self._monitor.fileno(), self._readable)
        self._readable()  # what queued before attach

    def known_devices(self) -> Iterator[tuple[tuple[int, int], UdevInfo]]:
        """udev's database entry for every dm device it has processed."""
        for device in self._context.list_devices(subsystem="block", DEVTYPE="disk"):
            if _is_dm(device) and device.device_number:
                number = device.device_number
                yield ((os.major(number), os.minor(number)),
                       udev_info(device.properties, device.is_initialized))

    def close(self) -> None:
        if self._monitor is not None and self._loop is not None:
            self._loop.remove_reader(self._monitor.fileno())
        if self._socket is not None:
            self._socket.close()
        self._monitor = self._socket = None

    def _overflowed(self, exc: OSError) -> bool:
        """Whether *exc* means lost uevents. The overflow comes as ENOBUFS from
        recvmsg, or, when pyudev's poll sees it first, as a bare "Error while
        polling" (POLLERR) with the ENOBUFS left pending on the socket."""
        if exc.errno == errno.ENOBUFS:
            return True
        if exc.errno is None and self._socket is not None:
            return self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ENOBUFS
        return False

    def _readable(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        while True:
            try:
                device = monitor.poll(timeout=0)
            except OSError as exc:
                if self._overflowed(exc):
                    self.overflows += 1
                    log.warning("udev monitor overflowed: uevents were lost")
                    self._on_lost()
                    continue  # the socket stays usable after ENOBUFS
                log.error("udev monitor failed (%s); reopening it", exc)
                self.close()
                self._reopen()
                return
            if device is None:
                return
            event = _event(device)
            if event is not None:
                self.events += 1
                self._on_event(event)

    def _reopen(self) -> None:
        loop = self._loop
        try:
            self.start()
            if loop is not None:
                self.attach(loop)
        except OSError as exc:
            log.error("udev monitor could not be reopened: %s", exc)
        self._on_lost()
