"""Byte layout of the device-mapper ioctl protocol (include/uapi/linux/dm-ioctl.h).

Pure packing and unpacking: no file descriptors, no system calls, so every
byte can be unit-tested on a machine without device-mapper. Offsets and sizes
are asserted against the header in tests/engine/test_ioctl_layout.py.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from dmd.engine.types import (
    DM_MAX_TYPE_NAME,
    DM_NAME_LEN,
    DM_UUID_LEN,
    DmFlags,
    TargetLine,
    TargetVersion,
)

# struct dm_ioctl {
#   __u32 version[3]; __u32 data_size; __u32 data_start; __u32 target_count;
#   __s32 open_count; __u32 flags; __u32 event_nr; __u32 padding; __u64 dev;
#   char name[128]; char uuid[129]; char data[7]; };
DM_IOCTL = struct.Struct(f"=3IIIIiIIIQ{DM_NAME_LEN}s{DM_UUID_LEN}s7s")
DM_IOCTL_SIZE = DM_IOCTL.size  # 312
# struct dm_target_spec { __u64 sector_start; __u64 length; __s32 status;
#   __u32 next; char target_type[16]; };  params follow.
DM_TARGET_SPEC = struct.Struct(f"=QQiI{DM_MAX_TYPE_NAME}s")
# struct dm_target_deps { __u32 count; __u32 padding; __u64 dev[]; };
DM_TARGET_DEPS = struct.Struct("=II")
# struct dm_name_list { __u64 dev; __u32 next; char name[]; }; since 4.37 the
# name is followed (8-aligned) by __u32 event_nr; __u32 flags; char uuid[].
DM_NAME_LIST = struct.Struct("=QI")
DM_NAME_LIST_EXTRA = struct.Struct("=II")
DM_NAME_LIST_FLAG_HAS_UUID = 1
DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID = 2
# struct dm_target_versions { __u32 next; __u32 version[3]; char name[]; };
DM_TARGET_VERSIONS = struct.Struct("=I3I")
# struct dm_target_msg { __u64 sector; char message[]; };
DM_TARGET_MSG = struct.Struct("=Q")

# The interface version we speak. The kernel refuses a client whose major
# differs or whose minor is newer than its own; 4.0.0 is accepted everywhere
# and the kernel answers with its own version in the same field.
CLIENT_VERSION = (4, 0, 0)
# Kernels since 4.37 append event_nr, flags and UUID to each DM_LIST_DEVICES entry.
NAME_LIST_EXTRA_SINCE = (4, 37)

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_READ_WRITE = 3
DM_IOCTL_TYPE = 0xFD


class Command(enum.IntEnum):
    """The ioctl commands, numbered as in enum in dm-ioctl.h."""

    DM_VERSION = 0
    DM_REMOVE_ALL = 1
    DM_LIST_DEVICES = 2
    DM_DEV_CREATE = 3
    DM_DEV_REMOVE = 4
    DM_DEV_RENAME = 5
    DM_DEV_SUSPEND = 6
    DM_DEV_STATUS = 7
    DM_DEV_WAIT = 8
    DM_TABLE_LOAD = 9
    DM_TABLE_CLEAR = 10
    DM_TABLE_DEPS = 11
    DM_TABLE_STATUS = 12
    DM_LIST_VERSIONS = 13
    DM_TARGET_MSG = 14
    DM_DEV_SET_GEOMETRY = 15
    DM_DEV_ARM_POLL = 16
    DM_GET_TARGET_VERSION = 17

    @property
    def request(self) -> int:
        """The ioctl request number: _IOWR(0xfd, nr, struct dm_ioctl)."""
        return (
            (_IOC_READ_WRITE << (_IOC_NRBITS + _IOC_TYPEBITS + _IOC_SIZEBITS))
            | (DM_IOCTL_SIZE << (_IOC_NRBITS + _IOC_TYPEBITS))
            | (DM_IOCTL_TYPE << _IOC_NRBITS)
            | int(self)
        )


def align8(value: int) -> int:
    return (value + 7) & ~7


def _cstr(raw: bytes) -> str:
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded ``struct dm_ioctl``."""

    version: tuple[int, int, int]
    data_size: int
    data_start: int
    target_count: int
    open_count: int
    flags: int
    event_nr: int
    dev: int
    name: str
    uuid: str


def pack_header(
    *,
    data_size: int,
    name: str = "",
    uuid: str = "",
    flags: int = 0,
    event_nr: int = 0,
    dev: int = 0,
    target_count: int = 0,
    data_start: int = DM_IOCTL_SIZE,
) -> bytes:
    return DM_IOCTL.pack(
        *CLIENT_VERSION,
        data_size,
        data_start,
        target_count,
        0,
        flags,
        event_nr,
        0,
        dev,
        _encode(name),
        _encode(uuid),
        b"",
    )


