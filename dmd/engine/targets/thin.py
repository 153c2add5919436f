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


# -- the pool's messages (thin-provisioning.rst, "Pool messages") -------------
# The kernel commits the pool's metadata after every message, so each one is
# durable on its own; a sequence of them is made atomic by the transaction id
# (see set_transaction_id), which is how LVM and dmd's pools protect thin ids.

MAX_THIN_ID = (1 << 24) - 1  # MAX_DEV_ID in dm-thin.c

# THIN_METADATA_MAX_SECTORS in dm-thin-metadata.h: 255 index blocks of 2^14
# entries, 4 KiB blocks; a larger metadata device is only used up to this.
MAX_METADATA_SECTORS = 255 * (1 << 14) * 8
MIN_METADATA_SECTORS = 2 * 2048  # thin-provisioning.rst: "round it up to 2MB"
MIN_BLOCK_SECTORS = 128  # 64 KiB: DATA_DEV_BLOCK_SIZE_MIN_SECTORS
MAX_BLOCK_SECTORS = 2 * 1024 * 1024  # 1 GiB: DATA_DEV_BLOCK_SIZE_MAX_SECTORS


def _thin_id(value: int, what: str = "thin id") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_THIN_ID:
        raise ValueError(f"{what} must be an integer from 0 to {MAX_THIN_ID}, not {value!r}")
    return value


def create_thin(thin_id: int) -> str:
    """A new, empty thin device *thin_id* in the pool."""
    return f"create_thin {_thin_id(thin_id)}"


def create_snap(thin_id: int, origin_id: int) -> str:
    """Thin device *thin_id* as a snapshot of *origin_id*. If the origin is
    active it must be suspended while this is sent (its in-flight writes
    would otherwise race the copy of its mappings)."""
    return f"create_snap {_thin_id(thin_id)} {_thin_id(origin_id, 'origin id')}"


def delete(thin_id: int) -> str:
    """Drop thin device *thin_id* and free the blocks only it maps."""
    return f"delete {_thin_id(thin_id)}"


def set_transaction_id(current: int, new: int) -> str:
    """Replace the pool's transaction id *current* by *new* (the kernel
    refuses it when the pool's id is not *current*)."""
    for value in (current, new):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
            raise ValueError(f"a transaction id is a 64-bit unsigned integer, not {value!r}")
    return f"set_transaction_id {current} {new}"


def metadata_sectors(data_sectors: int, block_sectors: int) -> int:
    """The metadata device size the kernel's documentation recommends for a
    pool of *data_sectors* in blocks of *block_sectors*: 48 bytes a data
    block, at least 2 MiB, at most what the kernel can use; rounded up to a
    4 KiB metadata block."""
    if block_sectors <= 0 or data_sectors <= 0:
        raise ValueError("sizes must be positive")
    wanted = -(-48 * (data_sectors // block_sectors) // 512)
    wanted = min(max(wanted, MIN_METADATA_SECTORS), MAX_METADATA_SECTORS)
    return -(-wanted // 8) * 8


def valid_block_sectors(block_sectors: int) -> bool:
    """The kernel takes a data block size that is a multiple of 64 KiB
    from 64 KiB to 1 GiB."""
    return (MIN_BLOCK_SECTORS <= block_sectors <= MAX_BLOCK_SECTORS
            and block_sectors % MIN_BLOCK_SECTORS == 0)
