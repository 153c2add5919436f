"""Per-device serialization: one operation at a time on a name, many names at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class DeviceLocks:
    """asyncio locks keyed by device name, dropped when nobody holds or waits.

    Operations that involve several names (rename) take them in sorted order,
    so two renames crossing each other cannot deadlock.
    """

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, *names: str) -> AsyncIterator[None]:
        ordered = sorted(set(names))
        for name in ordered:
            self._users[name] = self._users.get(name, 0) + 1
            self._locks.setdefault(name, asyncio.Lock())
        acquired: list[asyncio.Lock] = []
        try:
            for name in ordered:
                await self._locks[name].acquire()
                acquired.append(self._locks[name])
            yield
        finally:
            for lock in reversed(acquired):
                lock.release()
            for name in ordered:
                self._users[name] -= 1
                if self._users[name] == 0:
                    del self._users[name]
                    del self._locks[name]

    def busy(self, name: str) -> bool:
        return name in self._users
