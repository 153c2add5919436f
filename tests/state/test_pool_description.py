"""The on-device pool description: what is written reads back the same, a
torn or corrupt copy is named as such (never taken for a pool), and the
newest whole copy wins."""

from __future__ import annotations

import uuid

import pytest

from dmd.state.pool_description import (
    BLOCK,
    COPY_OFFSETS,
    COPY_SIZE,
    HEADER_BYTES,
    Description,
    DescriptionError,
    Label,
    read_device,
)
from dmd.state.pool_records import PoolLayout, PoolRecord, Segment, VolumeRecord

POOL_UUID = str(uuid.uuid4())
DEVICES = (str(uuid.uuid4()), str(uuid.uuid4()))


def pool(transaction_id: int = 3) -> PoolRecord:
    layout = PoolLayout(("/dev/loop0", "/dev/loop1"), (128 << 20, 256 << 20),
                        (Segment(0, 8192, 4096),),
                        (Segment(0, 12288, 249856), Segment(1, 8192, 516096)), DEVICES)
    return PoolRecord("tank", POOL_UUID, 0, 128, "queue", 20, transaction_id, 7, layout)


def volumes(count: int = 2) -> tuple[VolumeRecord, ...]:
    base = VolumeRecord(str(uuid.uuid4()), "tank", "base", 0, 20 << 30, None, 1000,
                        {"role": "image"})
    snaps = tuple(VolumeRecord(str(uuid.uuid4()), "tank", f"vm{i}", i + 1, 20 << 30,
                               base.uuid, 1000, {"guest": f"vm{i}"}, active=i % 2 == 0)
                  for i in range(count - 1))
    return (base, *snaps)


def description(generation: int = 5, count: int = 2) -> Description:
    return Description(generation, pool(), volumes(count))


def head_with(*copies: bytes | None, label: Label | None = None) -> bytes:
    head = bytearray(HEADER_BYTES)
    if label is not None:
        head[:BLOCK] = label.encode()
    for offset, raw in zip(COPY_OFFSETS, copies, strict=False):
        if raw is not None:
            head[offset:offset + len(raw)] = raw
    return bytes(head)


def test_a_description_reads_back_as_written() -> None:
    written = description()
    back = Description.decode(written.encode())
    assert back == written
    assert back is not None and back.volumes[1].origin_uuid == back.volumes[0].uuid


def test_a_label_reads_back_and_names_the_device() -> None:
    label = Label(POOL_UUID, DEVICES[1], 1, 2)
    block = label.encode()
    assert len(block) == BLOCK and block.startswith(b"DMDPOOL\x01")
    assert Label.decode(block) == label
    assert Label.decode(bytes(BLOCK)) is None
    assert Label.decode(b"XFSB" + bytes(BLOCK - 4)) is None


def test_a_corrupt_label_is_an_error_not_a_blank_device() -> None:
    block = bytearray(Label(POOL_UUID, DEVICES[0], 0, 2).encode())
    block[20] ^= 1
    with pytest.raises(DescriptionError, match="checksum"):
        Label.decode(bytes(block))


def test_never_written_is_none_and_a_flipped_bit_is_an_error() -> None:
    assert Description.decode(bytes(COPY_SIZE)) is None
    raw = bytearray(description().encode())
    raw[200] ^= 0x20  # inside the payload
    with pytest.raises(DescriptionError, match="checksum"):
        Description.decode(bytes(raw))
    torn = description().encode()[:100] + bytes(COPY_SIZE)  # the header, part of the rest
    with pytest.raises(DescriptionError):
        Description.decode(torn)


def test_the_newest_whole_copy_wins_and_the_other_is_stale() -> None:
    old, new = description(4).encode(), description(5).encode()
    reading = read_device("/dev/loop0", head_with(new, old,
                                                  label=Label(POOL_UUID, DEVICES[0], 0, 2)))
    assert reading.newest is not None and reading.newest.generation == 5
    assert reading.stale(5) == (1,)
    corrupt = bytearray(new)
    corrupt[300] ^= 1
    reading = read_device("/dev/loop0", head_with(bytes(corrupt), old))
    assert reading.newest is not None and reading.newest.generation == 4
    assert isinstance(reading.copies[0], DescriptionError)
    assert reading.stale(4) == (0,)
    assert read_device("/dev/loop0", bytes(HEADER_BYTES)).newest is None


def test_a_thousand_volumes_fit_in_a_copy() -> None:
    raw = description(count=1000).encode()
    assert len(raw) <= COPY_SIZE
    back = Description.decode(raw)
    assert back is not None and len(back.volumes) == 1000


def test_a_description_too_large_for_its_room_is_refused() -> None:
    big = Description(1, pool(), tuple(
        VolumeRecord(str(uuid.uuid4()), "tank", f"v{i}", i, 1 << 30, None, 0,
                     {"note": "x" * 400}) for i in range(5000)))
    with pytest.raises(DescriptionError, match="holds"):
        big.encode()
