"""dmctl: dmsetup's verbs, spoken to dmd over D-Bus.

    dmctl [--session] [--json] [--timeout S] VERB ...

Errors are one line on stderr and exit status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from dmd.cli import devices, volumes
from dmd.cli.client import Client, Failure, Verb


def common_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every verb takes, before or after it (`dmctl ls --json`, as
    with dmsetup or systemctl). A verb's copy has no default, so that it never
    overwrites what was given before the verb."""
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--session", action="store_true", default=default(False),
                   help="talk to a dmd on the session bus (dmd --bus session), not the "
                        "system bus")
    p.add_argument("--json", action="store_true", default=default(False),
                   help="print JSON instead of text (one object per line for monitor)")
    p.add_argument("--timeout", type=float, default=default(120.0), metavar="SECONDS",
                   help="give up on a call after SECONDS (default: 120)")
    p.add_argument("--interactive", action="store_true", default=default(False),
                   help="let polkit ask for a password even when standard input is no "
                        "terminal (a program that shows polkit's dialog runs dmctl)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dmctl", description="dmsetup's verbs, spoken to dmd over D-Bus. Anyone may "
        "read; changes need root, or a user polkit allows.",
        epilog="Errors are one line on stderr; the exit status is 1 for a failed call "
        "and 2 for a usage error. `dmctl VERB --help` describes a verb.")
    common_options(p, defaults=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="VERB")

    def verb(name: str, fn: Verb, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        common_options(sp, defaults=False)
        sp.set_defaults(fn=fn)
        return sp

    devices.register(verb)
    volumes.register(verb)
    return p


async def run_verb(args: argparse.Namespace) -> None:
    bus_label = "session" if args.session else "system"
    try:
        bus = MessageBus(bus_type=BusType.SESSION if args.session else BusType.SYSTEM,
                         negotiate_unix_fd=True)
        await bus.connect()
    except Exception as exc:
        raise Failure(f"cannot connect to the {bus_label} bus: {exc}") from None
    try:
        client = Client(bus, bus_label, args.timeout, args.interactive or sys.stdin.isatty())
        await args.fn(client, args)
    finally:
        bus.disconnect()


def main(argv: list[str] | None = None) -> int:
    command_line = parser()
    args = command_line.parse_args(volumes.split_volume_argument(
        sys.argv[1:] if argv is None else list(argv)))
    try:
        asyncio.run(run_verb(args))
    except Failure as exc:
        target = f" {args.name}" if getattr(args, "name", None) else ""
        print(f"dmctl: {args.command}{target}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
