"""log-writes (drivers/md/dm-log-writes.c, Documentation/admin-guide/device-mapper/log-writes.rst).

``<device> <log device>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Self

from dmd.engine.targets.base import DEV, TargetParams, TargetStatus, Words, join


@dataclass(frozen=True)
class LogWritesParams(TargetParams):
    target_type: ClassVar[str] = "log-writes"
    device: str = field(metadata=DEV)
    log_device: str = field(metadata=DEV)

    def to_params(self) -> str:
        return join(self.device, self.log_device)

    @classmethod
    def _parse(cls, words: Words) -> Self:
        return cls(words.word("device"), words.word("log device"))


@dataclass(frozen=True)
class LogWritesStatus(TargetStatus):
    """``<#logged entries> <highest allocated sector>`` (of the log device)."""

    target_type: ClassVar[str] = "log-writes"
    logged_entries: int
    highest_allocated_sector: int
    extra: tuple[str, ...] = ()

    @classmethod
    def _parse(cls, words: Words) -> Self:
        return cls(words.uint("logged entries"), words.uint("highest allocated sector"),
                   words.rest())
