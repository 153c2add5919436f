"""Who may change what: root always; anyone else only when an authority says so.

The service layer asks an ``Authorizer`` before every change. The D-Bus side
provides the polkit one; ``RootOnly`` is the safe default when there is no
authority to ask (and what dmd uses when polkit is not on the bus).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from dmd.service import errors


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asked: the D-Bus layer fills this from the bus connection."""

    uid: int
    bus_name: str | None = None
    interactive: bool = False

    @property
    def is_root(self) -> bool:
        return self.uid == 0


ROOT = Caller(uid=0)


class Action(enum.Enum):
    """Kinds of change, each its own polkit action (org.example.devicemapper.*)."""

    CREATE = "create"
    MODIFY = "modify"
    REMOVE = "remove"
    MANAGE = "manage"
    POOL = "pool"  # create, grow and destroy pools
    VOLUME = "volume"  # create volumes; change one's own


class Authorizer(Protocol):
    async def authorize(self, caller: Caller, action: Action, device: str) -> None:
        """Return if *caller* may do *action* on *device*; raise
        errors.NotAuthorized otherwise."""


class RootOnly:
    async def authorize(self, caller: Caller, action: Action, device: str) -> None:
        if not caller.is_root:
            raise errors.NotAuthorized(
                f"{action.value} {device}: only root may change devices "
                f"(uid {caller.uid} asked; no authorization service is configured)")
