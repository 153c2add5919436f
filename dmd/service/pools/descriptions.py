"""Reading and writing a pool's description on its own devices (the format
is dmd.state.pool_description), and deciding, at start-up, which of the
database and the devices is right.

The rule: SQLite's ``generation`` moves with every committed change; the
description follows it at the end of every operation. After a crash the
devices may be one generation behind (the description is rewritten) or, with
a database restored from an old backup or a lost one, ahead (the devices
win, and dmd says so in the log). A pool whose description no copy on any
device can vouch for is never written to again by this dmd.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dmd.engine.interface import Engine
from dmd.state import PoolRecord, VolumeRecord
from dmd.state.pool_description import (
    BLOCK,
    COPY_OFFSETS,
    HEADER_BYTES,
    LABEL_OFFSET,
    Description,
    DescriptionError,
    DeviceReading,
    Label,
    read_device,
)

log = logging.getLogger(__name__)

Kernel = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Found:
    """What a pool's devices say of it, read as one."""

    readings: tuple[DeviceReading, ...]
    unreadable: tuple[tuple[str, str], ...]  # (path, why) of devices not read

    @property
    def newest(self) -> Description | None:
        whole = [r.newest for r in self.readings if r.newest is not None]
        return max(whole, key=lambda d: d.generation, default=None)

    @property
    def corrupt(self) -> bool:
        """Some copy was written, and none anywhere is whole."""
        return self.newest is None and any(
            isinstance(c, DescriptionError) for r in self.readings for c in r.copies)


class Descriptions:
    """The description I/O of every pool, through the engine's workers."""

    def __init__(self, kernel: Kernel,
                 fault: Callable[[str, int], None] | None = None) -> None:
        self.kernel = kernel
        # The tests' crash hook, called as ("pool-describe", 1) between the
        # two copies' writes: the moment a crash leaves them different.
        self.fault = fault
        self.written: dict[str, int] = {}  # pool UUID -> generation on its devices
        self.labelled: dict[str, tuple[str, ...]] = {}  # pool UUID -> device UUIDs

    async def read(self, paths: Sequence[str]) -> Found:
        readings, unreadable = [], []
        for path in paths:
            try:
                head = await self.kernel(Engine.read_disk, path, 0, HEADER_BYTES)
                readings.append(read_device(path, head))
            except (OSError, DescriptionError) as exc:
                unreadable.append((path, str(exc)))
        return Found(tuple(readings), tuple(unreadable))

    async def write(self, pool: PoolRecord, volumes: Sequence[VolumeRecord],
                    pending: dict[str, Any] | None = None) -> None:
        """Write *pool*'s description at its generation: labels first where
        this dmd has not written them, then copy A on every device, then
        copy B (each write durable before the next begins)."""
        layout = pool.layout
        if self.labelled.get(pool.uuid) != layout.ids:
            await self.label(pool)
        raw = Description(pool.generation, pool, tuple(volumes), pending).encode()
        for number, offset in enumerate(COPY_OFFSETS):
            if number and self.fault is not None:
                self.fault("pool-describe", number)
            for path in layout.devices:
                await self.kernel(Engine.write_disk, path, offset, raw)
        self.written[pool.uuid] = pool.generation

    async def label(self, pool: PoolRecord) -> None:
        """Write the label of every device of *pool*'s layout: before the
        pool is recorded, so a pool dmd knows always has them (start-up
        re-creates a pool's devices only over disks whose labels say so)."""
        layout = pool.layout
        for index, path in enumerate(layout.devices):
            label = Label(pool.uuid, layout.ids[index], index, len(layout.devices))
            await self.kernel(Engine.write_disk, path, LABEL_OFFSET, label.encode())
        self.labelled[pool.uuid] = layout.ids

    async def read_label(self, path: str) -> tuple[Label | None, str]:
        """The label on *path* (None when there is none, or it cannot be
        read), and why there is none."""
        try:
            label = Label.decode(await self.kernel(Engine.read_disk, path, LABEL_OFFSET,
                                                   BLOCK))
        except (OSError, DescriptionError) as exc:
            return None, str(exc)
        return label, "no dmd pool label" if label is None else ""

    async def unlabel(self, paths: Sequence[str], ids: Sequence[str]) -> None:
        """Wipe the label of each of *paths* that still carries one of *ids*
        (a create or a grow undone: the device is free again); a label that
        is not one of them (a name now another disk's) is left alone."""
        for path in paths:
            label, _ = await self.read_label(path)
            if label is not None and label.device_uuid in ids:
                await self.kernel(Engine.wipe, path, LABEL_OFFSET, BLOCK)

    async def repair(self, pool: PoolRecord, volumes: Sequence[VolumeRecord],
                     found: Found) -> None:
        """Rewrite the copies that do not hold *pool*'s generation whole."""
        raw = Description(pool.generation, pool, tuple(volumes)).encode()
        for reading in found.readings:
            for copy in reading.stale(pool.generation):
                log.warning("pool %s: %s: description copy %s is %s; rewritten from the "
                            "other", pool.name, reading.path, "AB"[copy],
                            _what(reading.copies[copy]))
                await self.kernel(Engine.write_disk, reading.path, COPY_OFFSETS[copy], raw)
        self.written[pool.uuid] = pool.generation
        self.labelled[pool.uuid] = pool.layout.ids

    async def wipe(self, paths: Sequence[str], pool_uuid: str) -> None:
        """Zero the header of each device (label and both copies): a device
        of a destroyed pool is a blank device again."""
        for path in paths:
            await self.kernel(Engine.wipe, path, 0, HEADER_BYTES)
        self.written.pop(pool_uuid, None)
        self.labelled.pop(pool_uuid, None)


def _what(copy: Description | DescriptionError | None) -> str:
    if copy is None:
        return "missing"
    if isinstance(copy, DescriptionError):
        return f"unreadable ({copy})"
    return f"at generation {copy.generation}"
