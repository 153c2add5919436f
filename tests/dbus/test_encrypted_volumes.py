"""Encrypted volumes over a real dbus-daemon, against dmd --sim: keys go in
as file descriptors (an ``h`` inside the options), every bad descriptor or
key is a named error that changes nothing, and the Volume's properties say
whether it is locked and why."""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from test_open_device import open_device  # type: ignore[import-not-found]
from test_pools_api import (  # type: ignore[import-not-found]
    create_pool,
    disks,
    finished,
    objects,
    props,
)

from dmd.dbus.convert import encryption_in
from dmd.dbus.names import BUS_NAME, POOL_INTERFACE, VOLUME_INTERFACE
from dmd.service import errors
from dmd.service.auth import Caller
from tests.dbus.bus_client import CallError, Client

__all__ = ["disks"]  # the fixture, used by name

MIB = 1 << 20
KEY = b"a key that is long enough"
OTHER = b"the second key of the volume"
FAST = {"pbkdf-memory-kib": Variant("u", 32), "pbkdf-iterations": Variant("u", 4)}


@pytest.fixture
async def fd_bus(dmd_session: Any) -> AsyncIterator[MessageBus]:
    bus = MessageBus(bus_address=dmd_session.address, bus_type=BusType.SESSION,
                     negotiate_unix_fd=True)
    await bus.connect()
    yield bus
    bus.disconnect()


def key_pipe(key: bytes) -> int:
    """The read end of a pipe holding *key*, its write end closed."""
    read_end, write_end = os.pipe()
    os.write(write_end, key)
    os.close(write_end)
    return read_end


async def call(bus: MessageBus, path: str, interface: str, member: str, signature: str,
               body: list[Any], fds: list[int] = ()) -> list[Any]:  # type: ignore[assignment]
    try:
        reply = await bus.call(Message(destination=BUS_NAME, path=path, interface=interface,
                                       member=member, signature=signature, body=body,
                                       unix_fds=list(fds)))
    finally:
        for fd in fds:
            os.close(fd)
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise CallError(reply.error_name or "", reply.body[0] if reply.body else "")
    return list(reply.body)


async def encrypted_volume(client: Client, bus: MessageBus, disks: list[str],
                           name: str = "secret") -> str:
    pool, job = await create_pool(client, "tank", disks[:1])
    assert (await finished(client, job))["State"] == "completed"
    volume, job = await call(bus, pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                             [name, 64 * MIB, {"encryption": Variant("s", "luks2"),
                                               "key": Variant("h", 0), **FAST}],
                             [key_pipe(KEY)])
    state = await finished(client, job)
    assert state["State"] == "completed", state
    return str(volume)


async def test_create_lock_unlock_and_change_keys_over_the_bus(
        client: Client, fd_bus: MessageBus, disks: list[str]) -> None:
    volume = await encrypted_volume(client, fd_bus, disks)
    shown = await props(client, volume, VOLUME_INTERFACE)
    assert shown["Encryption"] == "luks2" and not shown["Locked"]
    assert shown["CleartextPath"] == "/dev/mapper/tank-secret-crypt"
    assert shown["CleartextDevice"] != "/"
    payload = os.urandom(MIB)
    fd = await open_device(fd_bus, volume, "rw")
    try:
        os.pwrite(fd, payload, 0)
        os.fsync(fd)
    finally:
        os.close(fd)

    await call(fd_bus, volume, VOLUME_INTERFACE, "Lock", "a{sv}", [{}])
    shown = await props(client, volume, VOLUME_INTERFACE)
    assert shown["Locked"] and shown["LockedReason"] == "locked"
    assert shown["CleartextDevice"] == "/" and shown["CleartextPath"] == ""
    with pytest.raises(CallError) as refused:
        await open_device(fd_bus, volume, "r")
    assert refused.value.name.endswith(".Locked")

    with pytest.raises(CallError) as wrong:
        await call(fd_bus, volume, VOLUME_INTERFACE, "Unlock", "a{sv}",
                   [{"key": Variant("h", 0)}], [key_pipe(OTHER)])
    assert wrong.value.name.endswith(".WrongKey")
    assert (await props(client, volume, VOLUME_INTERFACE))["Locked"]

    await call(fd_bus, volume, VOLUME_INTERFACE, "ChangeKey", "a{sv}",
               [{"key": Variant("h", 0), "new-key": Variant("h", 1), **FAST}],
               [key_pipe(KEY), key_pipe(OTHER)])
    await call(fd_bus, volume, VOLUME_INTERFACE, "Unlock", "a{sv}",
               [{"key": Variant("h", 0)}], [key_pipe(OTHER)])
    assert not (await props(client, volume, VOLUME_INTERFACE))["Locked"]
    fd = await open_device(fd_bus, volume, "r")
    try:
        assert hashlib.sha256(os.pread(fd, MIB, 0)).digest() == \
            hashlib.sha256(payload).digest()
    finally:
        os.close(fd)


