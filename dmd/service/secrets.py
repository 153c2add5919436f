"""Keys that come with a call: read from a file descriptor, checked, wiped.

A key travels as a D-Bus ``h`` (the router has checked its index; see
dmd.dbus.router) or as the description of a key in the kernel keyring,
never as a string. The descriptor must be a pipe or a regular file (a
socket, a directory or a device is refused: a client that passes the wrong
thing learns so, instead of dmd blocking on it or reading a disk); the key
is everything it holds, read until end of file within KEY_READ_SECONDS.
Keys are kept in bytearrays, wiped once used (Python copies cannot all be
chased, but none is made on purpose).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
import select
import stat
import threading
import time
from collections.abc import Iterator

from dmd.engine import keyring
from dmd.engine.luks import MAX_KEY_BYTES, MIN_KEY_BYTES
from dmd.service import errors

KEY_READ_SECONDS = 5.0
MAX_KEY_READERS = 64  # key reads at once, hung ones included
MAX_KEY_READERS_PER_UID = 4  # one uid's files on a mount it controls hold no more
_readers: collections.Counter[int] = collections.Counter()
_readers_lock = threading.Lock()


def _take_reader(uid: int) -> bool:
    with _readers_lock:
        if sum(_readers.values()) >= MAX_KEY_READERS or (
                uid != 0 and _readers[uid] >= MAX_KEY_READERS_PER_UID):
            return False
        _readers[uid] += 1
        return True


def _give_back_reader(uid: int) -> None:
    with _readers_lock:
        _readers[uid] -= 1
        if not _readers[uid]:
            del _readers[uid]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device")):
        if test(mode):
            return name
    return "not a pipe or a regular file"


def _read_key(fd: int, what: str, deadline: float) -> bytearray:
    """The key on *fd* (this reader's own descriptor), by *deadline*."""
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
        raise errors.InvalidArgument(f"{what}: a key comes on a pipe or a regular file, "
                                     f"and this descriptor is {_kind(mode)}")
    buffer = bytearray(MAX_KEY_BYTES + 1)
    view = memoryview(buffer)
    got = 0
    try:
        if stat.S_ISREG(mode):
            # From the start, whatever the sender's offset: the file is the key.
            while got < len(buffer):
                n = os.preadv(fd, [view[got:]], got)
                if not n:
                    break
                got += n
        else:
            got = _read_pipe(fd, view, what, deadline)
        if not MIN_KEY_BYTES <= got <= MAX_KEY_BYTES:
            raise errors.InvalidArgument(
                f"{what}: a key is {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, "
                f"not {'more than ' + str(MAX_KEY_BYTES) if got > MAX_KEY_BYTES else got}")
        return buffer[:got]
    finally:
        view.release()
        wipe(buffer)


def _read_pipe(fd: int, view: memoryview, what: str, deadline: float) -> int:
    """Read the pipe until its end into *view*, non-blocking (set on the
    pipe's read end: it was the caller's to give away), so that a second
    reader taking the bytes between the poll and the read makes the read
    return, not wait. (Not a reopen through /proc/self/fd: that checks the
    pipe's 0600 owner, which root without CAP_DAC_OVERRIDE, as dmd's unit
    runs it, is not for another user's pipe.)"""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_ACCMODE != os.O_RDONLY:
        raise errors.InvalidArgument(f"{what}: a key comes on a pipe's read end")
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    got = 0
    while got < len(view):
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise errors.InvalidArgument(
                f"{what}: the pipe was not closed within {KEY_READ_SECONDS:.0f} s "
                "(write the key, then close the pipe's write end)")
        try:
            n = os.readv(fd, [view[got:]])
        except BlockingIOError:
            continue  # another reader took what was there
        if not n:
            break
        got += n
    return got


async def read_key(fd: object, what: str = "key", uid: int = 0) -> bytearray:
    """The key on descriptor *fd* (the router's: not closed here), sent by
    *uid*.

    Read on a thread of its own with a copy of the descriptor, never on a
    thread dmd shares: a file on a hung network or FUSE mount can block a
    read for good. Past KEY_READ_SECONDS the call fails and the thread is
    left to end whenever the read does (at most MAX_KEY_READERS of them, and
    MAX_KEY_READERS_PER_UID of one uid's, so that one service's hung files
    cannot stop everyone's keys: more is LimitExceeded); what it reads then
    is wiped."""
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
        raise errors.InvalidArgument(f"{what}: a key is passed as a file descriptor (h)")
    try:
        mine = os.dup(fd)
    except OSError:
        raise errors.InvalidArgument(f"{what}: not an open descriptor") from None
    if not _take_reader(uid):
        os.close(mine)
        raise errors.LimitExceeded(f"{what}: too many keys of uid {uid} (or of everyone) "
                                   "are being read, or their files do not answer; try again "
                                   "later")
    loop = asyncio.get_running_loop()
    result: asyncio.Future[bytearray] = loop.create_future()
    deadline = time.monotonic() + KEY_READ_SECONDS

    def deliver(key: bytearray | None, error: BaseException | None) -> None:
        if result.done():  # the caller was answered already: nobody takes it
            wipe(key)
        elif error is not None:
            result.set_exception(error)
        else:
            assert key is not None
            result.set_result(key)

    def run() -> None:
        key, error = None, None
        try:
            key = _read_key(mine, what, deadline)
        except errors.ServiceError as exc:
            error = exc
        except OSError as exc:
            error = errors.InvalidArgument(f"{what}: cannot be read: {exc.strerror}")
        finally:
            os.close(mine)
            _give_back_reader(uid)
        try:
            loop.call_soon_threadsafe(deliver, key, error)
        except RuntimeError:  # the loop is gone: dmd is stopping
            wipe(key)

    try:
        threading.Thread(target=run, name="dmd-key-read", daemon=True).start()
    except RuntimeError:  # no thread to be had (TasksMax)
        os.close(mine)
        _give_back_reader(uid)
        raise errors.LimitExceeded(f"{what}: no thread to read it on; try again later") \
            from None
    try:
        return await asyncio.wait_for(asyncio.shield(result), KEY_READ_SECONDS + 1)
    except TimeoutError:
        result.cancel()
        raise errors.InvalidArgument(f"{what}: could not be read within "
                                     f"{KEY_READ_SECONDS:.0f} s") from None


def check_key_description(description: object) -> str:
    if not isinstance(description, str):
        raise errors.InvalidArgument("a key description is a string")
    try:
        keyring.check_description(description)
    except ValueError as exc:
        raise errors.InvalidArgument(str(exc)) from None
    return description


async def keyring_key(description: str) -> bytearray | None:
    """The payload of the user key *description* in dmd's keyrings; None if
    it is not there (yet)."""
    try:
        key = await asyncio.to_thread(keyring.read_user_key, description, MAX_KEY_BYTES)
    except ValueError as exc:
        raise errors.InvalidArgument(f"key {description!r}: {exc}") from None
    except OSError as exc:
        raise errors.Failed(f"the kernel keyring could not be read: {exc.strerror}") from None
    if key is not None and len(key) < MIN_KEY_BYTES:
        wipe(key)
        raise errors.InvalidArgument(f"key {description!r} is shorter than "
                                     f"{MIN_KEY_BYTES} bytes")
    return key


def wipe(key: bytearray | None) -> None:
    if key is not None:
        key[:] = bytes(len(key))


@contextlib.contextmanager
def wiped(*keys: bytearray | None) -> Iterator[None]:
    """Wipe *keys* however the block ends."""
    try:
        yield
    finally:
        for key in keys:
            wipe(key)
