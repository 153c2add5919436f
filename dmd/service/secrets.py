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
import contextlib
import os
import select
import stat
import time
from collections.abc import Iterator

from dmd.engine import keyring
from dmd.engine.luks import MAX_KEY_BYTES, MIN_KEY_BYTES
from dmd.service import errors

KEY_READ_SECONDS = 5.0


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device")):
        if test(mode):
            return name
    return "not a pipe or a regular file"


def _read_key(fd: int, what: str) -> bytearray:
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
        raise errors.InvalidArgument(f"{what}: a key comes on a pipe or a regular file, "
                                     f"and this descriptor is {_kind(mode)}")
    key = bytearray()
    if stat.S_ISREG(mode):
        # From the start, whatever the sender's offset: the file is the key.
        chunk = os.pread(fd, MAX_KEY_BYTES + 1, 0)
        key += chunk
    else:
        deadline = time.monotonic() + KEY_READ_SECONDS
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while len(key) <= MAX_KEY_BYTES:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                wipe(key)
                raise errors.InvalidArgument(
                    f"{what}: the pipe was not closed within {KEY_READ_SECONDS:.0f} s "
                    "(write the key, then close the pipe's write end)")
            # POLLIN or POLLHUP: a read returns what is there without waiting.
            chunk = os.read(fd, MAX_KEY_BYTES + 1 - len(key))
            if not chunk:
                break
            key += chunk
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        size = len(key)
        wipe(key)
        raise errors.InvalidArgument(
            f"{what}: a key is {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, "
            f"not {'more than ' + str(MAX_KEY_BYTES) if size > MAX_KEY_BYTES else size}")
    return key


async def read_key(fd: object, what: str = "key") -> bytearray:
    """The key on descriptor *fd* (the router's: not closed here)."""
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
        raise errors.InvalidArgument(f"{what}: a key is passed as a file descriptor (h)")
    return await asyncio.to_thread(_read_key, fd, what)


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
