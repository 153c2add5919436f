"""D-Bus benchmark on the host: dmd --sim on a private dbus-daemon.

Not a test: it measures. Figures:
1. CreateDevice + Remove calls per second, one call at a time and with 16 in
   flight (SimDM in a file, SQLite journal: the whole daemon path).
2. dmd's start-up (until it owns its name) and GetManagedObjects with N
   devices already in the simulated kernel, per device, to show it grows
   linearly; against the peer measured in the same run: dbus-fast's own
   GetManagedObjects handler serving the same N objects with the same 17
   properties (it re-checks the whole result after every object).

    .venv/bin/python bench/dbus_bench.py [--ops 300] [--devices 1000 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from dmd.dbus.names import (
    BUS_NAME,
    DEVICE_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    ROOT_PATH,
)
from dmd.engine import TargetLine
from dmd.engine.sim import SimDM

ROOT = Path(__file__).resolve().parents[1]
ZERO = [TargetLine(0, 2048, "zero", "")]
PEER_NAME = "org.example.DeviceMapperPeer"
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <allow user="*"/>
  </policy>
</busconfig>
"""

PEER = """
import asyncio, sys
from dbus_fast.aio import MessageBus
from dbus_fast import BusType
from dmd.dbus.device import DeviceInterface, device_properties
from dmd.service.devices.inventory import DeviceView
from dmd.engine import TargetLine

async def main(n):
    bus = MessageBus(bus_type=BusType.SESSION)
    await bus.connect()
    for i in range(n):
        view = DeviceView(f"m{i:05d}", "", (253, i), False, False, 0, 0,
                          (TargetLine(0, 2048, "zero", ""),), (), ())
        bus.export(f"/org/example/DeviceMapper/devices/dm_{i}",
                   DeviceInterface(device_properties(view)))
        if i % 50 == 0:
            # Each export sends InterfacesAdded: 10,000 at once end in EAGAIN
            # and a dead connection in dbus-fast; let the socket drain.
            await asyncio.sleep(0.01)
    await bus.request_name(sys.argv[2])
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""


class Lab:
    """A private dbus-daemon; dmd and the peer as separate processes on it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dmd-dbus-bench-"))
        config = self.dir / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.dir / "bus.sock"))
        self.bus = subprocess.Popen(["dbus-daemon", "--nofork", "--nopidfile",
                                     f"--config-file={config}", "--print-address"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True)
        assert self.bus.stdout is not None
        self.address = self.bus.stdout.readline().strip()
        self.env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=self.address)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str], name: str) -> tuple[subprocess.Popen[bytes], float]:
        started = time.perf_counter()
        log = self.dir / f"{name}.log"
        with log.open("ab") as err:
            proc = subprocess.Popen(command, env=self.env, stderr=err)
        self.procs.append(proc)
        while subprocess.run(["busctl", f"--address={self.address}", "status", name],
                             capture_output=True).returncode != 0:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}: "
                                 f"{log.read_text()[-2000:]}")
            time.sleep(0.02)
        return proc, time.perf_counter() - started

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        proc.wait(timeout=120)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        self.bus.terminate()
        self.bus.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def dmd_command(sim: Path, state: Path) -> list[str]:
    return [sys.executable, "-m", "dmd", "--bus", "session", "--sim", str(sim),
            "--state-dir", str(state), "--log-level", "warning"]


async def call(bus: MessageBus, destination: str, path: str, interface: str, member: str,
               signature: str = "", body: list[Any] | None = None) -> Any:
    reply = await bus.call(Message(destination=destination, path=path, interface=interface,
                                   member=member, signature=signature, body=body or []))
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise RuntimeError(f"{reply.error_name}: {reply.body}")
    return reply.body[0] if reply.body else None


