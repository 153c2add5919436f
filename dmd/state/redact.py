"""Keep key material out of the database.

crypt tables carry their key as the second parameter and keyed integrity
tables as ``internal_hash:alg:KEY`` (and journal_crypt/journal_mac). A key
given as a kernel keyring reference (``:<size>:<type>:<description>``) names
a key rather than containing it, so it is kept; a literal key is replaced by
``-`` and the record says the key was withheld (such a device cannot be
re-created after a reboot by dmd alone).
"""

from __future__ import annotations

from collections.abc import Sequence

from dmd.engine import TargetLine

WITHHELD = "-"
_KEYED_INTEGRITY = ("internal_hash:", "journal_crypt:", "journal_mac:")


def _redact_crypt(params: str) -> tuple[str, bool]:
    args = params.split()
    if len(args) < 2 or args[1].startswith(":") or args[1] == WITHHELD:
        return params, False
    args[1] = WITHHELD
    return " ".join(args), True


def _redact_integrity(params: str) -> tuple[str, bool]:
    out, withheld = [], False
    for arg in params.split():
        if arg.startswith(_KEYED_INTEGRITY) and arg.count(":") >= 2:
            name, alg, _key = arg.split(":", 2)
            arg, withheld = f"{name}:{alg}:{WITHHELD}", True
        out.append(arg)
    return " ".join(out), withheld


def redact_table(table: Sequence[TargetLine]) -> tuple[list[TargetLine], bool]:
    """The table as it may be stored, and whether a key was taken out."""
    stored: list[TargetLine] = []
    withheld = False
    for line in table:
        params = line.params
        if line.target_type == "crypt":
            params, took = _redact_crypt(params)
        elif line.target_type == "integrity":
            params, took = _redact_integrity(params)
        else:
            took = False
        withheld |= took
        stored.append(TargetLine(line.start, line.length, line.target_type, params))
    return stored, withheld
