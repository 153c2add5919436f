"""Every method call on dmd's interfaces comes through here.

The router checks the call's signature against the declared interface (a
wrong type is an InvalidArgument, not dbus-fast's UnknownMethod), finds who is
calling, runs the handler as a task so slow calls never block others, and
turns every failure into a named error. GetManagedObjects is answered from
the cached property values in one pass (dbus-fast's own handler re-checks the
whole result after every object, quadratic in the number of devices).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from dbus_fast import ErrorType, Message, MessageFlag, MessageType
from dbus_fast._private.util import replace_fds_with_idx
from dbus_fast.service import ServiceInterface
from dbus_fast.signature import get_signature_tree

from dmd.dbus.bus import DmdBus
from dmd.dbus.declare import CachedObject
from dmd.dbus.fds import may_carry_fds, resolve_fds
from dmd.dbus.names import (
    ERROR_PREFIX,
    OBJECT_MANAGER_INTERFACE,
    ROOT_PATH,
)
from dmd.service import errors
from dmd.service.auth import Caller
from dmd.service.limits import CallLimits

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]]


Resolver = Callable[[str], "list[Any] | None"]

BUS_DAEMON = "org.freedesktop.DBus"
NOT_SUPPORTED = "org.freedesktop.DBus.Error.NotSupported"  # what it says of such a reply
UNDELIVERED_WAIT = 10.0  # seconds the bus daemon has to say a reply went nowhere


@dataclass(frozen=True, slots=True)
class ObjectKind:
    """One kind of object: its interface's methods are *handlers*' methods.
    Objects live at ROOT_PATH (*prefix* None) or under *prefix*; *resolve*
    turns an object's path into the arguments its handlers take first (the
    device's name, the pool's, ...) or None when the object is gone."""

    prototype: ServiceInterface
    handlers: object
    prefix: str | None = None
    resolve: Resolver | None = None


class HasObjects(Protocol):
    @property
    def objects(self) -> Mapping[str, CachedObject]: ...


@dataclass(frozen=True, slots=True)
class _Route:
    handler: Handler
    in_signature: str
    out_signature: str
    outputs: int
    resolve: Resolver | None


def _routes(kind: ObjectKind) -> dict[str, _Route]:
    routes = {}
    for method in kind.prototype.introspect().methods:
        if not hasattr(kind.handlers, method.name):
            continue  # another kind's handlers serve it (one interface, two services)
        outputs = len(get_signature_tree(method.out_signature).types)
        routes[method.name] = _Route(getattr(kind.handlers, method.name), method.in_signature,
                                     method.out_signature, outputs, kind.resolve)
    return routes


def error_reply(msg: Message, exc: errors.ServiceError) -> Message:
    return Message.new_error(msg, ERROR_PREFIX + exc.name, str(exc))


class Router:
    def __init__(self, bus: DmdBus, kinds: list[ObjectKind], sources: list[HasObjects]) -> None:
        self.bus, self.sources = bus, sources
        self._routes: dict[str, dict[str, _Route]] = {}
        self._prefixes: dict[str | None, str] = {}  # path prefix -> interface
        for kind in kinds:
            routes = self._routes.setdefault(kind.prototype.name, {})
            routes.update(_routes(kind))
            self._prefixes[kind.prefix] = kind.prototype.name
        for kind in kinds:
            missing = {m.name for m in kind.prototype.introspect().methods} - set(
                self._routes[kind.prototype.name])
            assert not missing, f"{kind.prototype.name}: no handler for {sorted(missing)}"
        self._in_flight: set[asyncio.Task[None]] = set()
        self._fd_replies: dict[int, Message] = {}  # reply serial -> its call
        self.limits = CallLimits()
        self.accepting = True

    @property
    def in_flight(self) -> int:
        """Calls being answered now."""
        return len(self._in_flight)

    # -- dispatch (runs inside dbus-fast's reader callback: must not block) --
    def handle(self, msg: Message) -> Message | bool | None:
        # dbus-fast (5.2.0) starts a new descriptor list only after a message
        # that had descriptors: a message without them shares its list with
        # the next message, whose descriptors are added to it once read. This
        # runs before the next message is read: the list held here is this
        # message's alone, and the next one's descriptors go to the next.
        # (Reported upstream as docs/upstream/dbus-fast-unix-fds.md says.)
        msg.unix_fds = list(msg.unix_fds)
        answer = self._dispatch(msg)
        if answer is not True:
            _close(msg.unix_fds)  # only a running handler reads what a call sent
        return answer

    def _dispatch(self, msg: Message) -> Message | bool | None:
        if (msg.message_type is MessageType.ERROR and msg.sender == BUS_DAEMON
                and msg.error_name == NOT_SUPPORTED and msg.reply_serial in self._fd_replies):
            return self._undelivered(msg)
        if msg.message_type is not MessageType.METHOD_CALL:
            return None
        if msg.interface == OBJECT_MANAGER_INTERFACE or (
                msg.interface is None and msg.member == "GetManagedObjects"
                and msg.path == ROOT_PATH):
            # dbus-fast would answer GetManagedObjects on any path with any
            # arguments; only the root is an object manager, and it takes none.
            return self._object_manager(msg)
        route = self._find(msg)
        if route is None:
            return None
        if msg.signature != route.in_signature:
            return error_reply(msg, errors.InvalidArgument(
                f"{msg.member} takes ({route.in_signature}), not ({msg.signature})"))
        if not self.accepting:
            return error_reply(msg, errors.ShuttingDown("dmd is shutting down"))
        if not may_carry_fds(route.in_signature):
            # Nothing here takes a descriptor: close what came now, not after
            # a handler that may wait long (a lock, polkit) has run.
            _close(msg.unix_fds)
            msg.unix_fds = []
        sender = msg.sender or ""
        if not self.limits.enter(sender, self.bus.known_uid(sender)):
            return error_reply(msg, errors.LimitExceeded(
                f"{sender} has {self.limits.per_connection} calls to dmd in flight; wait for "
                "their replies"))
        task = asyncio.get_running_loop().create_task(self._run(msg, route))
        task.add_done_callback(lambda _: self.limits.leave(sender))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return True

    def _find(self, msg: Message) -> _Route | None:
        path, member = msg.path or "", msg.member or ""
        if path == ROOT_PATH:
            interface = self._prefixes.get(None)
        else:
            # Any path under a kind's prefix is that kind's (one that names
            # no object gets NotFound from dmd, not UnknownMethod).
            interface = next((name for prefix, name in self._prefixes.items()
                              if prefix is not None and path.startswith(prefix + "/")), None)
        if interface is None or (msg.interface is not None and msg.interface != interface):
            return None
        return self._routes[interface].get(member)

    def _object_manager(self, msg: Message) -> Message:
        if msg.path != ROOT_PATH:
            return Message.new_error(msg, ErrorType.UNKNOWN_OBJECT.value,
                                     f"{msg.path} is not an object manager ({ROOT_PATH} is)")
        if msg.member != "GetManagedObjects":
            return Message.new_error(msg, ErrorType.UNKNOWN_METHOD.value,
                                     f"{OBJECT_MANAGER_INTERFACE} has no method {msg.member}")
        if msg.signature != "":
            return Message.new_error(msg, ErrorType.INVALID_ARGS.value,
                                     f"GetManagedObjects takes no arguments, not ({msg.signature})")
        return self._managed_objects(msg)

    def _managed_objects(self, msg: Message) -> Message:
        body = {path: {obj.name: obj.variants()}
                for source in self.sources for path, obj in source.objects.items()}
        return Message.new_method_return(msg, "a{oa{sa{sv}}}", [body])

    # -- running -------------------------------------------------------------
    async def _run(self, msg: Message, route: _Route) -> None:
        try:
            caller = Caller(
                uid=await self.bus.caller_uid(msg.sender or ""), bus_name=msg.sender,
                interactive=bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION))
            with self.limits.hold(caller.uid):
                args: list[Any] = resolve_fds(route.in_signature, list(msg.body),
                                              msg.unix_fds)
                if route.resolve is not None:
                    subject = route.resolve(msg.path or "")
                    if subject is None:
                        raise errors.NotFound(f"no object at {msg.path} (it was removed)")
                    args[:0] = subject
                result = await route.handler(caller, *args)
            body = [] if not route.outputs else [result] if route.outputs == 1 else list(result)
            # A handler returns an "h" as the descriptor itself, dmd's to close
            # once it is sent (the kernel has a copy in the message by then).
            body, handed_over = replace_fds_with_idx(route.out_signature, body)
            reply = Message.new_method_return(msg, route.out_signature, body, handed_over)
        except errors.ServiceError as exc:
            log.info("%s %s from %s: %s: %s", msg.member, msg.path, msg.sender, exc.name, exc)
            reply = error_reply(msg, exc)
        except Exception:
            log.exception("%s %s from %s failed", msg.member, msg.path, msg.sender)
            reply = Message.new_error(msg, ERROR_PREFIX + "Failed",
                                      f"{msg.member}: internal error (see dmd's log)")
        finally:
            _close(msg.unix_fds)  # a handler that keeps a caller's descriptor dups it
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED and self.bus.connected:
            try:
                sent = self.bus.send(reply)
            except Exception:
                _close(reply.unix_fds)
                raise
            if reply.unix_fds:
                sent.add_done_callback(lambda _: _close(reply.unix_fds))
                self._expect_delivery(reply.serial, msg)
        else:
            _close(reply.unix_fds)

    # A caller whose connection did not negotiate file descriptors cannot be
    # given one: the bus daemon drops such a reply and tells dmd (not the
    # caller, who would wait for its timeout). dmd then answers the call
    # with an error that says why.
    def _expect_delivery(self, serial: int, call: Message) -> None:
        self._fd_replies[serial] = call
        asyncio.get_running_loop().call_later(
            UNDELIVERED_WAIT, self._fd_replies.pop, serial, None)

    def _undelivered(self, error: Message) -> bool:
        call = self._fd_replies.pop(error.reply_serial)
        log.info("%s %s from %s: reply with a file descriptor not delivered: %s",
                 call.member, call.path, call.sender, error.error_name)
        self.bus.send(error_reply(call, errors.InvalidArgument(
            f"{call.member} replies with a file descriptor, and this connection did not "
            "negotiate file descriptor passing (the bus refused to deliver it)")))
        return True

    async def drain(self) -> None:
        """Refuse new calls; wait for the ones already running to finish."""
        self.accepting = False
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
