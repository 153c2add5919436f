"""Between D-Bus values and the service layer's: tables, options, properties.

Everything a client sends is checked here before the service sees it, so a
wrong type or an oversized value is an InvalidArgument that names the rule,
never a crash deep inside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from dbus_fast import Variant

from dmd.engine import InvalidArgument as EngineInvalidArgument
from dmd.engine import TargetLine
from dmd.engine.luks import KdfSettings
from dmd.engine.targets import TargetFailed, parse_status
from dmd.service import errors
from dmd.service.auth import Caller
from dmd.service.pools.crypt import KINDS as ENCRYPTION_KINDS
from dmd.service.pools.crypt import EncryptionRequest, check_kdf, request_key
from dmd.service.secrets import check_key_description, read_key

# A table's text goes into one ioctl buffer; the kernel caps a table at a few
# MiB of memory anyway. These limits keep one call from costing the daemon
# more than a moment (validation is linear in them).
MAX_TABLE_LINES = 65536
MAX_TABLE_BYTES = 4 << 20
MAX_STRING_BYTES = 65536

def table_out(table: tuple[TargetLine, ...] | list[TargetLine]) -> list[list[Any]]:
    return [[line.start, line.length, line.target_type, line.params] for line in table]


def _typed_value(value: Any) -> Variant | None:
    """A status field as a Variant: ints as t (x when negative), nested
    records as a{sv}, tuples as arrays; None is left out."""
    if value is None:
        return None
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("x" if value < 0 else "t", value)
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return Variant("a{sv}", _typed_fields(value))
    if isinstance(value, tuple | list):
        items = [_typed_value(v) for v in value]
        kept = [v for v in items if v is not None]
        signatures = {v.signature for v in kept}
        if len(signatures) == 1 and len(kept) == len(items):
            sig = signatures.pop()
            return Variant("a" + sig, [v.value for v in kept])
        return Variant("av", kept)
    return Variant("s", str(value))


def _typed_fields(record: Any) -> dict[str, Variant]:
    out = {}
    for f in dataclasses.fields(record):
        value = _typed_value(getattr(record, f.name))
        if value is not None:
            out[f.name.replace("_", "-")] = value
    return out


def typed_status_out(lines: list[TargetLine]) -> list[dict[str, Variant]]:
    """One a{sv} per status line: start, length, target, state ("ok", the
    kernel's failure word, or "unparsed" for targets without a model, or a
    status this dmd cannot read), raw, and the target's own fields."""
    out = []
    for line in lines:
        entry = {"start": Variant("t", line.start), "length": Variant("t", line.length),
                 "target": Variant("s", line.target_type), "raw": Variant("s", line.params)}
        try:
            typed = parse_status(line.target_type, line.params)
        except EngineInvalidArgument:
            typed = line.params
        if isinstance(typed, TargetFailed):
            entry["state"] = Variant("s", typed.state)
        elif isinstance(typed, str):
            entry["state"] = Variant("s", "unparsed")
        else:
            entry["state"] = Variant("s", "ok")
            entry.update(_typed_fields(typed))
        out.append(entry)
    return out


def as_variants(values: Mapping[str, Any], signatures: Mapping[str, str]
                ) -> dict[str, Variant]:
    return {name: Variant(signatures[name], value) for name, value in values.items()}


def check_string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise errors.InvalidArgument(f"{what} must be a string")
    if len(value) > MAX_STRING_BYTES:
        raise errors.InvalidArgument(f"{what} is longer than {MAX_STRING_BYTES} bytes")
    return value


def table_in(raw: object) -> list[TargetLine]:
    """An a(ttss) from the bus as TargetLines (contiguity etc. is checked by
    the service; here only shape and size)."""
    if not isinstance(raw, list):
        raise errors.InvalidArgument("a table is an array of (start, length, type, params)")
    if len(raw) > MAX_TABLE_LINES:
        raise errors.InvalidArgument(f"a table has at most {MAX_TABLE_LINES} lines")
    total = 0
    lines: list[TargetLine] = []
    for number, entry in enumerate(raw):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 4):
            raise errors.InvalidArgument(f"table line {number}: expected (ttss)")
        start, length, target_type, params = entry
        total += len(target_type) + len(params) + 40
        if total > MAX_TABLE_BYTES:
            raise errors.InvalidArgument(f"the table is larger than {MAX_TABLE_BYTES} bytes")
        lines.append(TargetLine(start, length, target_type, params))
    return lines


