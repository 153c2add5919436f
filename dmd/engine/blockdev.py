"""What a block device holds before dmd takes it: size, whether anyone has
it open, and which signature its first blocks carry.

A pool manager must not lay a pool over a filesystem, an LVM physical
volume, a LUKS header, a RAID member or another pool. udev's ``ID_FS_TYPE``
says so only where udev has probed (and blkid is not a dependency), so the
few signatures that matter are read here, from the places their formats
put them. "In use" is the kernel's answer to an exclusive open: a mounted
filesystem, a device-mapper table or an md array holding the device makes
``O_EXCL`` fail with EBUSY.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass

BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F  # _IO(0x12, 127), linux/fs.h: zero a byte range of a block device

# (offset, magic, name): enough of libblkid's table for what a pool must not
# overwrite. The pool's own header is first, so a device of another dmd pool
# is named as such.
POOL_MAGIC = b"DMDPOOL\x01"
SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, POOL_MAGIC, "dmd_pool"),
    (0, b"LUKS\xba\xbe", "crypto_LUKS"),
    (0, b"SKUL\xba\xbe", "crypto_LUKS"),  # LUKS2 secondary header
    (0, b"XFSB", "xfs"),
    (0x438, b"\x53\xef", "ext4"),  # ext2/3/4 superblock magic at 1024 + 56
    (0x10040, b"_BHRfS_M", "btrfs"),
    (512, b"LABELONE", "LVM2_member"),  # the label is in one of sectors 0-3
    (0, b"LABELONE", "LVM2_member"),
    (1024, b"LABELONE", "LVM2_member"),
    (1536, b"LABELONE", "LVM2_member"),
    (4096, b"\xfc\x4e\x2b\xa9", "linux_raid_member"),  # md 1.2 superblock
    (0, b"\xfc\x4e\x2b\xa9", "linux_raid_member"),  # md 1.1
    (4086, b"SWAPSPACE2", "swap"),
    (0x8001, b"CD001", "iso9660"),
    (0x36, b"FAT", "vfat"),
    (0x52, b"FAT32", "vfat"),
    (512, b"EFI PART", "gpt"),
)
PROBE_BYTES = 0x10048


@dataclass(frozen=True, slots=True)
class BlockDevice:
    path: str
    device: tuple[int, int]
    size_bytes: int
    in_use: bool
    signature: str | None  # what probe_signature found, or None


class NotABlockDevice(ValueError):
    pass


def probe_signature(head: bytes) -> str | None:
    """The first signature found in *head* (a device's first bytes)."""
    for offset, magic, name in SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return name
    if len(head) >= 512 and head[510:512] == b"\x55\xaa" and any(
            head[446 + 16 * i + 4] for i in range(4)):
        return "dos"  # an MBR partition table with at least one partition
    return None


def _block_device_number(path: str) -> tuple[int, int]:
    """(major, minor) of *path*, NotABlockDevice unless it is one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotABlockDevice(f"{path}: no such file") from None
    if not stat.S_ISBLK(st.st_mode):
        raise NotABlockDevice(f"{path} is not a block device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _size_and_head(fd: int) -> tuple[int, bytes]:
    """The device's size in bytes, and its first PROBE_BYTES (fewer if small)."""
    buf = bytearray(8)
    fcntl.ioctl(fd, BLKGETSIZE64, buf)
    size = struct.unpack("=Q", buf)[0]
    return size, os.pread(fd, min(PROBE_BYTES, size), 0)


def probe(path: str) -> BlockDevice:
    """Size, in-use state and signature of block device *path*."""
    device = _block_device_number(path)
    in_use = False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        in_use = True
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size, head = _size_and_head(fd)
    finally:
        os.close(fd)
    return BlockDevice(path, device, size, in_use, probe_signature(head))


# Block devices no pool is made on: RAM disks, floppies and optical drives.
NOT_DISKS = ("ram", "zram", "fd", "sr")


@dataclass(frozen=True, slots=True)
class Disk:
    """A block device a pool could be made on, as sysfs tells it."""

    path: str
    parent: str  # the whole disk's path for a partition, else ""
    held: bool  # another device is stacked on it (device-mapper, md, ...)


def list_disks(sys_block: str = "/sys/class/block") -> list[Disk]:
    """The block devices a pool could be made on, read from sysfs alone
    (nothing is opened: a disk that hangs holds no thread here): disks and
    partitions with a size, but device-mapper devices, RAM disks, floppies
    and optical drives; loop devices only while bound to a file."""
    found = []
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return []
    for name in names:
        if name.startswith(("dm-", *NOT_DISKS)):
            continue
        entry = os.path.join(sys_block, name)
        try:
            with open(os.path.join(entry, "size")) as f:
                sectors = int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if sectors <= 0:
            continue
        parent = ""
        if os.path.exists(os.path.join(entry, "partition")):
            # /sys/class/block/sda1 -> .../block/sda/sda1: its disk is the folder above
            parent = "/dev/" + os.path.basename(os.path.dirname(os.path.realpath(entry)))
        try:
            held = bool(os.listdir(os.path.join(entry, "holders")))
        except OSError:
            held = False
        found.append(Disk(f"/dev/{name}", parent, held))
    return found


def mounted_devices(mountinfo: str = "/proc/self/mountinfo",
                    swaps: str = "/proc/swaps") -> set[tuple[int, int]]:
    """(major, minor) of every block device mounted (in this mount
    namespace) or used as swap: in use, without opening it."""
    found: set[tuple[int, int]] = set()
    try:
        with open(mountinfo) as f:
            for line in f:
                major, _, minor = line.split()[2].partition(":")
                if major.isdigit() and minor.isdigit():
                    found.add((int(major), int(minor)))
    except OSError:
        pass
    try:
        with open(swaps) as f:
            for line in f.readlines()[1:]:
                with contextlib.suppress(OSError, IndexError, NotABlockDevice):
                    found.add(_block_device_number(line.split()[0]))
    except OSError:
        pass
    return found


@dataclass(frozen=True, slots=True)
class DiskSurvey:
    """What a pool's picker needs of a disk: its size and signature, its
    whole disk (for a partition), whether anything uses it."""

    path: str
    device: tuple[int, int]
    parent: str
    size_bytes: int
    signature: str | None
    in_use: bool


def survey_disks(sys_block: str = "/sys/class/block") -> list[DiskSurvey]:
    """Every disk list_disks finds, surveyed: in use when another device is
    stacked on it, it is mounted or swap, or (a whole disk) one of its
    partitions is; none is opened exclusively. One that cannot be read is
    left out."""
    disks = list_disks(sys_block)
    mounted = mounted_devices()
    used: dict[str, bool] = {}
    numbers: dict[str, tuple[int, int]] = {}
    for disk in disks:
        try:
            numbers[disk.path] = _block_device_number(disk.path)
        except (OSError, NotABlockDevice):
            continue
        used[disk.path] = disk.held or numbers[disk.path] in mounted
    for disk in disks:
        if disk.parent and used.get(disk.path):
            used[disk.parent] = True
    found = []
    for disk in disks:
        if disk.path not in numbers:
            continue
        try:
            facts = survey(disk.path, used[disk.path])
        except (OSError, NotABlockDevice):
            continue
        found.append(DiskSurvey(disk.path, facts.device, disk.parent, facts.size_bytes,
                                facts.signature, facts.in_use))
    return found


def survey(path: str, in_use: bool) -> BlockDevice:
    """Size and signature of block device *path*, opened without claiming
    it (an exclusive open, even for a moment, makes another tool's mount or
    activation fail with EBUSY); *in_use* as the caller found it."""
    device = _block_device_number(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        size, head = _size_and_head(fd)
    finally:
        os.close(fd)
    return BlockDevice(path, device, size, in_use, probe_signature(head))


def read(path: str, offset: int, length: int) -> bytes:
    """*length* bytes of *path* from *offset* (fewer past its end)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while length > 0:
            chunk = os.pread(fd, length, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset, length = offset + len(chunk), length - len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write(path: str, offset: int, data: bytes) -> None:
    """Write *data* at *offset* of *path* and make it durable (fsync flushes
    the device's write cache too) before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done
        os.fsync(fd)
    finally:
        os.close(fd)


def wipe(path: str, offset: int, length: int) -> None:
    """Write zeros over *length* bytes of *path* from *offset*, durably: by
    BLKZEROOUT where the range is in whole sectors (the device's own
    write-zeroes, or the kernel's writes; gigabytes of a thick volume's
    new space), else by writes."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if offset % 512 == 0 and length % 512 == 0 and stat.S_ISBLK(os.fstat(fd).st_mode):
            if length:
                fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
            return
        zeros = bytes(min(length, 1 << 20))
        done = 0
        while done < length:
            done += os.pwrite(fd, zeros[:length - done], offset + done)
        os.fsync(fd)
    finally:
        os.close(fd)
