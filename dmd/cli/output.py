"""dmctl's output and the arguments every verb family reads alike."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from dmd.cli.client import Failure


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    out: TextIO = sys.stdout
    if args.json:
        out.write(json.dumps(data, indent=None if args.command == "monitor" else 2) + "\n")
    elif text:
        out.write(text + "\n")


def labels_of(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise Failure(f"label {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out
