"""Where tables carry key material: the one place that knows.

A ``crypt`` table carries its key as its second parameter; an ``integrity``
table may carry keys in ``internal_hash:alg:KEY``, ``journal_crypt:alg:KEY``
and ``journal_mac:alg:KEY``. A key given as a kernel keyring reference
(``:<size>:<type>:<description>``) names a key rather than containing it.

The engine loads such tables with DM_SECURE_DATA (``carries_key``); what dmd
stores or shows has literal keys replaced by ``-`` (``redact_table``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dmd.engine.types import TargetLine

WITHHELD = "-"
KEYED_INTEGRITY_ARGS = ("internal_hash", "journal_crypt", "journal_mac")
_KEYED_INTEGRITY_PREFIXES = tuple(f"{arg}:" for arg in KEYED_INTEGRITY_ARGS)


def _integrity_key_arg(arg: str) -> bool:
    return arg.startswith(_KEYED_INTEGRITY_PREFIXES) and arg.count(":") >= 2


def carries_key(table: Iterable[TargetLine]) -> bool:
    """True when a table holds key material, or a reference to it (crypt,
    keyed integrity): the kernel should wipe its copies (DM_SECURE_DATA)."""
    for line in table:
        if line.target_type == "crypt":
            return True
        if line.target_type == "integrity" and any(
                _integrity_key_arg(arg) for arg in line.params.split()):
            return True
    return False


def _redact_crypt(params: str) -> tuple[str, bool]:
    args = params.split()
    if len(args) < 2 or args[1].startswith(":") or args[1] == WITHHELD:
        return params, False
    args[1] = WITHHELD
    return " ".join(args), True


def _redact_integrity(params: str) -> tuple[str, bool]:
    out, withheld = [], False
    for arg in params.split():
        if _integrity_key_arg(arg):
            name, alg, _key = arg.split(":", 2)
            arg, withheld = f"{name}:{alg}:{WITHHELD}", True
        out.append(arg)
    return " ".join(out), withheld


def redact_table(table: Sequence[TargetLine]) -> tuple[list[TargetLine], bool]:
    """The table with every literal key replaced by ``-``, and whether one was."""
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
