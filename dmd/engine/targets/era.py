"""era (drivers/md/dm-era-target.c, Documentation/admin-guide/device-mapper/era.rst).

``<metadata dev> <origin dev> <block size>`` (block size in sectors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Self

from dmd.engine.targets.base import DEV, TargetParams, TargetStatus, Words, join


@dataclass(frozen=True)
class EraParams(TargetParams):
    target_type: ClassVar[str] = "era"
    metadata_device: str = field(metadata=DEV)
    origin_device: str = field(metadata=DEV)
    block_size_sectors: int = 128

    def to_params(self) -> str:
        return join(self.metadata_device, self.origin_device, self.block_size_sectors)

    @classmethod
    def _parse(cls, words: Words) -> Self:
        return cls(words.word("metadata device"), words.word("origin device"),
                   words.uint("block size"))


@dataclass(frozen=True)
class EraStatus(TargetStatus):
    """``<metadata block size> <used>/<total metadata blocks> <current era>
    <held metadata root|->``."""

    target_type: ClassVar[str] = "era"
    metadata_block_sectors: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    current_era: int
    held_metadata_root: int | None
    extra: tuple[str, ...] = ()

    @classmethod
    def _parse(cls, words: Words) -> Self:
        block = words.uint("metadata block size")
        used, total = words.ratio("metadata blocks")
        era = words.uint("current era")
        held = words.uint_or_dash("held metadata root")
        return cls(block, used, total, era, held, words.rest())
