"""In-process change events: the service layer publishes, the bus side listens."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
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


class EventBus:
    """Synchronous fan-out on the event loop thread; a failing subscriber is
    logged and does not stop the others (or the operation that published)."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def publish(self, event: ChangeEvent) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.exception("subscriber failed on %s %s", event.kind.value, event.name)
