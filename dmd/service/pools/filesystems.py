"""A filesystem on a new volume, when the request asks for one.

mkfs runs inside the creating Job, on a descriptor of the volume's device that
dmd opened (the tool sees /dev/fd/N: the same path on the kernel and on the
simulator, and no window in which the name could point elsewhere), and it
dies with dmd. Progress
comes from mke2fs's "n/m" counters (mkfs.xfs prints none: its job just
ends). A failure names the tool, its exit status and its last words.
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
COUNTER = re.compile(rb"(\d+)/(\d+)")
TAIL_BYTES = 4096
CANCEL_POLL = 0.5  # seconds


def check_filesystem(name: str | None) -> str | None:
    if name is not None and name not in MKFS:
        raise errors.InvalidArgument(
            f"filesystem {name!r}: one of {', '.join(sorted(MKFS))}")
    return name


async def make_filesystem(open_device: Callable[[], Awaitable[int]], fstype: str, label: str,
                          progress: Callable[[float], None],
                          cancel_point: Callable[[], None] = lambda: None) -> None:
    """Run mkfs for *fstype* on the descriptor *open_device()* gives (closed
    here); *label* becomes the filesystem's label. *cancel_point()* is called
    at least twice a second while mkfs runs: what it raises kills mkfs."""
    command = MKFS[fstype]
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
