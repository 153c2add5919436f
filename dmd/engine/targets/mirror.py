"""mirror (drivers/md/dm-raid1.c, with its dirty logs in drivers/md/dm-log.c).

``<log type> <#log args> <log args> <#mirrors> (<device> <offset>)+
[<#features> handle_errors keep_log]``. The core log's args are
``<region size> [sync|nosync]``, the disk log's ``<log device> <region size>
[sync|nosync]``; other log types (userspace) are kept as raw args.
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
    TargetStatus,
    Words,
    join,
    optional_counted,
    parse_uint,
)

_SYNC = ("sync", "nosync")


@dataclass(frozen=True)
class MirrorLog(Part):
    """The dirty region log. ``sync``: "sync" forces a resync, "nosync" skips it."""

    type: str = "core"
    region_size_sectors: int | None = None
    device: str | None = field(default=None, metadata=DEV)  # the disk log's device
    sync: str | None = None
    args: tuple[str, ...] = ()  # the args of log types other than core and disk

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.type in ("core", "disk"):
            if self.region_size_sectors is None or self.args:
                raise TargetFormatError(f"mirror: a {self.type} log needs region_size_sectors "
                                        "and no raw args")
            if (self.type == "disk") != (self.device is not None):
                raise TargetFormatError("mirror: only a disk log has a device, and it must")
            if self.sync is not None and self.sync not in _SYNC:
                raise TargetFormatError("mirror: log sync must be 'sync' or 'nosync'")
        elif self.region_size_sectors is not None or self.device or self.sync:
            raise TargetFormatError(f"mirror: give the {self.type} log's args as raw args")

    def words(self) -> list[str]:
        if self.type not in ("core", "disk"):
            args = list(self.args)
        else:
            args = [self.device] if self.device is not None else []
            args.append(str(self.region_size_sectors))
            if self.sync is not None:
                args.append(self.sync)
        return [self.type, str(len(args)), *args]

    @classmethod
    def parse(cls, words: Words) -> MirrorLog:
        log_type = words.word("log type")
        args = words.counted("log args")
        if log_type not in ("core", "disk"):
            return cls(log_type, args=args)
        rest = list(args)
        device = rest.pop(0) if log_type == "disk" and rest else None
        if not rest:
            raise words.error(f"the {log_type} log's region size is missing")
        region = parse_uint(rest.pop(0), "mirror log region size")
        sync = rest.pop(0) if rest else None
        if rest:
            raise words.error(f"too many {log_type} log args")
        return cls(log_type, region, device, sync)


@dataclass(frozen=True)
class MirrorLeg(Part):
    device: str = field(metadata=DEV)
    offset_sectors: int = 0


@dataclass(frozen=True)
class MirrorParams(TargetParams):
    target_type: ClassVar[str] = "mirror"
    log: MirrorLog
    legs: tuple[MirrorLeg, ...]
    handle_errors: bool = False
    keep_log: bool = False
    extra_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.legs) < 2:
            raise TargetFormatError("mirror: at least two legs are needed")

    def to_params(self) -> str:
        legs = [join(leg.device, leg.offset_sectors) for leg in self.legs]
        feats = [name for name, on in (("handle_errors", self.handle_errors),
                                       ("keep_log", self.keep_log)) if on]
        return join(*self.log.words(), len(self.legs), *legs,
                    *optional_counted(feats + list(self.extra_features)))

    @classmethod
    def _parse(cls, words: Words) -> Self:
        log = MirrorLog.parse(words)
        count = words.uint("number of mirrors")
        legs = tuple(MirrorLeg(words.word("device"), words.uint("offset"))
                     for _ in range(count))
        flags: dict[str, bool] = {}
        extra: list[str] = []
        for opt in Options(words.counted("features") if words.more() else (), "mirror"):
            if opt in ("handle_errors", "keep_log"):
                flags[opt] = True
            else:
                extra.append(opt)
        return cls(log, legs, extra_features=tuple(extra), **flags)


@dataclass(frozen=True)
class MirrorStatus(TargetStatus):
    """``<#mirrors> <device>* <in sync>/<total regions> <#args> <health chars>
    <#log args> <log type> <log args>`` (health per leg: A alive, D dead,
    S sync failure, R read failure, F flush failure, U unclassified)."""

    target_type: ClassVar[str] = "mirror"
    devices: tuple[str, ...]
    in_sync_regions: int
    total_regions: int
    health: str
    log_status: tuple[str, ...]  # "core", or "disk <device> <A|D|F>"
    extra: tuple[str, ...] = ()

    @property
    def in_sync(self) -> bool:
        return self.in_sync_regions == self.total_regions

    @classmethod
    def _parse(cls, words: Words) -> Self:
        count = words.uint("number of mirrors")
        devices = tuple(words.word("device") for _ in range(count))
        in_sync, total = words.ratio("regions in sync")
        args = words.counted("status args")
        if not args:
            raise words.error("health characters are missing")
        log_status = words.counted("log status args")
        return cls(devices, in_sync, total, args[0], log_status, args[1:] + words.rest())