def unpack_header(buf: bytes | bytearray | memoryview) -> Header:
    (v0, v1, v2, data_size, data_start, target_count, open_count, flags, event_nr, _pad,
     dev, name, uuid, _data) = DM_IOCTL.unpack_from(buf, 0)
    return Header(
        (v0, v1, v2), data_size, data_start, target_count, open_count, flags, event_nr, dev,
        _cstr(name), _cstr(uuid),
    )


def pack_table(table: list[TargetLine]) -> bytes:
    """The DM_TABLE_LOAD payload: specs each followed by params, 8-aligned."""
    parts: list[bytes] = []
    for line in table:
        params = _encode(line.params) + b"\0"
        size = align8(DM_TARGET_SPEC.size + len(params))
        spec = DM_TARGET_SPEC.pack(line.start, line.length, 0, size, _encode(line.target_type))
        parts.append(spec + params.ljust(size - DM_TARGET_SPEC.size, b"\0"))
    return b"".join(parts)


def unpack_table(buf: bytes | bytearray | memoryview, start: int, count: int) -> list[TargetLine]:
    """Decode DM_TABLE_STATUS output; each ``next`` is relative to the first spec."""
    lines: list[TargetLine] = []
    offset = start
    for _ in range(count):
        sector, length, _status, nxt, ttype = DM_TARGET_SPEC.unpack_from(buf, offset)
        params_at = offset + DM_TARGET_SPEC.size
        end = bytes(buf[params_at:]).find(b"\0")
        params = bytes(buf[params_at : params_at + end if end >= 0 else len(buf)])
        lines.append(TargetLine(sector, length, _cstr(ttype), _cstr(params)))
        offset = start + nxt
    return lines


@dataclass(frozen=True, slots=True)
class NameListEntry:
    dev: int
    name: str
    event_nr: int | None
    uuid: str | None


def unpack_name_list(
    buf: bytes | bytearray | memoryview, start: int, end: int, version: tuple[int, int, int]
) -> list[NameListEntry]:
    """Decode DM_LIST_DEVICES output: a chain of ``dm_name_list`` records."""
    has_extra = version[:2] >= NAME_LIST_EXTRA_SINCE
    entries: list[NameListEntry] = []
    offset = start
    data = bytes(buf[:end])
    while offset + DM_NAME_LIST.size <= end:
        dev, nxt = DM_NAME_LIST.unpack_from(data, offset)
        if dev == 0 and not entries and nxt == 0:
            break  # the kernel's "no devices" marker
        name_at = offset + DM_NAME_LIST.size
        name_end = data.index(b"\0", name_at)
        name = data[name_at:name_end].decode("utf-8", "surrogateescape")
        event_nr: int | None = None
        uuid: str | None = None
        record_end = offset + nxt if nxt else end
        extra_at = align8(name_end + 1)
        if has_extra and extra_at + DM_NAME_LIST_EXTRA.size <= record_end:
            event_nr, list_flags = DM_NAME_LIST_EXTRA.unpack_from(data, extra_at)
            if list_flags & DM_NAME_LIST_FLAG_HAS_UUID:
                uuid_at = extra_at + DM_NAME_LIST_EXTRA.size
                uuid = data[uuid_at : data.index(b"\0", uuid_at)].decode(
                    "utf-8", "surrogateescape"
                )
            elif list_flags & DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID:
                uuid = ""
        entries.append(NameListEntry(dev, name, event_nr, uuid))
        if nxt == 0:
            break
        offset += nxt
    return entries


def unpack_deps(buf: bytes | bytearray | memoryview, start: int) -> list[int]:
    count, _pad = DM_TARGET_DEPS.unpack_from(buf, start)
    return list(struct.unpack_from(f"={count}Q", buf, start + DM_TARGET_DEPS.size))


def unpack_versions(
    buf: bytes | bytearray | memoryview, start: int, end: int
) -> list[TargetVersion]:
    """Decode DM_LIST_VERSIONS output; each ``next`` is relative to its own record."""
    data = bytes(buf[:end])
    versions: list[TargetVersion] = []
    offset = start
    while offset + DM_TARGET_VERSIONS.size <= end:
        nxt, major, minor, patch = DM_TARGET_VERSIONS.unpack_from(data, offset)
        name_at = offset + DM_TARGET_VERSIONS.size
        name = data[name_at : data.index(b"\0", name_at)].decode("ascii", "replace")
        versions.append(TargetVersion(name, (major, minor, patch)))
        if nxt == 0:
            break
        offset += nxt
    return versions


def pack_message(sector: int, message: str) -> bytes:
    return DM_TARGET_MSG.pack(sector) + _encode(message) + b"\0"


def pack_string(text: str) -> bytes:
    return _encode(text) + b"\0"


def unpack_string(buf: bytes | bytearray | memoryview, start: int, end: int) -> str:
    return _cstr(bytes(buf[start:end]))


def flags_of(header: Header) -> DmFlags:
    return DmFlags(header.flags & int(sum(DmFlags)))
