"""A volume's filesystem following its Resize (the option ``filesystem``).

Everything that could refuse is found before anything changes (the plan):
the filesystem (blkid, from the device), where it is mounted, whether a
mount that dmd cannot see holds the device, and for work on an unmounted
ext4 a forced read-only e2fsck. Then:

- growing: the volume grows (its journaled Resize), then the filesystem, in
  the same intent. If the filesystem's tool fails and the filesystem is
  still no larger than the old volume, the volume goes back to its old size
  (nothing was written past its old end through the filesystem); if it did
  grow part way, the volume keeps its new size (a filesystem is never cut)
  and the job's error says so. A crash keeps the volume at whatever size its
  device has, and the filesystem as far as its tool got: a Resize to the
  same size with ``filesystem`` finishes it.
- shrinking (ext4, unmounted): the filesystem first, then the volume; if
  the volume's part fails, the filesystem is grown back.

A mount in another namespace (a container's) is invisible in
/proc/self/mountinfo, but it holds the block device: dmd's exclusive open
then fails (Busy), and resize2fs, working unmounted, opens the device
exclusively too, so such a mount made meanwhile stops it before it writes.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
from dataclasses import dataclass

from dmd.engine import DmError, DmFlags
from dmd.engine.interface import Engine
from dmd.service import errors
from dmd.service.auth import ROOT, Caller
from dmd.service.journal import Journal
from dmd.service.pools.core import PoolCore
from dmd.service.pools.filesystems import (
    RESIZABLE,
    check_ext4,
    filesystem_bytes,
    grow_xfs,
    mount_point,
    probe,
    resize_ext4,
)
from dmd.service.pools.names import volume_device
from dmd.state import VolumeRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilesystemResize:
    """A filesystem to resize with its volume, as found before any change."""

    volume: VolumeRecord  # as it was
    fstype: str
    mounted_at: str | None

    @property
    def subject(self) -> str:
        return f"{self.volume.pool}/{self.volume.name}"

    async def grow(self, pools: PoolCore, size: int, journal: Journal | None = None,
                   step: enum.IntEnum | None = None) -> None:
        """The filesystem fills *size*, the volume's new size (reached:
        the device has it), as the *step* of *journal*'s resize. On failure
        that intent is undone (the volume shrinks back) only while the
        filesystem still fits the old size."""
        if journal is not None and step is not None:
            await journal.mark(step)
        fd = await pools.open_node(self.volume, os.O_RDONLY)
        try:
            try:
                await self._same_mount(fd)
                if self.fstype == "ext4":
                    await resize_ext4(fd, size, mounted=self.mounted_at is not None)
                else:
                    await grow_xfs(fd, self.mounted_at)
            except BaseException:
                # Only an unmounted ext4's superblock on the device is
                # current: a mounted filesystem's (or xfs's, mounted for the
                # grow) may lag its log, so the volume keeps its size.
                if journal is not None and (
                        self.mounted_at is not None or self.fstype != "ext4"
                        or not await self._fits(fd, self.volume.size_bytes)):
                    journal.no_way_back()  # grown part way: the volume keeps its size
                    log.error("volume-resize %s: its %s grew part way; the volume keeps "
                              "%d bytes", self.subject, self.fstype, size)
                raise
        finally:
            os.close(fd)
        log.info("volume-resize %s: %s grown to %d bytes", self.subject, self.fstype, size)

    async def shrink(self, pools: PoolCore, size: int) -> None:
        """The filesystem shrinks to *size* before its volume does."""
        fd = await pools.open_node(self.volume, os.O_RDONLY)
        try:
            await self._same_mount(fd)
            await resize_ext4(fd, size, mounted=False)
        finally:
            os.close(fd)
        log.info("volume-resize %s: ext4 shrunk to %d bytes", self.subject, size)

    async def restore(self, pools: PoolCore) -> None:
        """After its volume failed to shrink: the filesystem back at the
        volume's size, if the device still has it (best effort: a smaller
        filesystem loses nothing; one larger than its device would)."""
        device = volume_device(self.volume.pool, self.volume.name)
        try:
            _, table = await pools.kernel(Engine.table_status, device,
                                          DmFlags.DM_STATUS_TABLE)
            if sum(line.length for line in table) * 512 < self.volume.size_bytes:
                log.error("volume-resize %s: ext4 left at the smaller size its device has",
                          self.subject)
                return
            fd = await pools.open_node(self.volume, os.O_RDONLY)
            try:
                await resize_ext4(fd, self.volume.size_bytes, mounted=False)
            finally:
                os.close(fd)
        except (errors.ServiceError, OSError, DmError) as exc:
            log.error("volume-resize %s: ext4 left smaller than its volume: %s",
                      self.subject, exc)

    async def _same_mount(self, fd: int) -> None:
        now = await asyncio.to_thread(mount_point, fd)
        if now != self.mounted_at:
            raise errors.Busy(f"volume {self.subject} was "
                              f"{'mounted' if now else 'unmounted'} meanwhile: try again")

    async def _fits(self, fd: int, size: int) -> bool:
        try:
            return await filesystem_bytes(fd, self.fstype) <= size
        except errors.ServiceError:
            return False  # unknown: taken as grown


async def plan(pools: PoolCore, volume: VolumeRecord, size: int,
               caller: Caller = ROOT) -> FilesystemResize:
    """What resizing *volume*'s filesystem to *size* takes, or the named
    error that refuses it, with nothing changed."""
    subject = f"{volume.pool}/{volume.name}"
    if volume.encryption is not None:
        raise errors.InvalidArgument(
            f"volume {subject} is encrypted: its filesystem is inside its cleartext, "
            "which dmd does not resize (resize it without `filesystem`)")
    if not await pools.own_device(volume):
        raise errors.NotActive(f"volume {subject} is not active: Activate it to resize "
                               "its filesystem")
    fd = await pools.open_node(volume, os.O_RDONLY)
    try:
        fstype = await probe(fd)
        if fstype not in RESIZABLE:
            raise errors.InvalidArgument(
                f"volume {subject} holds {fstype or 'no filesystem blkid knows'}: "
                f"`filesystem` resizes {' and '.join(RESIZABLE)}")
        mounted_at = await asyncio.to_thread(mount_point, fd)
        if size < volume.size_bytes:
            if fstype != "ext4":
                raise errors.InvalidArgument(f"volume {subject} holds {fstype}, which "
                                             "cannot shrink")
            if mounted_at is not None:
                raise errors.Busy(f"volume {subject} is mounted at {mounted_at}: unmount "
                                  "it to shrink its filesystem")
        if mounted_at is None and fstype == "xfs" and caller.uid != 0:
            # It would be mounted by root: the kernel reading a filesystem
            # its owner made, which is root's to allow.
            raise errors.NotAuthorized(f"volume {subject}: an unmounted xfs grows only "
                                       "mounted, and only root has dmd mount one: mount it "
                                       "and Resize")
        if mounted_at is None:
            await _not_held(pools, volume, subject)
            if fstype == "ext4":
                await check_ext4(fd)
    finally:
        os.close(fd)
    return FilesystemResize(volume, fstype, mounted_at)


async def _not_held(pools: PoolCore, volume: VolumeRecord, subject: str) -> None:
    """Busy if something holds the device exclusively: a mount dmd cannot
    see (another mount namespace), or a program that asked to be alone."""
    try:
        fd = await pools.open_node(volume, os.O_RDONLY | os.O_EXCL)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        raise errors.Busy(f"volume {subject} is in use (mounted where dmd does not see it, "
                          "or held exclusively): its filesystem is resized mounted here, "
                          "or unmounted everywhere") from None
    os.close(fd)
