"""The one error taxonomy of dmd.

Every refusal or failure a client can see is one of these; the D-Bus layer
maps each class 1:1 to ``org.example.DeviceMapper.Error.<name>``. Messages are
for people: they name the device and the rule, and never carry table
parameters (key material).
"""

from __future__ import annotations

import errno as errno_mod
import os

from dmd.engine import DmError, UdevTimeout
from dmd.engine import InvalidArgument as EngineInvalidArgument


class ServiceError(Exception):
    """Base of every error dmd reports to a client."""

    name = "Failed"


class Failed(ServiceError):
    """What dmd ran failed (a tool's exit status, in the message)."""

    name = "Failed"


class InvalidArgument(ServiceError):
    name = "InvalidArgument"


class NotFound(ServiceError):
    name = "NotFound"


class AlreadyExists(ServiceError):
    name = "AlreadyExists"


class Busy(ServiceError):
    name = "Busy"


class NotAuthorized(ServiceError):
    name = "NotAuthorized"


class WrongKey(NotAuthorized):
    """No keyslot of the volume opens with the key given (or found)."""

    name = "WrongKey"


class Locked(ServiceError):
    """The encrypted volume is locked: Unlock opens it."""

    name = "Locked"


class NotActive(ServiceError):
    """The volume has no device now (Activate makes it)."""

    name = "NotActive"


class Corrupt(ServiceError):
    """What dmd reads from a device fails its checksum or its format."""

    name = "Corrupt"


class Timeout(ServiceError):
    name = "Timeout"


class Kernel(ServiceError):
    """The kernel refused; the message carries the errno and its name."""

    name = "Kernel"

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


def from_engine(exc: BaseException, device: str, operation: str) -> ServiceError:
    """Translate an engine exception into the taxonomy."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, EngineInvalidArgument):
        return InvalidArgument(str(exc))
    if isinstance(exc, UdevTimeout):
        return Timeout(f"{operation} {device}: {exc}")
    if isinstance(exc, DmError):
        code = exc.errno or 0
        if code == errno_mod.ENXIO:
            return NotFound(f"no device {device!r}")
        if code == errno_mod.EBUSY and operation in ("create", "rename", "set-uuid"):
            return AlreadyExists(f"{operation} {device}: name or UUID already in use")
        if code == errno_mod.EBUSY:
            return Busy(f"{operation} {device}: device is busy (open or in use)")
        symbol = errno_mod.errorcode.get(code, str(code))
        return Kernel(
            f"{operation} {device}: kernel refused {exc.command}: {symbol} ({os.strerror(code)})",
            code)
    raise exc


class ShuttingDown(ServiceError):
    name = "ShuttingDown"


class LimitExceeded(ServiceError):
    """A bound dmd keeps (a pool's description, a caller's calls or jobs in
    flight) would be passed: the message names it."""

    name = "LimitExceeded"
