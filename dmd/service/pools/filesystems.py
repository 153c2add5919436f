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
