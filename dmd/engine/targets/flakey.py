"""flakey (drivers/md/dm-flakey.c, Documentation/admin-guide/device-mapper/dm-flakey.rst).

``<device> <offset> <up interval> <down interval> [<#features> <features>]``
with intervals in seconds. The kernel prints the feature group always (``0``
when empty), in a fixed order; flakey has no status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Self

from dmd.engine.targets.base import (
    DEV,
    Options,
    Part,
    TargetFormatError,
    TargetParams,
    Words,
    counted,
    join,
)


@dataclass(frozen=True)
class CorruptBioByte(Part):
    """``corrupt_bio_byte <Nth_byte> <r|w> <value> <bio flags>``."""

    nth_byte: int
    direction: str  # "r" or "w"
    value: int
    bio_flags: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.direction not in ("r", "w"):
            raise TargetFormatError("flakey: corrupt_bio_byte direction must be 'r' or 'w'")
        if self.nth_byte < 1 or self.value > 255:
            raise TargetFormatError("flakey: corrupt_bio_byte needs byte >= 1, value <= 255")


@dataclass(frozen=True)
class FlakeyParams(TargetParams):
    target_type: ClassVar[str] = "flakey"
    device: str = field(metadata=DEV)
    offset_sectors: int = 0
    up_interval_s: int = 0
    down_interval_s: int = 0
    error_reads: bool = False
    drop_writes: bool = False
    error_writes: bool = False
    corrupt_bio_byte: CorruptBioByte | None = None
    random_read_corrupt: int | None = None  # probability in 1e-9 units (Linux 6.5+)
    random_write_corrupt: int | None = None
    extra_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.drop_writes and self.error_writes:
            raise TargetFormatError("flakey: drop_writes and error_writes exclude each other")

    def _features(self) -> list[str]:
        # flakey_status() order.
        feats: list[str] = []
        if self.error_reads:
            feats.append("error_reads")
        if self.drop_writes:
            feats.append("drop_writes")
        if self.error_writes:
            feats.append("error_writes")
        c = self.corrupt_bio_byte
        if c is not None:
            feats += ["corrupt_bio_byte", str(c.nth_byte), c.direction, str(c.value),
                      str(c.bio_flags)]
        if self.random_read_corrupt is not None:
            feats += ["random_read_corrupt", str(self.random_read_corrupt)]
        if self.random_write_corrupt is not None:
            feats += ["random_write_corrupt", str(self.random_write_corrupt)]
        return feats + list(self.extra_features)

    def to_params(self) -> str:
        return join(self.device, self.offset_sectors, self.up_interval_s,
                    self.down_interval_s, *counted(self._features()))

    @classmethod
    def _parse(cls, words: Words) -> Self:
        device = words.word("device")
        offset = words.uint("offset")
        up = words.uint("up interval")
        down = words.uint("down interval")
        flags: dict[str, bool] = {}
        corrupt: CorruptBioByte | None = None
        rand_read: int | None = None
        rand_write: int | None = None
        extra: list[str] = []
        opts = Options(words.counted("features") if words.more() else (), "flakey table")
        for opt in opts:
            if opt in ("error_reads", "drop_writes", "error_writes"):
                flags[opt] = True
            elif opt == "corrupt_bio_byte":
                corrupt = CorruptBioByte(opts.uint(opt), opts.value(opt), opts.uint(opt),
                                         opts.uint(opt))
            elif opt == "random_read_corrupt":
                rand_read = opts.uint(opt)
            elif opt == "random_write_corrupt":
                rand_write = opts.uint(opt)
            else:
                extra.append(opt)
        return cls(device, offset, up, down, corrupt_bio_byte=corrupt,
                   random_read_corrupt=rand_read, random_write_corrupt=rand_write,
                   extra_features=tuple(extra), **flags)
