"""Each call's descriptors are its own. dbus-fast's reader (5.2.0) starts a
new descriptor list only after a message that had descriptors, so a call
without any shares its list with the next call, which adds its descriptors
to it: V's plain call, ending, closed W's key pipe. The router takes each
message's list for itself before the next message is read."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

from dbus_fast import Message
from dbus_fast._private.unmarshaller import Unmarshaller

from dmd.dbus.router import Router


def _read(sock: socket.socket) -> Iterator[Message]:
    reader = Unmarshaller(None, sock, True)
    while True:
        try:
            message = reader.unmarshall()
        except (BlockingIOError, EOFError):
            return
        if message is None:
            return
        yield message


def _plain_then_keyed() -> socket.socket:
    """A socket holding a call without descriptors, then one with a pipe's."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    plain = Message(destination="org.example.D", path="/p", interface="org.example.X",
                    member="Plain", signature="s", body=["no descriptor"])
    keyed = Message(destination="org.example.D", path="/p", interface="org.example.X",
                    member="Keyed", signature="h", body=[0], unix_fds=[r])
    with ours:
        ours.sendall(plain._marshall(negotiate_unix_fd=True))
        ours.sendmsg([keyed._marshall(negotiate_unix_fd=True)],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, "little"))])
    os.close(r)
    os.close(w)
    theirs.setblocking(False)
    return theirs


def test_dbus_fast_shares_a_plain_calls_list_with_the_next_call() -> None:
    """What the router mends. When this fails, dbus-fast has mended it
    upstream (and the copy in Router.handle may go)."""
    with _plain_then_keyed() as sock:
        plain, keyed = list(_read(sock))
    assert plain.member == "Plain" and keyed.member == "Keyed"
    assert plain.unix_fds is keyed.unix_fds and len(plain.unix_fds) == 1
    os.close(keyed.unix_fds[0])


def test_the_router_gives_each_call_its_own_descriptors() -> None:
    seen: list[Message] = []

    class Recording(Router):
        def __init__(self) -> None:  # no bus: only handle() runs
            pass

        def _dispatch(self, msg: Message) -> bool:
            seen.append(msg)
            return True  # "a handler runs": nothing closed here

    router = Recording()
    with _plain_then_keyed() as sock:
        for message in _read(sock):  # as dbus-fast's reader loop does
            router.handle(message)
    plain, keyed = seen
    assert plain.unix_fds == [] and len(keyed.unix_fds) == 1
    os.close(keyed.unix_fds[0])
