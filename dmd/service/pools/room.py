"""The room on a pool's devices: what no metadata, data or thick volume uses.

The pool's metadata and data are carved from the front of its devices (each
after its 4 MiB header), and grow into what is left; thick volumes take
their segments from the same room, so every segment of every device belongs
to at most one of them. A thick volume deleted leaves a hole, which the
next allocation (thick or the pool's own growth) fills first.
"""

from __future__ import annotations

from collections.abc import Iterable

from dmd.engine import TargetLine
from dmd.service import errors
from dmd.state import PoolLayout, Segment, Thick

HEADER_SECTORS = 8192  # 4 MiB at the start of every pool device
DEFAULT_STRIPE_SECTORS = 128  # 64 KiB, LVM's default stripe size
MIN_STRIPE_SECTORS, MAX_STRIPE_SECTORS = 8, 8192  # 4 KiB to 4 MiB


def free_segments(layout: PoolLayout, sizes: tuple[int, ...] | None = None,
                  taken: Iterable[Segment] = ()) -> list[Segment]:
    """Every stretch of the pool's devices after their headers that neither
    the pool's metadata, its spare and its data nor the *taken* segments
    (thick volumes') use, by device then offset."""
    used: dict[int, list[Segment]] = {}
    for seg in (*layout.metadata, *layout.spare, *layout.data, *taken):
        used.setdefault(seg.device, []).append(seg)
    free = []
    for index, size in enumerate(sizes or layout.sizes):
        at = HEADER_SECTORS
        for seg in sorted(used.get(index, []), key=lambda s: s.start):
            if seg.start > at:
                free.append(Segment(index, at, seg.start - at))
            at = max(at, seg.start + seg.length)
        if size // 512 > at:
            free.append(Segment(index, at, size // 512 - at))
    return free


def room_sectors(layout: PoolLayout, taken: Iterable[Segment] = ()) -> int:
    return sum(s.length for s in free_segments(layout, taken=taken))


def carve(layout: PoolLayout, sectors: int, taken: Iterable[Segment] = ()
          ) -> tuple[Segment, ...]:
    """*sectors* of room, in segments from the first device on."""
    pieces: list[Segment] = []
    for seg in free_segments(layout, taken=taken):
        if sectors <= 0:
            break
        length = min(seg.length, sectors)
        pieces.append(Segment(seg.device, seg.start, length))
        sectors -= length
    if sectors > 0:
        raise errors.InvalidArgument("the pool's devices have no room for that")
    return tuple(pieces)


def check_stripes(layout: PoolLayout, stripes: int, stripe_size: int | None) -> int:
    """The stripe size in sectors (0 for a linear volume)."""
    if not isinstance(stripes, int) or not 1 <= stripes <= len(layout.devices):
        raise errors.InvalidArgument(
            f"stripes is 1 to the pool's {len(layout.devices)} device(s), not {stripes!r}")
    if stripes == 1:
        if stripe_size is not None:
            raise errors.InvalidArgument("stripe-size goes with stripes above 1")
        return 0
    if stripe_size is None:
        return DEFAULT_STRIPE_SECTORS
    sectors = stripe_size // 512
    if (stripe_size % 512 or not MIN_STRIPE_SECTORS <= sectors <= MAX_STRIPE_SECTORS
            or sectors & (sectors - 1)):
        raise errors.InvalidArgument(f"stripe-size is a power of two from "
                                     f"{MIN_STRIPE_SECTORS * 512} to "
                                     f"{MAX_STRIPE_SECTORS * 512} bytes, not {stripe_size}")
    return sectors


def stripe_width(sectors: int, stripes: int, stripe_sectors: int) -> int:
    """Sectors on each device for *sectors* over *stripes* devices: whole
    chunks (the kernel refuses a width that is not)."""
    width = -(-sectors // stripes)
    return -(-width // stripe_sectors) * stripe_sectors


def allocate(layout: PoolLayout, sectors: int, stripes: int, stripe_sectors: int,
             taken: Iterable[Segment]) -> tuple[Segment, ...]:
    """Room for *sectors* more of a thick volume: linear, any segments (first
    fit, from the first device on); striped, one stretch of the stripe width
    on each of *stripes* devices (the devices with the largest free stretch).
    The segments given make a striped volume's size whole stripes."""
    taken = tuple(taken)
    if stripes == 1:
        return carve(layout, sectors, taken)
    width = stripe_width(sectors, stripes, stripe_sectors)
    largest: dict[int, Segment] = {}
    for seg in free_segments(layout, taken=taken):
        if seg.length >= width and (seg.device not in largest
                                    or seg.length > largest[seg.device].length):
            largest[seg.device] = seg
    if len(largest) < stripes:
        raise errors.InvalidArgument(
            f"the pool has room for {width * 512} bytes in one stretch on "
            f"{len(largest)} device(s); {stripes} stripes need it on {stripes}")
    chosen = sorted(largest.values(), key=lambda s: (-s.length, s.device))[:stripes]
    return tuple(Segment(s.device, s.start, width) for s in sorted(chosen,
                                                                   key=lambda s: s.device))


def thick_table(layout: PoolLayout, thick: Thick) -> list[TargetLine]:
    """The volume's table: a linear line per segment, or a striped line per
    run of *stripes* segments."""
    lines: list[TargetLine] = []
    at = 0
    if thick.stripes == 1:
        for seg in thick.segments:
            lines.append(TargetLine(at, seg.length, "linear",
                                    f"{layout.devices[seg.device]} {seg.start}"))
            at += seg.length
        return lines
    segments = list(thick.segments)
    for first in range(0, len(segments), thick.stripes):
        run = segments[first:first + thick.stripes]
        areas = " ".join(f"{layout.devices[s.device]} {s.start}" for s in run)
        length = run[0].length * thick.stripes
        lines.append(TargetLine(at, length, "striped",
                                f"{thick.stripes} {thick.stripe_sectors} {areas}"))
        at += length
    return lines
