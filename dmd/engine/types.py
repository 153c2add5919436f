"""Kernel records and the validation rules that keep bad input away from the ioctls.

Everything here is plain data: frozen dataclasses for what the kernel reports,
validated constructors for what we hand it. Validation mirrors what the kernel
(drivers/md/dm-ioctl.c) and libdm enforce, so a caller learns *why* a name or a
table is wrong before any ioctl is issued, instead of getting a bare EINVAL or
a silently truncated name.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

# Sizes from include/uapi/linux/dm-ioctl.h. The kernel NUL-terminates the last
# byte, so the usable lengths are one less.
DM_NAME_LEN = 128
DM_UUID_LEN = 129
DM_MAX_TYPE_NAME = 16
MAX_NAME_BYTES = DM_NAME_LEN - 1
MAX_UUID_BYTES = DM_UUID_LEN - 1
MAX_TARGET_TYPE_BYTES = DM_MAX_TYPE_NAME - 1
# dm_table_add_target refuses a table ending past LLONG_MAX >> SECTOR_SHIFT:
# the device's size in bytes must fit a signed 64-bit loff_t.
MAX_DEVICE_SECTORS = ((1 << 63) - 1) >> 9

# libdm's udev-safe set (libdm/libdm-common.c, _is_whitelisted_char plus the
# characters it never mangles). Anything else gets mangled by libdm and makes
# udev rules and /dev/mapper names disagree, so dmd refuses it.
_UDEV_SAFE = re.compile(r"[A-Za-z0-9#+\-.:=@_]+")
_TARGET_TYPE = re.compile(r"[A-Za-z0-9_\-]+")
_RESERVED_NAMES = frozenset({".", "..", "control"})


class InvalidArgument(ValueError):
    """Input the kernel would reject or mangle, refused before any ioctl."""


class UnsafeOperation(InvalidArgument):
    """A request refused because it would walk into a known kernel bug."""


class DmError(OSError):
    """A device-mapper ioctl failed in the kernel.

    Carries the errno (``.errno``), the command that failed (``.command``) and
    the device it was aimed at (``.device``, may be ``None``). The message
    never contains table parameters, so key material cannot leak through it.
    """

    def __init__(self, err: int, command: str, device: str | None = None) -> None:
        self.command = command
        self.device = device
        where = f" on {device!r}" if device else ""
        name = errno_mod.errorcode.get(err, f"errno {err}")
        super().__init__(err, f"{command}{where} failed: {name} ({os.strerror(err)})")

    def __reduce__(self) -> tuple[type[DmError], tuple[int, str, str | None]]:
        return (DmError, (self.errno or 0, self.command, self.device))


class DmFlags(enum.IntFlag):
    """Flags of ``struct dm_ioctl``, named as in the devicemapper crate."""

    DM_READONLY = 1 << 0
    DM_SUSPEND = 1 << 1
    DM_PERSISTENT_DEV = 1 << 3
    DM_STATUS_TABLE = 1 << 4
    DM_ACTIVE_PRESENT = 1 << 5
    DM_INACTIVE_PRESENT = 1 << 6
    DM_BUFFER_FULL = 1 << 8
    DM_SKIP_BDGET = 1 << 9
    DM_SKIP_LOCKFS = 1 << 10
    DM_NOFLUSH = 1 << 11
    DM_QUERY_INACTIVE_TABLE = 1 << 12
    DM_UEVENT_GENERATED = 1 << 13
    DM_UUID = 1 << 14
    DM_SECURE_DATA = 1 << 15
    DM_DATA_OUT = 1 << 16
    DM_DEFERRED_REMOVE = 1 << 17
    DM_INTERNAL_SUSPEND = 1 << 18
    DM_IMA_MEASUREMENT = 1 << 19


ALL_FLAGS = DmFlags(sum(DmFlags))


class UdevFlags(enum.IntFlag):
    """libdm's udev flags, carried in the high 16 bits of ``event_nr``.

    The kernel copies them into the DM_COOKIE uevent variable and udev's
    10-dm.rules / 13-dm-disk.rules act on them (libdm/libdevmapper.h).
    """

    DM_UDEV_DISABLE_DM_RULES_FLAG = 0x0001
    DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG = 0x0002
    DM_UDEV_DISABLE_DISK_RULES_FLAG = 0x0004
    DM_UDEV_DISABLE_OTHER_RULES_FLAG = 0x0008
    DM_UDEV_LOW_PRIORITY_FLAG = 0x0010
    DM_UDEV_DISABLE_LIBRARY_FALLBACK = 0x0020
    DM_UDEV_PRIMARY_SOURCE_FLAG = 0x0040


DM_UDEV_FLAGS_SHIFT = 16


class DevId:
    """A device addressed by name or by UUID (the crate's ``DevId``)."""

    __slots__ = ("is_uuid", "value")

    def __init__(self, value: str, *, is_uuid: bool) -> None:
        if is_uuid:
            validate_uuid(value)
        else:
            validate_name(value)
        self.value = value
        self.is_uuid = is_uuid

    @classmethod
    def name(cls, value: str) -> DevId:
        return cls(value, is_uuid=False)

    @classmethod
    def uuid(cls, value: str) -> DevId:
        return cls(value, is_uuid=True)

    def __repr__(self) -> str:
        return f"DevId.{'uuid' if self.is_uuid else 'name'}({self.value!r})"

    def __str__(self) -> str:
        return self.value

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DevId)
            and other.is_uuid == self.is_uuid
            and other.value == self.value
        )

    def __hash__(self) -> int:
        return hash((self.is_uuid, self.value))


