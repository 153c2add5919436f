"""Keys read from a caller's descriptor never hold a thread dmd shares: a
file whose read hangs (a dead network or FUSE mount) fails the call at the
deadline, the read's own thread left to end whenever it does; a pipe is read
through a non-blocking descriptor of dmd's own, so a second reader that
takes the bytes cannot make dmd wait."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from dmd.service import errors, secrets

KEY = b"correct horse battery staple"


async def read_from_a_pipe(uid: int = 0) -> bytearray:
    r, w = os.pipe()
    os.write(w, KEY)
    os.close(w)
    try:
        return await secrets.read_key(r, uid=uid)
    finally:
        os.close(r)


async def test_a_pipe_and_a_file_are_read(tmp_path: Path) -> None:
    assert await read_from_a_pipe() == KEY
    path = tmp_path / "key"
    path.write_bytes(KEY)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 5, os.SEEK_SET)  # the whole file is the key, whatever the offset
        assert await secrets.read_key(fd) == KEY
    finally:
        os.close(fd)


async def test_a_hanging_file_read_holds_no_shared_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "KEY_READ_SECONDS", 0.3)
    release = threading.Event()
    real = os.preadv

    def hang(fd: int, buffers: list[memoryview], offset: int) -> int:
        release.wait(30)  # a hung mount
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", hang)
    path = tmp_path / "key"
    path.write_bytes(KEY)
    per_uid = secrets.MAX_KEY_READERS_PER_UID
    fds = [os.open(path, os.O_RDONLY) for _ in range(per_uid + 4)]
    try:
        began = time.monotonic()
        results = await asyncio.gather(*(secrets.read_key(fd, uid=1000) for fd in fds),
                                       return_exceptions=True)
        assert time.monotonic() - began < 3
        timed_out = [r for r in results if isinstance(r, errors.InvalidArgument)]
        refused = [r for r in results if isinstance(r, errors.LimitExceeded)]
        # One uid's hung files hold its own share of readers, nobody else's.
        assert len(timed_out) == per_uid and len(refused) == 4, results
        with pytest.raises(errors.LimitExceeded):
            await read_from_a_pipe(uid=1000)
        assert await read_from_a_pipe(uid=1001) == KEY
        # The shared executor answers meanwhile.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 1), 1) == 1
    finally:
        for fd in fds:
            os.close(fd)  # the readers hold copies of their own
        release.set()
    # Their threads end once the reads do, and give their places back.
    for _ in range(100):
        try:
            assert await read_from_a_pipe(uid=1000) == KEY
            break
        except errors.LimitExceeded:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the readers' places never came back")


async def test_a_pipe_emptied_by_another_reader_does_not_block(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Between dmd's poll and its read, the caller (who kept the read end)
    takes the bytes: dmd's read returns at once, and the call fails at the
    deadline, not never."""
    monkeypatch.setattr(secrets, "KEY_READ_SECONDS", 0.5)
    r, w = os.pipe()
    real = os.readv
    stolen = []

    def thief(fd: int, buffers: list[memoryview]) -> int:
        if not stolen:
            stolen.append(os.read(r, 4096))  # the other reader wins the race
        return real(fd, buffers)

    monkeypatch.setattr(os, "readv", thief)
    os.write(w, KEY)  # the write end stays open: no end of file
    try:
        began = time.monotonic()
        with pytest.raises(errors.InvalidArgument, match="not closed within"):
            await secrets.read_key(r)
        assert time.monotonic() - began < 2 and stolen == [KEY]
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("kind", ["socket", "directory"])
async def test_what_is_not_a_pipe_or_a_file_is_refused(tmp_path: Path, kind: str) -> None:
    import socket

    if kind == "socket":
        a, b = socket.socketpair()
        fd, keep = a.detach(), b
    else:
        fd, keep = os.open(tmp_path, os.O_RDONLY), None
    try:
        with pytest.raises(errors.InvalidArgument, match=f"is a {kind}"):
            await secrets.read_key(fd)
    finally:
        os.close(fd)
        if keep is not None:
            keep.close()


async def test_a_pipes_write_end_is_refused() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(errors.InvalidArgument, match="read end"):
            await secrets.read_key(w)
    finally:
        os.close(r)
        os.close(w)
