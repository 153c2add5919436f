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


class CallLimits:
    def __init__(self, per_uid: int = MAX_CALLS_PER_UID) -> None:
        self.per_uid = per_uid
        self._in_flight: Counter[int] = Counter()

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
