"""Helpers shared by the test modules (fixtures live in the conftest files)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from dbus_fast import Variant


def plain(value: Any) -> Any:
    """D-Bus structs arrive as tuples, arrays as lists: compare as lists
    (dicts are walked too)."""
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def unvariant(value: Any) -> Any:
    """*value* with every Variant replaced by what it holds."""
    if isinstance(value, Variant):
        return unvariant(value.value)
    if isinstance(value, dict):
        return {k: unvariant(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [unvariant(v) for v in value]
    return value


def dmsetup(*args: str) -> str:
    """Run dmsetup (the independent witness); its stdout, or a failed test
    showing its stderr."""
    out = subprocess.run(["dmsetup", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"dmsetup {' '.join(args)}: {out.stderr}"
    return out.stdout


def wakeups(pid: int) -> int:
    """Context switches of every thread of *pid* so far: each is a wake-up."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total
