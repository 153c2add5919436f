"""dust (drivers/md/dm-dust.c, Documentation/admin-guide/device-mapper/dm-dust.rst).

``<device> <offset> <block size>`` (block size in bytes). Not built into
every kernel (Debian's 6.1 lacks CONFIG_DM_DUST).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Self

from dmd.engine.targets.base import DEV, TargetParams, TargetStatus, Words, join


@dataclass(frozen=True)
class DustParams(TargetParams):
    target_type: ClassVar[str] = "dust"
    device: str = field(metadata=DEV)
    offset_sectors: int = 0
    block_size_bytes: int = 512

    def to_params(self) -> str:
        return join(self.device, self.offset_sectors, self.block_size_bytes)

    @classmethod
    def _parse(cls, words: Words) -> Self:
        return cls(words.word("device"), words.uint("offset"), words.uint("block size"))


@dataclass(frozen=True)
class DustStatus(TargetStatus):
    """``<device> <fail_read_on_bad_block|bypass> <quiet|verbose>``."""

    target_type: ClassVar[str] = "dust"
    device: str
    fail_read_on_bad_block: bool
    quiet: bool
    extra: tuple[str, ...] = ()

    @classmethod
    def _parse(cls, words: Words) -> Self:
        device = words.word("device")
        mode = words.word("mode")
        if mode not in ("fail_read_on_bad_block", "bypass"):
            raise words.error("mode must be fail_read_on_bad_block or bypass")
        verbosity = words.word("verbosity")
        if verbosity not in ("quiet", "verbose"):
            raise words.error("verbosity must be quiet or verbose")
        return cls(device, mode == "fail_read_on_bad_block", verbosity == "quiet",
                   words.rest())
