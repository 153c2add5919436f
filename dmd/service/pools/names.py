"""Pool and volume names, and the device-mapper names dmd makes of them: the
one home of both, so that no name a caller may choose can ever be the name of
another device dmd makes.

A name is 1 to 64 of the letters, digits, "_", ".", "+" and "-", beginning
and ending with a letter or a digit. It is checked once, where it comes in
(``PoolName``/``VolumeName``), and never again.

A device name is the parts it is made of joined by "-", each part with its
own "-" doubled (LVM's scheme: volume ``web-data`` of pool ``tank`` is
``tank-web--data``). Since no part begins or ends with "-", a device name
splits back into its parts in one way only (``parts``), so two different
lists of parts never make the same name:

    POOL-tmeta  POOL-tdata  POOL-tpool         the pool's own devices
    POOL-VOLUME                                 an active volume
    POOL-VOLUME-crypt                           its cleartext (encrypted)
    POOL-VOLUME-corig/-cmeta/-cdata             its cache's devices

The only two-part names that are not volumes are the pool's own, so those
three words are not volume names: the rule is stated here, beside the names
it protects, and ``POOL_PARTS`` is what both read. (The pool's devices keep
the names pools were made with before this rule, so that no deployed pool has
to be renamed under its volumes' live tables.)
"""

from __future__ import annotations

import re
from enum import StrEnum

from dmd.service import errors

NAME_MAX = 64
DM_NAME_MAX = 127  # DM_NAME_LEN (128) with its NUL
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.+-]{0,62}[A-Za-z0-9])?")
_LEGACY = re.compile(r"[A-Za-z0-9_.+]{1,64}")  # the rule before "-" was allowed


class PoolPart(StrEnum):
    """The pool's own devices: the last part of their names."""

    TMETA = "tmeta"
    TDATA = "tdata"
    TPOOL = "tpool"


class VolumePart(StrEnum):
    """A volume's other devices: the last part of their names."""

    CRYPT = "crypt"
    CORIG = "corig"
    CMETA = "cmeta"
    CDATA = "cdata"


POOL_PARTS = frozenset(str(p) for p in PoolPart)
# The longest device name a volume has: POOL-VOLUME-corig and the like.
_LONGEST_PART = max(len(p) for p in VolumePart)


def _check(name: object, what: str) -> str:
    # fullmatch: "^...$" would take a name that ends in a newline.
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise errors.InvalidArgument(
            f"a {what} name is 1 to {NAME_MAX} letters, digits, '_', '.', '+' or '-', "
            f"beginning and ending with a letter or a digit, not {name!r}")
    return name


class PoolName(str):
    """A pool name, checked when made: its own devices' names (its "-"
    doubled) must be names the kernel takes."""

    __slots__ = ()

    def __new__(cls, name: object) -> PoolName:
        checked = _check(name, "pool")
        longest = max(len(join(checked, part)) for part in PoolPart)
        if longest > DM_NAME_MAX:
            raise errors.InvalidArgument(
                f"pool {checked!r} would make a device name of {longest} characters; the "
                f"kernel takes {DM_NAME_MAX}")
        return super().__new__(cls, checked)


class VolumeName(str):
    """A volume name, checked when made: never one of the pool's own
    devices' parts, and short enough that every device of the volume has a
    name the kernel takes (which depends on its pool's name)."""

    __slots__ = ()

    def __new__(cls, name: object, pool: str | None = None) -> VolumeName:
        checked = _check(name, "volume")
        if checked in POOL_PARTS:
            raise errors.InvalidArgument(
                f"{checked!r} names a pool's own device; a volume may be named anything "
                f"but {', '.join(sorted(POOL_PARTS))}")
        if pool is not None:
            longest = len(join(pool, checked)) + 1 + _LONGEST_PART
            if longest > DM_NAME_MAX:
                raise errors.InvalidArgument(
                    f"volume {checked!r} of pool {pool!r} would make a device name of "
                    f"{longest} characters; the kernel takes {DM_NAME_MAX}")
        return super().__new__(cls, checked)


def _escape(part: str) -> str:
    return part.replace("-", "--")


def join(*parts: str) -> str:
    """The device name made of *parts* (each already a checked name or a
    part word)."""
    return "-".join(_escape(p) for p in parts)


