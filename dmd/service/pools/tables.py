"""The tables dmd loads for a pool and its thin volumes, and the DM UUID of a
volume's device: the one home of each (a thick volume's table is made with
its room: dmd.service.pools.room)."""

from __future__ import annotations

from dmd.engine import TargetLine, mapper_path
from dmd.engine.targets.thin import ThinPoolParams
from dmd.service.pools.names import PoolPart, pool_device, tpool
from dmd.state import PoolLayout, PoolRecord, Segment


def linear(layout: PoolLayout, segments: tuple[Segment, ...]) -> list[TargetLine]:
    """*segments* of the pool's devices, end to end (its data or metadata)."""
    lines, at = [], 0
    for seg in segments:
        lines.append(TargetLine(at, seg.length, "linear",
                                f"{layout.devices[seg.device]} {seg.start}"))
        at += seg.length
    return lines


def pool_table(record: PoolRecord, *, fail_writes: bool = False) -> list[TargetLine]:
    """*fail_writes*: writes to the full pool fail, whatever its on-full (a
    queueing pool past its no-space-timeout)."""
    data = record.layout.data_sectors
    low_water = data // record.block_sectors * record.low_water_percent // 100
    params = ThinPoolParams(mapper_path(pool_device(record.name, PoolPart.TMETA)),
                            mapper_path(pool_device(record.name, PoolPart.TDATA)),
                            record.block_sectors, low_water,
                            error_if_no_space=fail_writes or record.on_full == "error")
    return [TargetLine(0, data, "thin-pool", params.to_params())]


def part_table(record: PoolRecord, part: PoolPart) -> list[TargetLine]:
    """The table of one of the pool's own devices, as its record lays it out."""
    if part is PoolPart.TPOOL:
        return pool_table(record)
    layout = record.layout
    return linear(layout, layout.metadata if part is PoolPart.TMETA else layout.data)


# What the DM UUID of every device dmd makes begins with.
DMD_UUID_PREFIX = "DMD-"


def pool_part_uuid(pool_uuid: str, part: PoolPart) -> str:
    """The device-mapper UUID of one of the pool's own devices."""
    return f"{DMD_UUID_PREFIX}POOL-{pool_uuid}-{part}"


def thin_table(pool: str, thin_id: int, size_bytes: int) -> list[TargetLine]:
    return [TargetLine(0, size_bytes // 512, "thin", f"{mapper_path(tpool(pool))} {thin_id}")]


def volume_uuid(uuid: str) -> str:
    """The device-mapper UUID of the device of the volume with UUID *uuid*."""
    return f"{DMD_UUID_PREFIX}VOL-{uuid}"
