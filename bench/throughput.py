"""Throughput of dmd --sim on the host: many calls in flight, many devices.

Not a test: it measures. dmd --sim (file-backed simulator, durable SQLite
journal: the whole daemon path) on a private dbus-daemon; a client keeps
--in-flight calls going:
1. the yardstick: no-op round trips (org.freedesktop.DBus.Peer.Ping, which
   dbus-fast answers in dmd's process without dmd's code), calls/s;
2. --devices CreateDevice calls, then Remove of all of them, calls/s over all
   and over the first and the last 1,000 (a cost that grows with the number
   of devices shows as a last-1,000 rate below the first's);
each printed as a share of the no-op rate.

    .venv/bin/python bench/throughput.py [--devices 10000] [--in-flight 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dbus_bench import Lab, dmd_command

from dmd.dbus.names import BUS_NAME, DEVICE_INTERFACE, MANAGER_INTERFACE, ROOT_PATH

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 1000


async def checked(bus: MessageBus, message: Message) -> Any:
    reply = await bus.call(message)
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise RuntimeError(f"{reply.error_name}: {reply.body}")
    return reply.body[0] if reply.body else None


async def run_calls(messages: list[Message], bus: MessageBus, in_flight: int
                    ) -> tuple[list[Any], list[float]]:
    """Send every message with at most *in_flight* outstanding; return the
    replies' first values and each call's completion time."""
    results: list[Any] = [None] * len(messages)
    done_at: list[float] = [0.0] * len(messages)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(messages):
            i = next_index
            next_index += 1
            results[i] = await checked(bus, messages[i])
            done_at[i] = time.perf_counter()

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return results, done_at


def rates(started: float, done_at: list[float]) -> dict[str, float]:
    ordered = sorted(done_at)
    n = len(ordered)
    window = min(WINDOW, n)
    out = {"per_s": n / (ordered[-1] - started),
           "first_per_s": window / (ordered[window - 1] - started)}
    if n > window:
        out["last_per_s"] = window / (ordered[-1] - ordered[n - window - 1])
    else:
        out["last_per_s"] = out["first_per_s"]
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--pings", type=int, default=20000)
    parser.add_argument("--json", type=Path,
                        default=ROOT / ".lab-results" / "bench-throughput.json")
    args = parser.parse_args()
    lab = Lab()
    results: dict[str, Any] = {"devices": args.devices, "in_flight": args.in_flight}
    try:
        dmd, _ = lab.start(dmd_command(lab.dir / "k.json", lab.dir / "state"), BUS_NAME)
        bus = await MessageBus(bus_address=lab.address, bus_type=BusType.SESSION).connect()
        pings = [Message(destination=BUS_NAME, path=ROOT_PATH,
                         interface="org.freedesktop.DBus.Peer", member="Ping")
                 for _ in range(args.pings)]
        started = time.perf_counter()
        _, done = await run_calls(pings, bus, args.in_flight)
        noop = rates(started, done)["per_s"]
        results["noop_per_s"] = noop
        print(f"no-op round trips (Peer.Ping), {args.in_flight} in flight: {noop:8.0f}/s")

        table = [[0, 2048, "zero", ""]]
        creates = [Message(destination=BUS_NAME, path=ROOT_PATH, interface=MANAGER_INTERFACE,
                           member="CreateDevice", signature="sa(ttss)a{sv}",
                           body=[f"t{i:06d}", table, {}]) for i in range(args.devices)]
        started = time.perf_counter()
        paths, done = await run_calls(creates, bus, args.in_flight)
        results["create"] = rates(started, done)
        removes = [Message(destination=BUS_NAME, path=str(p), interface=DEVICE_INTERFACE,
                           member="Remove", signature="a{sv}", body=[{}]) for p in paths]
        started = time.perf_counter()
        _, done = await run_calls(removes, bus, args.in_flight)
        results["remove"] = rates(started, done)
        for what in ("create", "remove"):
            r = results[what]
            print(f"{what:6s} {args.devices} devices, {args.in_flight} in flight: "
                  f"{r['per_s']:7.1f}/s ({r['per_s'] / noop:.1%} of no-op); first "
                  f"{WINDOW}: {r['first_per_s']:7.1f}/s, last {WINDOW}: "
                  f"{r['last_per_s']:7.1f}/s (last/first = "
                  f"{r['last_per_s'] / r['first_per_s']:.2f})")
        bus.disconnect()
        lab.stop(dmd)
    finally:
        lab.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