async def create_remove(lab: Lab, ops: int, in_flight: int) -> dict[str, float]:
    bus = MessageBus(bus_address=lab.address, bus_type=BusType.SESSION)
    await bus.connect()
    gate = asyncio.Semaphore(in_flight)
    table = [[0, 2048, "zero", ""]]

    async def create(i: int) -> str:
        async with gate:
            return str(await call(bus, BUS_NAME, ROOT_PATH, MANAGER_INTERFACE, "CreateDevice",
                                  "sa(ttss)a{sv}", [f"b{in_flight}-{i:05d}", table, {}]))

    async def remove(path: str) -> None:
        async with gate:
            await call(bus, BUS_NAME, path, DEVICE_INTERFACE, "Remove", "a{sv}", [{}])

    started = time.perf_counter()
    paths = await asyncio.gather(*(create(i) for i in range(ops)))
    created = time.perf_counter()
    await asyncio.gather(*(remove(p) for p in paths))
    removed = time.perf_counter()
    bus.disconnect()
    return {"create_per_s": ops / (created - started), "remove_per_s": ops / (removed - created)}


async def managed_objects(lab: Lab, destination: str, devices: int, repeat: int,
                          timeout: float) -> float | None:
    bus = MessageBus(bus_address=lab.address, bus_type=BusType.SESSION)
    await bus.connect()
    times = []
    try:
        for _ in range(repeat):
            started = time.perf_counter()
            objects = await asyncio.wait_for(
                call(bus, destination, ROOT_PATH, OBJECT_MANAGER_INTERFACE, "GetManagedObjects"),
                timeout)
            times.append(time.perf_counter() - started)
            assert len(objects) == devices, (destination, len(objects))
    except TimeoutError:
        return None
    finally:
        bus.disconnect()
    return statistics.median(times)


def filled_sim(path: Path, devices: int) -> None:
    sim = SimDM()  # filled in memory, written to its file once
    for i in range(devices):
        sim.device_create(f"m{i:05d}")
        sim.table_load(f"m{i:05d}", ZERO)
        sim.device_suspend(f"m{i:05d}")
    sim.save_as(path)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--peer-timeout", type=float, default=120.0)
    parser.add_argument("--json", type=Path, default=ROOT / ".lab-results" / "bench-dbus.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"ops": args.ops}
    lab = Lab()
    try:
        dmd, _ = lab.start(dmd_command(lab.dir / "k0.json", lab.dir / "s0"), BUS_NAME)
        print(f"1. CreateDevice then Remove, {args.ops} devices, over D-Bus (dmd --sim):")
        for in_flight in (1, 16) if args.ops else ():
            r = await create_remove(lab, args.ops, in_flight)
            results[f"calls_{in_flight}_in_flight"] = r
            print(f"   {in_flight:2d} in flight: {r['create_per_s']:7.1f} creates/s, "
                  f"{r['remove_per_s']:7.1f} removes/s")
        lab.stop(dmd)
        print("2. GetManagedObjects with N devices (median), against dbus-fast's own handler")
        per_device: dict[int, float] = {}
        for n in args.devices:
            sim = lab.dir / f"k{n}.json"
            filled_sim(sim, n)
            dmd, startup = lab.start(dmd_command(sim, lab.dir / f"s{n}"), BUS_NAME)
            ours = await managed_objects(lab, BUS_NAME, n, 5, 600)
            assert ours is not None
            lab.stop(dmd)
            peer, _ = lab.start([sys.executable, "-c", PEER, str(n), PEER_NAME], PEER_NAME)
            theirs = await managed_objects(lab, PEER_NAME, n, 1 if n > 2000 else 3,
                                           args.peer_timeout)
            lab.stop(peer)
            per_device[n] = ours / n
            shown = f"{theirs:8.3f} s" if theirs is not None else f"> {args.peer_timeout:.0f} s"
            ratio = (f"{theirs / ours:6.1f}x" if theirs is not None
                     else f"> {args.peer_timeout / ours:.0f}x")
            print(f"   N={n:6d}: dmd start-up {startup:6.2f} s; GetManagedObjects dmd "
                  f"{ours:8.3f} s ({ours / n * 1e6:6.1f} us/device), dbus-fast default "
                  f"{shown}: default/dmd = {ratio}")
            results[f"devices_{n}"] = {"startup_s": startup, "dmd_s": ours,
                                       "dbus_fast_default_s": theirs}
        if len(per_device) > 1:
            small, large = min(per_device), max(per_device)
            growth = per_device[large] / per_device[small]
            print(f"   per-device time at N={large} / at N={small}: {growth:.2f} "
                  "(1.0 = linear)")
            results["per_device_growth"] = growth
    finally:
        lab.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