def _directory() -> int:
    return os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY)


def _socket() -> int:
    left, right = socket.socketpair()
    right.close()
    return left.detach()


async def test_bad_descriptors_and_keys_are_named_errors_that_change_nothing(
        client: Client, fd_bus: MessageBus, disks: list[str]) -> None:
    volume = await encrypted_volume(client, fd_bus, disks)
    pool = (await props(client, volume, VOLUME_INTERFACE))["Pool"]
    before = sorted(await objects(client))
    encrypted = {"encryption": Variant("s", "luks2"), **FAST}
    cases: list[tuple[str, str, list[Any], list[int], str]] = [
        # (what, member, body, fds, the error's message has)
        ("index past the descriptors", "CreateVolume",
         ["v", 64 * MIB, {**encrypted, "key": Variant("h", 1)}], [key_pipe(KEY)], "index 1"),
        ("index 2^32-1 (a C caller's -1)", "CreateVolume",
         ["v", 64 * MIB, {**encrypted, "key": Variant("h", 0xFFFFFFFF)}], [key_pipe(KEY)],
         "index 4294967295"),
        ("an index without descriptors", "CreateVolume",
         ["v", 64 * MIB, {**encrypted, "key": Variant("h", 0)}], [], "0 descriptor"),
        ("a directory", "CreateVolume",
         ["v", 64 * MIB, {**encrypted, "key": Variant("h", 0)}], [_directory()],
         "a directory"),
        ("a socket", "CreateVolume",
         ["v", 64 * MIB, {**encrypted, "key": Variant("h", 0)}], [_socket()], "a socket"),
        ("a short key", "CreateVolume",
         ["v", 64 * MIB, {**encrypted, "key": Variant("h", 0)}], [key_pipe(b"short")],
         "not 5"),
        ("a long key", "CreateVolume",
         ["v", 64 * MIB, {**encrypted, "key": Variant("h", 0)}], [key_pipe(b"k" * 9000)],
         "more than 8192"),
        ("no key", "CreateVolume", ["v", 64 * MIB, encrypted], [], "needs a key"),
        ("a key without encryption", "CreateVolume",
         ["v", 64 * MIB, {"key": Variant("h", 0)}], [key_pipe(KEY)], "go with encryption"),
        ("a weak pbkdf", "CreateVolume",
         ["v", 64 * MIB, {**encrypted, "pbkdf": Variant("s", "md5"),
                          "key": Variant("h", 0)}], [key_pipe(KEY)], "pbkdf 'md5'"),
    ]
    for what, member, body, fds, message in cases:
        with pytest.raises(CallError) as refused:
            await call(fd_bus, pool, POOL_INTERFACE, member, "sta{sv}", body, fds)
        assert refused.value.name.endswith(".InvalidArgument"), (what, refused.value)
        assert message in str(refused.value), (what, refused.value)
    for what, fds, message in [("a directory", [_directory()], "a directory"),
                               ("index past", [], "index 0")]:
        with pytest.raises(CallError) as refused:
            await call(fd_bus, volume, VOLUME_INTERFACE, "Unlock", "a{sv}",
                       [{"key": Variant("h", 0)}], fds)
        assert refused.value.name.endswith(".InvalidArgument"), (what, refused.value)
        assert message in str(refused.value), (what, refused.value)
    assert sorted(await objects(client)) == before


async def test_only_root_names_a_keyring_key() -> None:
    with pytest.raises(errors.NotAuthorized):
        await encryption_in({"encryption": "luks2", "key-description": "anything"},
                          Caller(uid=1000))