# How a new keyslot derives its key (dmd.service.pools.crypt.check_kdf).
KDF_OPTIONS = {"pbkdf": "s", "pbkdf-time-ms": "u", "pbkdf-memory-kib": "u",
               "pbkdf-iterations": "u"}

# Options each method accepts: name -> D-Bus signature.
OPTIONS: dict[str, dict[str, str]] = {
    "CreateDevice": {"uuid": "s", "read-only": "b", "persistent": "b", "labels": "a{ss}"},
    "LoadTable": {"read-only": "b"},
    "Reload": {"read-only": "b"},
    "Suspend": {"noflush": "b", "skip-lockfs": "b"},
    "Remove": {"force": "b", "deferred": "b"},
    "Adopt": {"persistent": "b"},
    "CreatePool": {"force": "b", "block-size": "t", "on-full": "s", "low-water": "u",
                   "data-size": "t", "no-space-timeout": "u",
                   "metadata-size": "t"},
    "ImportPool": {},
    "CreateVolume": {"labels": "a{ss}", "filesystem": "s", "encryption": "s", "key": "h",
                     "key-description": "s", **KDF_OPTIONS,
                     "thin": "b", "stripes": "u", "stripe-size": "t"},
    "Snapshot": {"labels": "a{ss}", "activate": "b", "udev-sync": "b"},
    "Delete": {"udev-sync": "b"},
    "Activate": {"udev-sync": "b"},
    "Deactivate": {"udev-sync": "b"},
    "Resize": {"shrink": "b", "filesystem": "b"},
    "Revert": {},
    "Destroy": {"force": "b"},
    "Stop": {},
    "Repair": {"devices": "as", "accept-loss": "b"},
    "ListDisks": {},
    "Start": {"devices": "as"},
    "AddDevice": {"force": "b"},
    "OpenDevice": {"exclusive": "b"},
    "Unlock": {"key": "h"},
    "Lock": {},
    "ChangeKey": {"key": "h", "new-key": "h", "remove": "b", **KDF_OPTIONS},
    "AttachCache": {"mode": "s", "block-size": "t", "force": "b"},
    "DetachCache": {},
}


def options_in(method: str, raw: object) -> dict[str, Any]:
    """An a{sv} of options, every key known to *method* and of its type."""
    if not isinstance(raw, dict):
        raise errors.InvalidArgument("options must be an a{sv}")
    allowed = OPTIONS.get(method, {})
    out: dict[str, Any] = {}
    for key, variant in raw.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise errors.InvalidArgument(
                f"{method}: unknown option {key!r} (known: {known})")
        if not isinstance(variant, Variant) or variant.signature != allowed[key]:
            raise errors.InvalidArgument(
                f"{method}: option {key!r} must be of type {allowed[key]!r}")
        out[key] = variant.value
    return out


def size_in(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise errors.InvalidArgument(f"{what} must be a number of bytes")
    return value


def kdf_in(opts: dict[str, Any]) -> KdfSettings:
    return check_kdf(opts.get("pbkdf", "argon2id"), opts.get("pbkdf-time-ms"),
                     opts.get("pbkdf-memory-kib"), opts.get("pbkdf-iterations"))


def _root_keyring(caller: Caller) -> None:
    if caller.uid != 0:
        raise errors.NotAuthorized("key-description names a key in root's keyring: only "
                                   "root may name one (pass the key itself, key)")


async def encryption_in(opts: dict[str, Any], caller: Caller) -> EncryptionRequest | None:
    """CreateVolume's encryption options, with the key read (before the call
    is answered: the caller's descriptor is closed then)."""
    kind = opts.get("encryption")
    keyed = "key" in opts or "key-description" in opts
    if kind is None:
        if keyed or any(k in opts for k in KDF_OPTIONS):
            raise errors.InvalidArgument("key and pbkdf options go with encryption")
        return None
    if kind not in ENCRYPTION_KINDS:
        raise errors.InvalidArgument(f"encryption {kind!r}: one of "
                                     f"{', '.join(ENCRYPTION_KINDS)}")
    kdf = kdf_in(opts)
    description = opts.get("key-description")
    if description is not None:
        _root_keyring(caller)
        check_key_description(description)
    key = await read_key(opts["key"], uid=caller.uid) if "key" in opts else None
    return EncryptionRequest(await request_key(key, description), description, kdf)
