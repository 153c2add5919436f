"""writecache (drivers/md/dm-writecache.c, Documentation/admin-guide/device-mapper/writecache.rst).

``<p|s> <origin dev> <cache dev> <block size> <#feature args> <feature args>``
(block size in bytes; p = persistent memory, s = SSD). Times are printed
back through jiffies, so they come back rounded to the kernel's tick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Self

from dmd.engine.targets.base import (
    DEV,
    Options,
    TargetFormatError,
    TargetParams,
    TargetStatus,
    Words,
    counted,
    join,
)

# (option word, field) with one numeric value, in writecache_status() order.
_VALUES = (
    ("start_sector", "start_sector"),
    ("high_watermark", "high_watermark_percent"),
    ("low_watermark", "low_watermark_percent"),
    ("writeback_jobs", "writeback_jobs"),
    ("autocommit_blocks", "autocommit_blocks"),
    ("autocommit_time", "autocommit_time_ms"),
    ("max_age", "max_age_ms"),
)
_BY_WORD = dict(_VALUES)


@dataclass(frozen=True, kw_only=True)
class WritecacheParams(TargetParams):
    """Keyword-only: the origin and cache devices are too easy to swap."""

    target_type: ClassVar[str] = "writecache"
    origin_device: str = field(metadata=DEV)
    cache_device: str = field(metadata=DEV)
    mode: str = "s"
    block_size_bytes: int = 4096
    start_sector: int | None = None  # where on the cache device the cache starts
    high_watermark_percent: int | None = None
    low_watermark_percent: int | None = None
    writeback_jobs: int | None = None
    autocommit_blocks: int | None = None
    autocommit_time_ms: int | None = None
    max_age_ms: int | None = None
    cleaner: bool = False
    fua: bool | None = None  # pmem only: True "fua", False "nofua", None default
    metadata_only: bool = False
    pause_writeback_ms: int | None = None
    extra_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("p", "s"):
            raise TargetFormatError("writecache: mode must be 'p' (pmem) or 's' (SSD)")

    def _features(self) -> list[str]:
        feats: list[str] = []
        for word, name in _VALUES:
            if getattr(self, name) is not None:
                feats += [word, str(getattr(self, name))]
        if self.cleaner:
            feats.append("cleaner")
        if self.fua is not None:
            feats.append("fua" if self.fua else "nofua")
        if self.metadata_only:
            feats.append("metadata_only")
        if self.pause_writeback_ms is not None:
            feats += ["pause_writeback", str(self.pause_writeback_ms)]
        return feats + list(self.extra_features)

    def to_params(self) -> str:
        return join(self.mode, self.origin_device, self.cache_device, self.block_size_bytes,
                    *counted(self._features()))

    @classmethod
    def _parse(cls, words: Words) -> Self:
        mode = words.word("mode")
        origin = words.word("origin device")
        cache = words.word("cache device")
        block_size = words.uint("block size")
        values: dict[str, object] = {}
        extra: list[str] = []
        opts = Options(words.counted("feature args"), "writecache table")
        for opt in opts:
            if opt in _BY_WORD:
                values[_BY_WORD[opt]] = opts.uint(opt)
            elif opt in ("cleaner", "metadata_only"):
                values[opt] = True
            elif opt in ("fua", "nofua"):
                values["fua"] = opt == "fua"
            elif opt == "pause_writeback":
                values["pause_writeback_ms"] = opts.uint(opt)
            else:
                extra.append(opt)
        return cls(origin_device=origin, cache_device=cache, mode=mode,
                   block_size_bytes=block_size, extra_features=tuple(extra),
                   **values)  # type: ignore[arg-type]


_STATS = ("reads", "read_hits", "writes", "write_hits_uncommitted", "write_hits_committed",
          "writes_around", "writes_allocate", "writes_blocked_on_freelist", "flushes",
          "discards")


@dataclass(frozen=True)
class WritecacheStatus(TargetStatus):
    """``<error> <#blocks> <#free blocks> <#blocks under writeback>`` and,
    since Linux 5.15, ten counters (``None`` on older kernels)."""

    target_type: ClassVar[str] = "writecache"
    error: int  # 0, or the errno that put the cache in error state
    total_blocks: int
    free_blocks: int
    writeback_blocks: int
    reads: int | None = None
    read_hits: int | None = None
    writes: int | None = None
    write_hits_uncommitted: int | None = None
    write_hits_committed: int | None = None
    writes_around: int | None = None
    writes_allocate: int | None = None
    writes_blocked_on_freelist: int | None = None
    flushes: int | None = None
    discards: int | None = None
    extra: tuple[str, ...] = ()

    @classmethod
    def _parse(cls, words: Words) -> Self:
        error = words.uint("error")
        total = words.uint("blocks")
        free = words.uint("free blocks")
        writeback = words.uint("blocks under writeback")
        stats: dict[str, int] = {}
        for name in _STATS:
            if not words.more():
                break
            stats[name] = words.uint(name.replace("_", " "))
        return cls(error, total, free, writeback, **stats, extra=words.rest())
