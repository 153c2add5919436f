"""File descriptors that come with a call, put where the call names them.

On the wire an ``h`` is an index into the descriptors the message carries.
dmd resolves every index itself, at the top level and inside variants (an
option such as ``{"key": <h 0>}``), and refuses one that is negative or past
the descriptors sent: dbus-fast's own helper would take a negative index
from the end of the list (udisks read a negative index unchecked:
CVE-2025-8067). What the descriptor is (a pipe, a file) is for the
handler that reads it to check. The router closes every descriptor after
the handler has run.
"""

from __future__ import annotations

from typing import Any

from dbus_fast import Variant
from dbus_fast.signature import SignatureType, get_signature_tree

from dmd.service import errors


def _fd(index: Any, fds: list[int]) -> int:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(fds):
        raise errors.InvalidArgument(
            f"file descriptor index {index!r}: the call carried {len(fds)} descriptor(s)")
    return fds[index]


def _resolve(kind: SignatureType, value: Any, fds: list[int]) -> Any:
    token = kind.token
    if token == "h":
        return _fd(value, fds)
    if token == "v":
        if not may_carry_fds(value.signature):
            return value
        inner = get_signature_tree(value.signature).types[0]
        return Variant(value.signature, _resolve(inner, value.value, fds), verify=False)
    if token == "a":
        child = kind.children[0]
        if child.token == "{":
            key_kind, value_kind = child.children
            return {_resolve(key_kind, k, fds): _resolve(value_kind, v, fds)
                    for k, v in value.items()}
        return [_resolve(child, item, fds) for item in value]
    if token == "(":
        return [_resolve(c, item, fds) for c, item in zip(kind.children, value, strict=True)]
    return value


def may_carry_fds(signature: str) -> bool:
    return "h" in signature or "v" in signature


def resolve_fds(signature: str, body: list[Any], fds: list[int]) -> list[Any]:
    """*body* with every ``h`` index replaced by its descriptor."""
    if not may_carry_fds(signature):
        return body
    kinds = get_signature_tree(signature).types
    return [_resolve(kind, value, fds) for kind, value in zip(kinds, body, strict=True)]
