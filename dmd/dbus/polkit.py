"""Ask polkit whether a caller may make a change (the service's Authorizer)."""

from __future__ import annotations

import logging

from dbus_fast import Message, Variant

from dmd.dbus.bus import BusCallFailed, DmdBus
from dmd.dbus.names import ACTION_PREFIX
from dmd.service import errors
from dmd.service.auth import Action, Caller

log = logging.getLogger(__name__)

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
ALLOW_USER_INTERACTION = 0x1
# Errors that mean "nobody answers for polkit on this bus".
_ABSENT = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
    "org.freedesktop.DBus.Error.Spawn.ExecFailed",
}


class PolkitAuthorizer:
    """Subject: the caller's bus name (polkit then checks the process and its
    session itself, so a caller cannot pretend to be someone else)."""

    def __init__(self, bus: DmdBus) -> None:
        self.bus = bus

    async def authorize(self, caller: Caller, action: Action, device: str) -> None:
        action_id = ACTION_PREFIX + action.value
        what = f"{action.value} {device}"
        if caller.bus_name is None:
            raise errors.NotAuthorized(f"{what}: caller has no bus name to check")
        subject = ["system-bus-name", {"name": Variant("s", caller.bus_name)}]
        flags = ALLOW_USER_INTERACTION if caller.interactive else 0
        try:
            reply = await self.bus.call_checked(Message(
                destination=POLKIT_NAME, path=POLKIT_PATH, interface=POLKIT_INTERFACE,
                member="CheckAuthorization", signature="(sa{sv})sa{ss}us",
                body=[subject, action_id, {"device": device}, flags, ""]))
        except BusCallFailed as exc:
            if exc.error_name in _ABSENT:
                raise errors.NotAuthorized(
                    f"{what}: uid {caller.uid} is not root and polkit is not running "
                    "to authorize it") from None
            log.warning("polkit %s for uid %d failed: %s", action_id, caller.uid, exc)
            raise errors.NotAuthorized(f"{what}: polkit could not decide ({exc})") from None
        authorized, challenge, _details = reply.body[0]
        if not authorized:
            hint = (" (authentication is required: call with interactive authorization)"
                    if challenge and not caller.interactive else "")
            raise errors.NotAuthorized(
                f"{what}: polkit refused {action_id} to uid {caller.uid}{hint}")
        log.info("%s: polkit allowed %s to uid %d", what, action_id, caller.uid)
