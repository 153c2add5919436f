"""delay (drivers/md/dm-delay.c, Documentation/admin-guide/device-mapper/delay.rst).

``<device> <offset> <delay> [<write_device> <write_offset> <write_delay>
[<flush_device> <flush_offset> <flush_delay>]]`` with delays in milliseconds.
The kernel prints back as many classes as were loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Self

from dmd.engine.targets.base import (
    DEV,
    Part,
    TargetFormatError,
    TargetParams,
    TargetStatus,
    Words,
    join,
)


@dataclass(frozen=True)
class DelayClass(Part):
    """Where one class of I/O (reads, writes or flushes) goes, and how late."""

    device: str = field(metadata=DEV)
    offset_sectors: int = 0
    delay_ms: int = 0

    def words(self) -> list[object]:
        return [self.device, self.offset_sectors, self.delay_ms]


def _delay_class(words: Words) -> DelayClass:
    return DelayClass(words.word("device"), words.uint("offset"), words.uint("delay"))


@dataclass(frozen=True)
class DelayParams(TargetParams):
    target_type: ClassVar[str] = "delay"
    read: DelayClass
    write: DelayClass | None = None  # None: writes go with reads
    flush: DelayClass | None = None  # None: flushes go with writes

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.flush is not None and self.write is None:
            raise TargetFormatError("delay: a flush class needs a write class")

    def to_params(self) -> str:
        parts = self.read.words()
        for cls in (self.write, self.flush):
            if cls is not None:
                parts += cls.words()
        return join(*parts)

    @classmethod
    def _parse(cls, words: Words) -> Self:
        read = _delay_class(words)
        write = _delay_class(words) if words.more() else None
        flush = _delay_class(words) if words.more() else None
        return cls(read, write, flush)


@dataclass(frozen=True)
class DelayStatus(TargetStatus):
    """``<reads> <writes> <flushes>``: I/Os currently held back, per class."""

    target_type: ClassVar[str] = "delay"
    delayed_reads: int
    delayed_writes: int
    delayed_flushes: int | None = None  # before dm-delay 1.3 there were two fields
    extra: tuple[str, ...] = ()

    @classmethod
    def _parse(cls, words: Words) -> Self:
        reads = words.uint("reads")
        writes = words.uint("writes")
        flushes = words.uint("flushes") if words.more() else None
        return cls(reads, writes, flushes, words.rest())
