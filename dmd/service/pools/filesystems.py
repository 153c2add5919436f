"""A filesystem on a new volume, when the request asks for one.

mkfs runs inside the creating Job, on a descriptor of the volume's device that
dmd opened (the tool sees /dev/fd/N: the same path on the kernel and on the
simulator, and no window in which the name could point elsewhere), and it
dies with dmd. Progress
comes from mke2fs's "n/m" counters (mkfs.xfs prints none: its job just
ends). A failure names the tool, its exit status and its last words.

A new plain volume reads zeros wherever nothing was written (a thin volume's
unmapped blocks; a thick one's segments, zeroed when taken), so mke2fs is
told so (``assume_storage_prezeroed``, e2fsprogs 1.47): it then writes no
journal or inode tables full of zeros, and marks the tables zeroed, so the
kernel's ext4lazyinit thread never writes them later either: on a thin
volume that is tens of MiB of the pool kept free per filesystem, and per
snapshot of it. Not through dm-crypt: there zeros read back as noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Awaitable, Callable

from dmd.service import errors

log = logging.getLogger(__name__)

# Quiet where the tool has no progress to tell; forced, because the device is
# new and empty (and a regular file on the simulator).
MKFS: dict[str, list[str]] = {
    "ext4": ["mkfs.ext4", "-F", "-E", "nodiscard"],
    "xfs": ["mkfs.xfs", "-f", "-q", "-K"],
}
# given to mke2fs with "nodiscard" on a volume that reads zeros
PREZEROED = "assume_storage_prezeroed=1"
PREZEROED_SINCE = (1, 47)  # the e2fsprogs release that has it
COUNTER = re.compile(rb"(\d+)/(\d+)")
TAIL_BYTES = 4096
CANCEL_POLL = 0.5  # seconds


_mke2fs_version: tuple[int, int] | None = None


async def mke2fs_version() -> tuple[int, int]:
    """(major, minor) of the installed e2fsprogs ((0, 0) when unknown); read once."""
    global _mke2fs_version
    if _mke2fs_version is None:
        found = (0, 0)
        with contextlib.suppress(OSError):
            process = await asyncio.create_subprocess_exec(
                "mke2fs", "-V", stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            output, _ = await process.communicate()
            match = re.search(rb"mke2fs (\d+)\.(\d+)", output)
            if match:
                found = (int(match.group(1)), int(match.group(2)))
        _mke2fs_version = found
    return _mke2fs_version


def check_filesystem(name: str | None) -> str | None:
    if name is not None and name not in MKFS:
        raise errors.InvalidArgument(
            f"filesystem {name!r}: one of {', '.join(sorted(MKFS))}")
    return name


async def make_filesystem(open_device: Callable[[], Awaitable[int]], fstype: str, label: str,
                          progress: Callable[[float], None],
                          cancel_point: Callable[[], None] = lambda: None,
                          zeroed: bool = False) -> None:
    """Run mkfs for *fstype* on the descriptor *open_device()* gives (closed
    here); *label* becomes the filesystem's label. *cancel_point()* is called
    at least twice a second while mkfs runs: what it raises kills mkfs.
    *zeroed*: the device reads zeros wherever mkfs does not write."""
    command = list(MKFS[fstype])
    if zeroed and fstype == "ext4" and await mke2fs_version() >= PREZEROED_SINCE:
        command[command.index("nodiscard")] += "," + PREZEROED
    tool, setpriv = shutil.which(command[0]), shutil.which("setpriv")
    if setpriv is None:
        raise errors.Failed("setpriv (util-linux) is not installed: mkfs is run through it")
    if tool is None:
        raise errors.Failed(f"{command[0]} is not installed: no {fstype} filesystem "
                            "can be made")
    label_option = ["-L", label[:16 if fstype == "ext4" else 12]]
    fd = await open_device()
    try:
        # Killed if dmd dies: recovery then undoes a volume nobody writes to.
        process = await asyncio.create_subprocess_exec(
            setpriv, "--pdeathsig", "KILL", "--", tool, *command[1:], *label_option,
            f"/dev/fd/{fd}", pass_fds=(fd,),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
    finally:
        os.close(fd)  # the child has its own copy
    assert process.stdout is not None
    tail = b""
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(process.stdout.read(1024), CANCEL_POLL)
            except TimeoutError:
                cancel_point()  # mkfs.xfs prints nothing for a long while
                continue
            if not chunk:
                break
            cancel_point()
            tail = (tail + chunk)[-TAIL_BYTES:]
            counters = COUNTER.findall(chunk)
            if counters:
                done, total = (int(n) for n in counters[-1])
                if total:
                    progress(done / total)
        status = await process.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    if status != 0:
        last = tail.decode(errors="replace").replace("\b", "").strip().splitlines()
        raise errors.Failed(f"{command[0]} exited with status {status}: "
                            f"{last[-1] if last else 'no output'}")
    log.info("mkfs %s: %s made", label, fstype)


# -- a filesystem that follows its volume's Resize ----------------------------
# What the tools need to know, and the one way each is run: a descriptor of
# the volume's device that dmd opened, seen by the tool as /dev/fd/N (as for
# mkfs), through setpriv so the tool dies with dmd.
RESIZABLE = ("ext4", "xfs")
MOUNT_OPTIONS = "nosuid,nodev,noexec,nouuid"  # a snapshot's clone may be mounted too
MOUNT_FAILED = 90  # the exit status grow_xfs's shell gives a failed mount


async def _run(tool: str, *args: str, fd: int | None = None) -> tuple[int, str]:
    """Run *tool* with *args* (``{fd}`` in an argument becomes the
    descriptor's number); its exit status and output."""
    path, setpriv = shutil.which(tool), shutil.which("setpriv")
    if setpriv is None:
        raise errors.Failed("setpriv (util-linux) is not installed: filesystem tools are "
                            "run through it")
    if path is None:
        raise errors.Failed(f"{tool} is not installed")
    argv = [a.format(fd=fd) for a in args]
    process = await asyncio.create_subprocess_exec(
        setpriv, "--pdeathsig", "KILL", "--", path, *argv,
        pass_fds=() if fd is None else (fd,), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output[-TAIL_BYTES:].decode(errors="replace")


def _failed(tool: str, status: int, output: str, what: str) -> errors.Failed:
    last = output.replace("\b", "").strip().splitlines()
    return errors.Failed(f"{what}: {tool} exited with status {status}: "
                         f"{last[-1] if last else 'no output'}")


async def probe(fd: int) -> str | None:
    """The filesystem on the device (blkid's TYPE, from the device itself,
    never a cache), or None when blkid finds none."""
    status, output = await _run("blkid", "-p", "-o", "value", "-s", "TYPE", "/dev/fd/{fd}",
                                fd=fd)
    if status == 2:  # nothing recognised
        return None
    if status != 0:
        raise _failed("blkid", status, output, "probing the filesystem")
    return output.strip() or None


def mount_point(fd: int) -> str | None:
    """Where the block device *fd* is mounted in dmd's mount namespace (the
    first place listed), or None. Blocking (reads /proc): off the loop."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return None  # the simulator's devices are files nobody mounts
    wanted = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 4 and fields[2] == wanted:
                # mountinfo escapes space, tab, newline and backslash as \ooo
                return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
    return None


async def check_ext4(fd: int) -> None:
    """A forced, read-only e2fsck: Failed when it finds anything to fix."""
    status, output = await _run("e2fsck", "-f", "-n", "/dev/fd/{fd}", fd=fd)
    if status != 0:
        raise _failed("e2fsck", status, output,
                      "the ext4 filesystem needs repair first (nothing was changed)")


async def filesystem_bytes(fd: int, fstype: str) -> int:
    """The filesystem's own size, as its superblock says."""
    if fstype == "ext4":
        status, output = await _run("dumpe2fs", "-h", "/dev/fd/{fd}", fd=fd)
        keys = {"Block count": "count", "Block size": "size"}
    else:
        status, output = await _run("xfs_db", "-r", "-c", "sb 0", "-c", "print dblocks blocksize",
                                    "/dev/fd/{fd}", fd=fd)
        keys = {"dblocks": "count", "blocksize": "size"}
    if status != 0:
        raise _failed("dumpe2fs" if fstype == "ext4" else "xfs_db", status, output,
                      "reading the filesystem's size")
    found: dict[str, int] = {}
    for line in output.splitlines():
        key, sep, value = line.partition(":" if fstype == "ext4" else "=")
        if sep and key.strip() in keys and value.strip().isdigit():
            found[keys[key.strip()]] = int(value.strip())
    if set(found) != {"count", "size"}:
        raise errors.Failed(f"reading the {fstype} filesystem's size: not in the tool's output")
    return found["count"] * found["size"]


async def resize_ext4(fd: int, size_bytes: int, *, mounted: bool) -> None:
    """Make the ext4 filesystem *size_bytes* (rounded down to its blocks).
    Unmounted, resize2fs opens the device exclusively (a mount anywhere,
    in any namespace, makes it fail before it writes) and is forced past
    its own wish for a fresh e2fsck: check_ext4 was run just before."""
    args = ["/dev/fd/{fd}", f"{size_bytes // 512}s"]
    status, output = await _run("resize2fs", *(args if mounted else ["-f", *args]), fd=fd)
    if status != 0:
        raise _failed("resize2fs", status, output, "resizing the ext4 filesystem")


async def grow_xfs(fd: int, mounted_at: str | None) -> None:
    """xfs grows only mounted (xfs_growfs acts on a mount point): an
    unmounted one is mounted for the while, nosuid, nodev, noexec, in a
    mount namespace of its own (nobody else sees it, and it goes with its
    last process, whatever happens to dmd), grown to fill its device, and
    unmounted."""
    if mounted_at is not None:
        status, output = await _run("xfs_growfs", "-d", mounted_at)
        if status != 0:
            raise _failed("xfs_growfs", status, output, "growing the xfs filesystem")
        return
    directory = await asyncio.to_thread(tempfile.mkdtemp, prefix="dmd-grow-")
    try:
        status, output = await _run(
            "unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            f'mount -t xfs -o {MOUNT_OPTIONS} "$1" "$2" || exit {MOUNT_FAILED}; '
            'xfs_growfs -d "$2"; status=$?; umount "$2"; exit $status',
            "grow-xfs", "/dev/fd/{fd}", directory, fd=fd)
        if status == MOUNT_FAILED:
            raise _failed("mount", status, output, "mounting the xfs filesystem to grow it")
        if status != 0:
            raise _failed("xfs_growfs", status, output, "growing the xfs filesystem")
    finally:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(os.rmdir, directory)
