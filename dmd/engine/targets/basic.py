"""linear, striped, zero and error (drivers/md/dm-linear.c, dm-stripe.c, dm-zero.c, dm-target.c)."""

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
class LinearParams(TargetParams):
    """``<device> <offset>``."""

    target_type: ClassVar[str] = "linear"
    device: str = field(metadata=DEV)
    offset_sectors: int = 0

    def to_params(self) -> str:
        return join(self.device, self.offset_sectors)

    @classmethod
    def _parse(cls, words: Words) -> Self:
        return cls(words.word("device"), words.uint("offset"))


@dataclass(frozen=True)
class Stripe(Part):
    device: str = field(metadata=DEV)
    offset_sectors: int = 0


@dataclass(frozen=True)
class StripedParams(TargetParams):
    """``<#stripes> <chunk size> (<device> <offset>)+``."""

    target_type: ClassVar[str] = "striped"
    chunk_size_sectors: int
    stripes: tuple[Stripe, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stripes:
            raise TargetFormatError("striped: at least one stripe is needed")

    def to_params(self) -> str:
        legs = [join(s.device, s.offset_sectors) for s in self.stripes]
        return join(len(self.stripes), self.chunk_size_sectors, *legs)

    @classmethod
    def _parse(cls, words: Words) -> Self:
        count = words.uint("number of stripes")
        chunk = words.uint("chunk size")
        stripes = tuple(Stripe(words.word("device"), words.uint("offset")) for _ in range(count))
        return cls(chunk, stripes)


@dataclass(frozen=True)
class StripedStatus(TargetStatus):
    """``<#stripes> <device>* 1 <health chars>`` ('A' alive, 'D' dead, per stripe)."""

    target_type: ClassVar[str] = "striped"
    devices: tuple[str, ...]
    health: str
    extra: tuple[str, ...] = ()

    @property
    def all_alive(self) -> bool:
        return set(self.health) <= {"A"}

    @classmethod
    def _parse(cls, words: Words) -> Self:
        count = words.uint("number of stripes")
        devices = tuple(words.word("device") for _ in range(count))
        args = words.counted("status args")
        if not args:
            raise words.error("health characters are missing")
        return cls(devices, args[0], args[1:] + words.rest())


@dataclass(frozen=True)
class ZeroParams(TargetParams):
    """No arguments: reads return zeros, writes are dropped."""

    target_type: ClassVar[str] = "zero"

    def to_params(self) -> str:
        return ""

    @classmethod
    def _parse(cls, words: Words) -> Self:
        return cls()


@dataclass(frozen=True)
class ErrorParams(TargetParams):
    """No arguments: every I/O fails."""

    target_type: ClassVar[str] = "error"

    def to_params(self) -> str:
        return ""

    @classmethod
    def _parse(cls, words: Words) -> Self:
        return cls()
