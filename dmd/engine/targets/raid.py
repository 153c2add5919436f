"""raid (drivers/md/dm-raid.c, Documentation/admin-guide/device-mapper/dm-raid.rst).

``<raid type> <#raid params> <chunk size> [<optional params>] <#raid devs>
(<metadata dev> <data dev>)+`` where "-" stands for an absent device. The
kernel prints the optional params in its own fixed order, repeated ones
sorted by value; ``to_params`` does the same, so a read-back line matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Self

from dmd.engine.targets.base import (
    DEV,
    SIGNED,
    Options,
    Part,
    TargetFormatError,
    TargetParams,
    TargetStatus,
    Words,
    join,
)

# raid_status() prints the options in this order, whatever the load order was:
# (option word, field, kind); kind "flag" has no value, "list" repeats.
_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("sync", "sync", "flag"),
    ("nosync", "nosync", "flag"),
    ("rebuild", "rebuild", "list"),
    ("daemon_sleep", "daemon_sleep_ms", "uint"),
    ("min_recovery_rate", "min_recovery_rate_kbs", "uint"),
    ("max_recovery_rate", "max_recovery_rate_kbs", "uint"),
    ("write_mostly", "write_mostly", "list"),
    ("max_write_behind", "max_write_behind", "uint"),
    ("stripe_cache", "stripe_cache", "uint"),
    ("region_size", "region_size_sectors", "uint"),
    ("raid10_copies", "raid10_copies", "uint"),
    ("raid10_format", "raid10_format", "word"),
    ("delta_disks", "delta_disks", "int"),
    ("data_offset", "data_offset_sectors", "uint"),
    ("journal_dev", "journal_dev", "word"),
    ("journal_mode", "journal_mode", "word"),
)
_BY_WORD = {word: (name, kind) for word, name, kind in _OPTIONS}


@dataclass(frozen=True)
class RaidDevice(Part):
    """One metadata/data pair; ``None`` is the kernel's "-" (absent)."""

    metadata: str | None = field(default=None, metadata=DEV)
    data: str | None = field(default=None, metadata=DEV)


def _dev(word: str) -> str | None:
    return None if word == "-" else word


@dataclass(frozen=True)
class RaidParams(TargetParams):
    target_type: ClassVar[str] = "raid"
    raid_type: str
    chunk_size_sectors: int
    devices: tuple[RaidDevice, ...]
    sync: bool = False  # force initialization
    nosync: bool = False  # skip initialization
    rebuild: tuple[int, ...] = ()  # device indexes
    daemon_sleep_ms: int | None = None
    min_recovery_rate_kbs: int | None = None  # kB/s per disk
    max_recovery_rate_kbs: int | None = None
    write_mostly: tuple[int, ...] = ()  # device indexes
    max_write_behind: int | None = None
    stripe_cache: int | None = None
    region_size_sectors: int | None = None
    raid10_copies: int | None = None
    raid10_format: str | None = None  # near, far, offset
    delta_disks: int | None = field(default=None, metadata=SIGNED)
    data_offset_sectors: int | None = None
    journal_dev: str | None = field(default=None, metadata=DEV)
    journal_mode: str | None = None  # writethrough, writeback
    extra_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sync and self.nosync:
            raise TargetFormatError("raid: sync and nosync exclude each other")
        if not self.devices:
            raise TargetFormatError("raid: at least one device is needed")
        # The kernel prints repeated options sorted; keep them that way.
        object.__setattr__(self, "rebuild", tuple(sorted(self.rebuild)))
        object.__setattr__(self, "write_mostly", tuple(sorted(self.write_mostly)))

    def _options(self) -> list[str]:
        opts: list[str] = []
        for word, name, kind in _OPTIONS:
            value = getattr(self, name)
            if kind == "flag":
                opts += [word] if value else []
            elif kind == "list":
                for idx in value:
                    opts += [word, str(idx)]
            elif value is not None:
                opts += [word, str(value)]
        return opts + list(self.extra_options)

    def to_params(self) -> str:
        opts = self._options()
        devs = [join(d.metadata or "-", d.data or "-") for d in self.devices]
        return join(self.raid_type, 1 + len(opts), self.chunk_size_sectors, *opts,
                    len(self.devices), *devs)

    @classmethod
    def _parse(cls, words: Words) -> Self:
        raid_type = words.word("raid type")
        params = words.counted("raid params")
        if not params:
            raise words.error("chunk size is missing")
        opts = Options(params[1:], "raid table")
        values: dict[str, object] = {}
        lists: dict[str, list[int]] = {"rebuild": [], "write_mostly": []}
        extra: list[str] = []
        for opt in opts:
            if opt not in _BY_WORD:
                extra.append(opt)
                continue
            name, kind = _BY_WORD[opt]
            if kind == "flag":
                values[name] = True
            elif kind == "list":
                lists[name].append(opts.uint(opt))
            elif kind == "uint":
                values[name] = opts.uint(opt)
            elif kind == "int":
                values[name] = opts.signed(opt)
            else:
                values[name] = opts.value(opt)
        count = words.uint("number of raid devices")
        devices = tuple(RaidDevice(_dev(words.word("metadata device")),
                                   _dev(words.word("data device"))) for _ in range(count))
        chunk = params[0]
        if not chunk.isdigit():
            raise TargetFormatError("raid table: chunk size is not an unsigned integer")
        return cls(raid_type, int(chunk), devices, rebuild=tuple(lists["rebuild"]),
                   write_mostly=tuple(lists["write_mostly"]), extra_options=tuple(extra),
                   **values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RaidStatus(TargetStatus):
    """``<raid type> <#devices> <health chars> <sync ratio> <sync action>
    <mismatch count> <data offset> <journal char>`` (the last four since
    dm-raid 1.5/1.9/1.10; ``None`` when an older kernel leaves them out)."""

    target_type: ClassVar[str] = "raid"
    raid_type: str
    health: str  # per device: A alive in sync, a alive not in sync, D dead, - absent
    sync_done_sectors: int
    sync_total_sectors: int
    sync_action: str | None = None  # idle, frozen, resync, recover, check, repair, reshape
    mismatch_count: int | None = None
    data_offset_sectors: int | None = None
    journal: str | None = None  # A, a, D or - (no journal)
    extra: tuple[str, ...] = ()

    @property
    def in_sync(self) -> bool:
        return (self.sync_done_sectors == self.sync_total_sectors
                and set(self.health) <= {"A", "-"}
                and self.sync_action in (None, "idle"))

    @classmethod
    def _parse(cls, words: Words) -> Self:
        raid_type = words.word("raid type")
        count = words.uint("number of devices")
        health = words.word("health characters")
        if len(health) != count:
            raise words.error("one health character per device expected")
        done, total = words.ratio("sync ratio")
        action = words.word("sync action") if words.more() else None
        mismatches = words.uint("mismatch count") if words.more() else None
        data_offset = words.uint("data offset") if words.more() else None
        journal = words.word("journal character") if words.more() else None
        return cls(raid_type, health, done, total, action, mismatches, data_offset, journal,
                   words.rest())
