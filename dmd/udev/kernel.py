"""The kernel's own news: device-mapper's global event, read on the event loop.

After DM_DEV_ARM_POLL on a control handle, poll() on it reports the next
time the kernel creates, removes or renames a device, swaps a table in, or a
target raises an event (thin-pool low water mark, a failed mirror leg, a
multipath path). It says nothing of which device: the reconciler lists them.
Arming is a cheap ioctl that never waits, so it runs on the loop thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from dmd.engine import CONTROL_PATH, DM, DmError, UdevSync

log = logging.getLogger(__name__)


class KernelEvents:
    def __init__(self, on_event: Callable[[], None], control: str = CONTROL_PATH) -> None:
        self._on_event = on_event
        self._control = control
        self._dm: DM | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        # A handle of its own: the armed state belongs to the open file.
        self._dm = DM(self._control, udev_sync=UdevSync.NONE)
        self._dm.arm_poll()
        self._loop = loop
        loop.add_reader(self._dm.fileno(), self._readable)

    def close(self) -> None:
        if self._dm is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._dm.fileno())
            self._dm.close()
            self._dm = None

    def _readable(self) -> None:
        assert self._dm is not None
        try:
            self._dm.arm_poll()  # before acting: an event during the sync re-arms us
        except DmError as exc:
            log.error("kernel events: cannot re-arm (%s); relying on udev and audits", exc)
            self.close()
            return
        self.events += 1
        self._on_event()
