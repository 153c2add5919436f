"""thin-pool and thin (drivers/md/dm-thin.c,
Documentation/admin-guide/device-mapper/thin-provisioning.rst).

``thin-pool <metadata dev> <data dev> <data block size> <low water mark>
[<#features> <features>]`` (block size in sectors, low water mark in data
blocks); ``thin <pool dev> <dev id> [<external origin dev>]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Self

from dmd.engine.targets.base import (
    DEV,
    Options,
    TargetParams,
    TargetStatus,
    Words,
    counted,
    join,
)

_POOL_FLAGS = ("skip_block_zeroing", "ignore_discard", "no_discard_passdown", "read_only",
               "error_if_no_space")


@dataclass(frozen=True)
class ThinPoolParams(TargetParams):
    target_type: ClassVar[str] = "thin-pool"
    metadata_device: str = field(metadata=DEV)
    data_device: str = field(metadata=DEV)
    block_size_sectors: int = 128
    low_water_mark_blocks: int = 0
    skip_block_zeroing: bool = False
    ignore_discard: bool = False
    no_discard_passdown: bool = False
    read_only: bool = False
    error_if_no_space: bool = False
    extra_features: tuple[str, ...] = ()

    def to_params(self) -> str:
        # emit_flags() order; the kernel always prints the count, "0" included.
        feats = [name for name in _POOL_FLAGS if getattr(self, name)]
        return join(self.metadata_device, self.data_device, self.block_size_sectors,
                    self.low_water_mark_blocks, *counted(feats + list(self.extra_features)))

    @classmethod
    def _parse(cls, words: Words) -> Self:
        metadata = words.word("metadata device")
        data = words.word("data device")
        block_size = words.uint("data block size")
        low_water = words.uint("low water mark")
        flags: dict[str, bool] = {}
        extra: list[str] = []
        for opt in Options(words.counted("features") if words.more() else (), "thin-pool"):
            if opt in _POOL_FLAGS:
                flags[opt] = True
            else:
                extra.append(opt)
        return cls(metadata, data, block_size, low_water, extra_features=tuple(extra), **flags)


@dataclass(frozen=True)
class ThinPoolStatus(TargetStatus):
    """``<transaction id> <used>/<total metadata blocks> <used>/<total data blocks>
    <held metadata root|-> <rw|ro|out_of_data_space> <discard mode>
    <error|queue>_if_no_space <needs_check|-> <metadata low water mark>``.
    """

    target_type: ClassVar[str] = "thin-pool"
    transaction_id: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    used_data_blocks: int
    total_data_blocks: int
    held_metadata_root: int | None
    mode: str  # "rw", "ro" or "out_of_data_space"
    discards: str  # "discard_passdown", "no_discard_passdown" or "ignore_discard"
    no_space_policy: str | None = None  # "error_if_no_space" / "queue_if_no_space"
    needs_check: bool = False
    metadata_low_water_mark_blocks: int | None = None
    extra: tuple[str, ...] = ()

    @property
    def read_only(self) -> bool:
        return self.mode == "ro"

    @classmethod
    def _parse(cls, words: Words) -> Self:
        transaction = words.uint("transaction id")
        meta_used, meta_total = words.ratio("metadata blocks")
        data_used, data_total = words.ratio("data blocks")
        held = words.uint_or_dash("held metadata root")
        mode = words.word("mode")
        discards = words.word("discard mode")
        policy = words.word("no-space policy") if words.more() else None
        needs_check = words.word("needs_check") == "needs_check" if words.more() else False
        low_water = words.uint("metadata low water mark") if words.more() else None
        return cls(transaction, meta_used, meta_total, data_used, data_total, held, mode,
                   discards, policy, needs_check, low_water, words.rest())


@dataclass(frozen=True)
class ThinParams(TargetParams):
    target_type: ClassVar[str] = "thin"
    pool_device: str = field(metadata=DEV)
    device_id: int = 0
    external_origin: str | None = field(default=None, metadata=DEV)

    def to_params(self) -> str:
        origin = [self.external_origin] if self.external_origin is not None else []
        return join(self.pool_device, self.device_id, *origin)

    @classmethod
    def _parse(cls, words: Words) -> Self:
        pool = words.word("pool device")
        dev_id = words.uint("device id")
        origin = words.word("external origin") if words.more() else None
        return cls(pool, dev_id, origin)


@dataclass(frozen=True)
class ThinStatus(TargetStatus):
    """``<mapped sectors> <highest mapped sector|->``."""

    target_type: ClassVar[str] = "thin"
    mapped_sectors: int
    highest_mapped_sector: int | None
    extra: tuple[str, ...] = ()

    @classmethod
    def _parse(cls, words: Words) -> Self:
        mapped = words.uint("mapped sectors")
        highest = words.uint_or_dash("highest mapped sector")
        return cls(mapped, highest, words.rest())
