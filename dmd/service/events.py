"""In-process change events: the service layer publishes, the bus side listens.

Two kinds of listener. A subscriber hears every ChangeEvent as it happens.
A settler is awaited by every operation before it returns, with the names
of the devices it touched, succeeded or not: the inventory is the settler,
so that when a caller gets its answer, what dmd shows (the bus's objects and
signals) already holds the change. That rule lives here, below every front
end, so none of them has to remember it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


class ChangeKind(enum.Enum):
    ADDED = "added"
    CHANGED = "changed"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    kind: ChangeKind
    name: str
    device: tuple[int, int] | None
    operation: str


Subscriber = Callable[[ChangeEvent], None]
Settler = Callable[[list[str]], Awaitable[None]]


class EventBus:
    """Synchronous fan-out on the event loop thread; a failing subscriber is
    logged and does not stop the others (or the operation that published)."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._settlers: list[Settler] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def publish(self, event: ChangeEvent) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.exception("subscriber failed on %s %s", event.kind.value, event.name)

    def add_settler(self, settler: Settler) -> Callable[[], None]:
        self._settlers.append(settler)
        return lambda: self._settlers.remove(settler)

    async def settle(self, names: list[str]) -> None:
        """Wait until every settler has taken in the current state of *names*."""
        for settler in list(self._settlers):
            try:
                await settler(names)
            except Exception:
                log.exception("settling %s failed", ", ".join(names))
