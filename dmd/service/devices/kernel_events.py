"""The kernel's own news: device-mapper's global event, read on the event loop.

The engine's event source (``Engine.open_events``: an armed control handle on
the kernel, a pipe or FIFO on the simulator) becomes readable the next time a
device is created, removed or renamed, a table is swapped in, or a target
raises an event (thin-pool low water mark, a failed mirror leg, a multipath
path). It says nothing of which device: the reconciler lists them.
Re-arming never waits, so it runs on the loop thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from dmd.engine import DmError
from dmd.engine.interface import Engine, KernelEventSource

log = logging.getLogger(__name__)


class KernelEventWatcher:
    def __init__(self, engine: Engine, on_event: Callable[[], None]) -> None:
        self._engine = engine
        self._on_event = on_event
        self._source: KernelEventSource | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._source = self._engine.open_events()
        self._loop = loop
        loop.add_reader(self._source.fileno(), self._readable)

    def close(self) -> None:
        if self._source is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._source.fileno())
            self._source.close()
            self._source = None

    def _readable(self) -> None:
        assert self._source is not None
        try:
            self._source.acknowledge()  # before acting: an event during the sync re-arms us
        except (DmError, OSError) as exc:
            log.error("kernel events: cannot re-arm (%s); relying on udev and audits", exc)
            self.close()
            return
        self.events += 1
        self._on_event()
