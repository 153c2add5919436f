"""cache (drivers/md/dm-cache-target.c, Documentation/admin-guide/device-mapper/cache.rst).

``<metadata dev> <cache dev> <origin dev> <block size> <#features> <features>
<policy> <#policy args> <policy args>`` (block size in sectors). The kernel
prints everything after the three devices back exactly as it was loaded.
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

IO_MODES = ("writethrough", "writeback", "passthrough")


def _pairs(words: tuple[str, ...], what: str) -> tuple[tuple[str, str], ...]:
    if len(words) % 2:
        raise TargetFormatError(f"{what} must be key/value pairs")
    return tuple((words[i], words[i + 1]) for i in range(0, len(words), 2))


@dataclass(frozen=True)
class CacheParams(TargetParams):
    target_type: ClassVar[str] = "cache"
    metadata_device: str = field(metadata=DEV)
    cache_device: str = field(metadata=DEV)
    origin_device: str = field(metadata=DEV)
    block_size_sectors: int = 512
    io_mode: str | None = None  # writethrough (kernel default), writeback, passthrough
    metadata2: bool = False
    no_discard_passdown: bool = False
    policy: str = "default"
    policy_args: tuple[tuple[str, str], ...] = ()  # e.g. (("migration_threshold", "2048"),)
    extra_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.io_mode is not None and self.io_mode not in IO_MODES:
            raise TargetFormatError(f"cache: io_mode must be one of {', '.join(IO_MODES)}")
        for pair in self.policy_args:
            if len(pair) != 2:
                raise TargetFormatError("cache: policy_args must be (key, value) pairs")

    def _features(self) -> list[str]:
        feats = ["metadata2"] if self.metadata2 else []
        if self.io_mode is not None:
            feats.append(self.io_mode)
        if self.no_discard_passdown:
            feats.append("no_discard_passdown")
        return feats + list(self.extra_features)

    def to_params(self) -> str:
        args = [word for pair in self.policy_args for word in pair]
        return join(self.metadata_device, self.cache_device, self.origin_device,
                    self.block_size_sectors, *counted(self._features()), self.policy,
                    *counted(args))

    @classmethod
    def _parse(cls, words: Words) -> Self:
        metadata = words.word("metadata device")
        cache = words.word("cache device")
        origin = words.word("origin device")
        block_size = words.uint("block size")
        io_mode: str | None = None
        flags: dict[str, bool] = {}
        extra: list[str] = []
        for opt in Options(words.counted("features"), "cache table"):
            if opt in IO_MODES:
                io_mode = opt
            elif opt in ("metadata2", "no_discard_passdown"):
                flags[opt] = True
            else:
                extra.append(opt)
        policy = words.word("policy")
        policy_args = _pairs(words.counted("policy args"), "cache policy args")
        return cls(metadata, cache, origin, block_size, io_mode, policy=policy,
                   policy_args=policy_args, extra_features=tuple(extra), **flags)


@dataclass(frozen=True)
class CacheStatus(TargetStatus):
    """See cache.rst "Status"; block counts are cache blocks unless named metadata."""

    target_type: ClassVar[str] = "cache"
    metadata_block_sectors: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    cache_block_sectors: int
    used_cache_blocks: int
    total_cache_blocks: int
    read_hits: int
    read_misses: int
    write_hits: int
    write_misses: int
    demotions: int
    promotions: int
    dirty_blocks: int
    features: tuple[str, ...]
    core_args: tuple[str, ...]  # key/value words, e.g. migration_threshold 2048
    policy: str
    policy_args: tuple[str, ...]
    metadata_mode: str  # "rw" or "ro"
    needs_check: bool = False
    extra: tuple[str, ...] = ()

    @property
    def io_mode(self) -> str:
        return next((f for f in self.features if f in IO_MODES), "writethrough")

    @property
    def migration_threshold(self) -> int | None:
        args = self.core_args
        for i in range(0, len(args) - 1, 2):
            if args[i] == "migration_threshold" and args[i + 1].isdigit():
                return int(args[i + 1])
        return None

    @classmethod
    def _parse(cls, words: Words) -> Self:
        md_block = words.uint("metadata block size")
        md_used, md_total = words.ratio("metadata blocks")
        block = words.uint("cache block size")
        used, total = words.ratio("cache blocks")
        read_hits = words.uint("read hits")
        read_misses = words.uint("read misses")
        write_hits = words.uint("write hits")
        write_misses = words.uint("write misses")
        demotions = words.uint("demotions")
        promotions = words.uint("promotions")
        dirty = words.uint("dirty blocks")
        features = words.counted("features")
        core = words.counted("core args")
        policy = words.word("policy")
        policy_args = words.counted("policy args")
        mode = words.word("metadata mode")
        needs_check = words.word("needs_check") == "needs_check" if words.more() else False
        return cls(md_block, md_used, md_total, block, used, total, read_hits, read_misses,
                   write_hits, write_misses, demotions, promotions, dirty,
                   features=features, core_args=core, policy=policy,
                   policy_args=policy_args, metadata_mode=mode, needs_check=needs_check,
                   extra=words.rest())
