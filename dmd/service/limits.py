"""Calls in flight per caller: what one uid may keep dmd busy with.

Every call waits for something (polkit, a pool's lock, a key on a pipe) and
holds a little memory while it does; a service allowed to call dmd at all
could otherwise queue thousands. Root is not counted: it can stop dmd anyway.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from dmd.service import errors

MAX_CALLS_PER_UID = 32
# Per connection, counted before its uid is known: as many as dbus-daemon's
# system bus lets one connection wait for (max_replies_per_connection, 128);
# a session bus has no such limit of its own.
MAX_CALLS_PER_CONNECTION = 128


class CallLimits:
    """Calls in flight per uid, and per connection from the moment a call
    arrives: its uid is known only once the bus daemon has answered, and a
    burst from a new connection must not pile up meanwhile."""

    def __init__(self, per_uid: int = MAX_CALLS_PER_UID,
                 per_connection: int = MAX_CALLS_PER_CONNECTION) -> None:
        self.per_uid, self.per_connection = per_uid, per_connection
        self._in_flight: Counter[int] = Counter()
        self._by_sender: Counter[str] = Counter()

    def enter(self, sender: str, uid: int | None = None) -> bool:
        """Count one more call of connection *sender* (whose *uid* may be
        known already: root's are not bounded); False (not counted) when it
        has as many in flight as a uid may."""
        if uid != 0 and self._by_sender[sender] >= self.per_connection:
            return False
        self._by_sender[sender] += 1
        return True

    def leave(self, sender: str) -> None:
        self._by_sender[sender] -= 1
        if not self._by_sender[sender]:
            del self._by_sender[sender]

    @contextlib.contextmanager
    def hold(self, uid: int) -> Iterator[None]:
        """One call of *uid* in flight for the block; LimitExceeded when it
        has as many as it may."""
        if uid != 0 and self._in_flight[uid] >= self.per_uid:
            raise errors.LimitExceeded(f"uid {uid} has {self.per_uid} calls to dmd in flight; "
                                       "wait for their replies")
        self._in_flight[uid] += 1
        try:
            yield
        finally:
            self._in_flight[uid] -= 1
            if not self._in_flight[uid]:
                del self._in_flight[uid]