def _check_text(kind: str, value: str, max_bytes: int) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"{kind} must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidArgument(f"{kind} must not be empty")
    encoded = value.encode("utf-8", "surrogateescape")
    if len(encoded) > max_bytes:
        raise InvalidArgument(
            f"{kind} is {len(encoded)} bytes long; the kernel allows at most {max_bytes}"
        )
    if not _UDEV_SAFE.fullmatch(value):
        bad = sorted({c for c in value if not _UDEV_SAFE.fullmatch(c)})
        raise InvalidArgument(
            f"{kind} {value!r} contains {''.join(bad)!r}; only the udev-safe characters "
            "A-Z a-z 0-9 # + - . : = @ _ are allowed"
        )


def validate_name(name: str) -> str:
    """Return *name* if the kernel and udev will accept it unchanged."""
    _check_text("device name", name, MAX_NAME_BYTES)
    if name in _RESERVED_NAMES:
        raise InvalidArgument(f"device name {name!r} is reserved by the kernel")
    return name


def validate_uuid(uuid: str) -> str:
    """Return *uuid* if the kernel and udev will accept it unchanged."""
    _check_text("device UUID", uuid, MAX_UUID_BYTES)
    return uuid


def validate_flags(flags: int, allowed: DmFlags = ALL_FLAGS) -> DmFlags:
    if not isinstance(flags, int) or isinstance(flags, bool):
        raise InvalidArgument(f"flags must be an integer, not {type(flags).__name__}")
    unknown = flags & ~int(allowed)
    if unknown or flags < 0:
        raise InvalidArgument(f"unknown or disallowed flag bits {unknown:#x} for this call")
    return DmFlags(flags)


class TargetLine(NamedTuple):
    """One line of a table: ``start length target_type params`` (sectors)."""

    start: int
    length: int
    target_type: str
    params: str


Table = Sequence[TargetLine]


def validate_table(table: Iterable[Sequence[object]]) -> list[TargetLine]:
    """Normalize a table to ``TargetLine``s and check the kernel's layout rules.

    The kernel requires the first line to start at sector 0, every line to
    have a non-zero length and to begin where the previous one ended; a plain
    4-tuple is accepted wherever a ``TargetLine`` is.
    """
    lines: list[TargetLine] = []
    expected_start = 0
    for index, raw in enumerate(table):
        if isinstance(raw, str | bytes) or len(raw) != 4:
            raise InvalidArgument(
                f"table line {index} must be (start, length, target_type, params)"
            )
        start, length, target_type, params = raw
        for field, value in (("start", start), ("length", length)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidArgument(f"table line {index}: {field} must be an integer")
            if value < 0 or value >= 1 << 64:
                raise InvalidArgument(f"table line {index}: {field} out of range")
        assert isinstance(start, int) and isinstance(length, int)
        if not isinstance(target_type, str) or not isinstance(params, str):
            raise InvalidArgument(f"table line {index}: target type and params must be strings")
        if length == 0:
            raise InvalidArgument(f"table line {index}: length must not be zero")
        if start != expected_start:
            what = "the table must start at sector 0" if index == 0 else (
                f"line starts at sector {start} but the previous line ends at {expected_start}"
            )
            raise InvalidArgument(f"table line {index}: {what}")
        if not _TARGET_TYPE.fullmatch(target_type) or len(target_type) > MAX_TARGET_TYPE_BYTES:
            raise InvalidArgument(
                f"table line {index}: target type {target_type!r} is not a valid target name"
            )
        if "\0" in params:
            raise InvalidArgument(f"table line {index}: params must not contain NUL")
        expected_start = start + length
        if expected_start > MAX_DEVICE_SECTORS:
            raise InvalidArgument(
                f"table line {index} ends at sector {expected_start}, past the largest "
                f"device the kernel takes ({MAX_DEVICE_SECTORS} sectors)"
            )
        lines.append(TargetLine(start, length, target_type, params))
    if not lines:
        raise InvalidArgument("a table needs at least one line")
    return lines


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What DM_DEV_STATUS and friends report about one device."""

    name: str
    uuid: str
    device: tuple[int, int]
    open_count: int
    event_nr: int
    flags: DmFlags
    target_count: int
    version: tuple[int, int, int] = (4, 0, 0)

    @property
    def suspended(self) -> bool:
        return bool(self.flags & DmFlags.DM_SUSPEND)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & DmFlags.DM_READONLY)

    @property
    def active_present(self) -> bool:
        return bool(self.flags & DmFlags.DM_ACTIVE_PRESENT)

    @property
    def inactive_present(self) -> bool:
        return bool(self.flags & DmFlags.DM_INACTIVE_PRESENT)


@dataclass(frozen=True, slots=True)
class Device:
    """One entry of DM_LIST_DEVICES."""

    name: str
    device: tuple[int, int]
    event_nr: int | None = None
    uuid: str | None = None


@dataclass(frozen=True, slots=True)
class TargetVersion:
    name: str
    version: tuple[int, int, int]


def dev_t(major: int, minor: int) -> int:
    """Encode like the kernel's huge_encode_dev (what struct dm_ioctl.dev holds)."""
    return (minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)


def major_minor(dev: int) -> tuple[int, int]:
    """Decode the kernel's huge_encode_dev form."""
    return ((dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00))


def block_device_number(path: str) -> tuple[int, int] | None:
    """(major, minor) of the block device at *path*, as tables print it;
    None when *path* is missing or not a block device."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)