def parts(device: str) -> list[str]:
    """The parts of a device name ``join`` made: [] for a name it could not
    have made (a leading, trailing or tripled "-")."""
    out, part, i = [], [], 0
    while i < len(device):
        if device.startswith("--", i):
            part.append("-")
            i += 2
        elif device[i] == "-":
            out.append("".join(part))
            part = []
            i += 1
        else:
            part.append(device[i])
            i += 1
    out.append("".join(part))
    if any(not p or p.startswith("-") or p.endswith("-") for p in out):
        return []
    return out


def pool_device(pool: str, part: PoolPart) -> str:
    return join(pool, part)


def tpool(pool: str) -> str:
    return pool_device(pool, PoolPart.TPOOL)


def pool_devices(pool: str) -> tuple[str, str, str]:
    """The pool's own devices, in the order they are removed."""
    return (tpool(pool), pool_device(pool, PoolPart.TDATA), pool_device(pool, PoolPart.TMETA))


def volume_device(pool: str, volume: str) -> str:
    return join(pool, volume)


def volume_part(pool: str, volume: str, part: VolumePart) -> str:
    return join(pool, volume, part)


def cleartext_device(pool: str, volume: str) -> str:
    """An encrypted volume's opened (cleartext) device."""
    return volume_part(pool, volume, VolumePart.CRYPT)


# cryptsetup's DM UUID for a cleartext device, CRYPT-LUKS2-<32 hex>-NAME,
# must fit the kernel's 128 characters: it bounds the name of an encrypted
# volume's cleartext device.
CLEARTEXT_UUID_PREFIX = "CRYPT-LUKS2-"
CLEARTEXT_NAME_MAX = 128 - len(CLEARTEXT_UUID_PREFIX) - 32 - 1


def check_cleartext(pool: str, volume: str) -> None:
    """InvalidArgument unless an encrypted volume of this name can be opened
    (its cleartext device's DM UUID holds its name)."""
    name = cleartext_device(pool, volume)
    if len(name) > CLEARTEXT_NAME_MAX:
        raise errors.InvalidArgument(
            f"an encrypted volume's cleartext device {name!r} would have {len(name)} "
            f"characters; cryptsetup's DM UUID holds {CLEARTEXT_NAME_MAX}: a shorter name")


def legacy_name(name: object, what: str, pool: str | None = None) -> str:
    """A name read from a pool's description: this dmd's rule, or the one
    before it (letters, digits, "_", "." and "+", up to 64; no "-", so its
    device names never were ambiguous), never a pool's own device's part, a
    newline, or a device name the kernel refuses. An older dmd's pool must
    stay importable: it is how a pool comes back when dmd's state is lost."""
    if isinstance(name, str) and _LEGACY.fullmatch(name) and name not in (".", ".."):
        if name in POOL_PARTS and what == "volume":
            raise errors.InvalidArgument(f"{name!r} names a pool's own device")
        device = join(pool, name, VolumePart.CORIG) if pool is not None else \
            join(name, PoolPart.TPOOL)
        if len(device) > DM_NAME_MAX:
            raise errors.InvalidArgument(f"{what} {name!r}: its device names are too long")
        return name
    return PoolName(name) if what == "pool" else VolumeName(name, pool)


def cleartext_uuid(luks_uuid: str, device: str) -> str:
    """The DM UUID cryptsetup gives the cleartext device *device* of the LUKS2
    header with UUID *luks_uuid*."""
    return f"{CLEARTEXT_UUID_PREFIX}{luks_uuid.replace('-', '')}-{device}"


def pool_of(device: str) -> str | None:
    """The pool a device name of dmd's belongs to (None: not one of them)."""
    split = parts(device)
    return split[0] if len(split) >= 2 else None


def claim_prefix(pool: str) -> str:
    """What every device of the pool's name begins with; ``in_pool`` says
    whether a name that begins so really is the pool's (pool ``a``'s prefix
    also begins pool ``a-b``'s devices: ``a--b-...``)."""
    return join(pool) + "-"


def in_pool(device: str, prefix: str) -> bool:
    return device.startswith(prefix) and not device.startswith("-", len(prefix))
