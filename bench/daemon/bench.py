"""Daemon benchmark in the kernel lab: dmd on the real system bus against dmsetup.

Not a test: it measures. Run it with ``bench/run-daemon`` (boots the lab once
and runs this inside, as root, with udevd and a system bus). Under emulation
only ratios between programs of the same boot mean anything.

Sections:
  (a) create: ``busctl call ... CreateDevice`` against ``dmsetup create``, the
      same zero table, each returning once udev is done, N devices one by
      one; then remove (``busctl ... Remove`` against ``dmsetup remove``);
      each tool's process floor (``busctl get-property``, ``dmsetup
      version``), and a connected client (one dbus-fast connection kept
      open, as a service or GUI has) doing the same creates and removes;
  (b) recovery: M persistent devices made through dmd; dmd stopped; every
      device removed (the "reboot"); then the time from starting dmd to dmd
      owning its name with all M devices back, against dmsetup creating the
      same M devices in one process (``dmsetup create --concise``), and the
      start-up time with the M devices already present (scan only);
  (c), (d), (e): following other tools, against udisks2 (see events.py).
Results are printed and written to .lab-results/bench-daemon.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from events import bench_events  # type: ignore[import-not-found]

from dmd.engine import DM, UdevSync

ROOT = Path(__file__).resolve().parents[2]
BUS_NAME = "org.example.DeviceMapper"
ROOT_PATH = "/org/example/DeviceMapper"
MANAGER = "org.example.DeviceMapper.Manager"
DEVICE = "org.example.DeviceMapper.Device"
PREFIX = "dmdbench-"
# Outside the guest's tmpfs: when a run goes wrong, dmd's side is kept.
DMD_LOG = ROOT / ".lab-results" / "bench-dmd.log"


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def busctl(*args: str) -> str:
    return run("busctl", "--system", *args)


def settle() -> None:
    subprocess.run(["udevadm", "settle", "--timeout=300"], check=False)


def remove_bench_devices() -> None:
    """Remove every bench device with raw ioctls (fast; not timed)."""
    settle()
    with DM(udev_sync=UdevSync.NONE) as dm:
        for device in dm.list_devices():
            if device.name.startswith(PREFIX):
                dm.device_remove(device.name)
    settle()


async def call_dmd(bus: MessageBus, path: str, interface: str, member: str,
                   signature: str, body: list[Any]) -> list[Any]:
    """One method call to dmd; anything but a reply stops the bench."""
    reply = await bus.call(Message(destination=BUS_NAME, path=path, interface=interface,
                                   member=member, signature=signature, body=body))
    assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, (
        member, body[:1], reply and reply.body)
    return list(reply.body)


async def create_through_dmd(names: list[str], in_flight: int = 8) -> None:
    """CreateDevice (persistent) for every name, a few calls at once (not timed)."""
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        queue = list(names)

        async def worker() -> None:
            while queue:
                await call_dmd(bus, ROOT_PATH, MANAGER, "CreateDevice", "sa(ttss)a{sv}",
                               [queue.pop(), [[0, 2048, "zero", ""]],
                                {"persistent": Variant("b", True)}])

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    finally:
        bus.disconnect()


class Dmd:
    def __init__(self, state_dir: Path, profile: Path | None = None) -> None:
        self.state_dir = state_dir
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start dmd; return the seconds until it owns its name."""
        started = time.perf_counter()
        with open(DMD_LOG, "ab") as log:
            profiler = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
            self.proc = subprocess.Popen(
                [sys.executable, *profiler, "-m", "dmd", "--state-dir", str(self.state_dir),
                 "--log-level", "info"], stderr=log)
        while subprocess.run(["busctl", "--system", "status", BUS_NAME],
                             capture_output=True).returncode != 0:
            if self.proc.poll() is not None:
                raise SystemExit(f"dmd exited with {self.proc.returncode}")
            time.sleep(0.02)
        return time.perf_counter() - started

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        while subprocess.run(["busctl", "--system", "status", BUS_NAME],
                             capture_output=True).returncode == 0:
            time.sleep(0.02)


def timed(label: str, names: list[str], step: Any) -> float:
    started = time.perf_counter()
    for name in names:
        step(name)
    elapsed = time.perf_counter() - started
    print(f"  {label:<34} {elapsed:8.2f} s  {elapsed / len(names) * 1000:8.1f} ms/device")
    return elapsed


def bench_create(n: int) -> dict[str, float]:
    print(f"(a) create and remove {n} devices, each returning once udev is done")
    dm_names = [f"{PREFIX}s{i:04d}" for i in range(n)]
    bus_names = [f"{PREFIX}b{i:04d}" for i in range(n)]
    out: dict[str, float] = {}
    out["dmsetup_create"] = timed("dmsetup create", dm_names, lambda name: run(
        "dmsetup", "create", name, "--table", "0 2048 zero"))
    out["busctl_create"] = timed("busctl call CreateDevice", bus_names, lambda name: busctl(
        "call", BUS_NAME, ROOT_PATH, MANAGER, "CreateDevice", "sa(ttss)a{sv}", name, "1",
        "0", "2048", "zero", "", "0"))
    settle()
    out["dmsetup_remove"] = timed("dmsetup remove", dm_names, lambda name: run(
        "dmsetup", "remove", name))

    def bus_remove(name: str) -> None:
        path = busctl("call", BUS_NAME, ROOT_PATH, MANAGER, "GetDevice", "s", name).split('"')[1]
        busctl("call", BUS_NAME, path, DEVICE, "Remove", "a{sv}", "0")

    out["busctl_remove"] = timed("busctl call GetDevice + Remove", bus_names, bus_remove)
    # busctl's own share: a process, a connection to the bus, one round trip.
    out["busctl_floor"] = timed("busctl get-property Version", bus_names, lambda name: busctl(
        "get-property", BUS_NAME, ROOT_PATH, MANAGER, "Version"))
    # dmsetup's own: a process, libdevmapper, one ioctl.
    out["dmsetup_floor"] = timed("dmsetup version", bus_names, lambda name: run(
        "dmsetup", "version"))
    client = asyncio.run(create_remove_in_process([f"{PREFIX}c{i:04d}" for i in range(n)]))
    out["client_create"], out["client_remove"] = client
    create = out["busctl_create"] / out["dmsetup_create"]
    remove = out["busctl_remove"] / out["dmsetup_remove"]
    create_net = ((out["busctl_create"] - out["busctl_floor"])
                  / (out["dmsetup_create"] - out["dmsetup_floor"]))
    remove_net = ((out["busctl_remove"] - 2 * out["busctl_floor"])
                  / (out["dmsetup_remove"] - out["dmsetup_floor"]))
    print(f"  ratio busctl/dmsetup: create {create:.2f}, remove {remove:.2f}; "
          f"each less its process floor: create {create_net:.2f}, remove {remove_net:.2f}")
    print(f"  ratio connected client/dmsetup: "
          f"create {out['client_create'] / out['dmsetup_create']:.2f}, "
          f"remove {out['client_remove'] / out['dmsetup_remove']:.2f}")
    return out


async def create_remove_in_process(names: list[str]) -> tuple[float, float]:
    """What a service or GUI sees: one connection kept open, CreateDevice then
    (after all are made) Remove, one call at a time."""
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        started = time.perf_counter()
        paths = [(await call_dmd(bus, ROOT_PATH, MANAGER, "CreateDevice", "sa(ttss)a{sv}",
                                 [name, [[0, 2048, "zero", ""]], {}]))[0] for name in names]
        create = time.perf_counter() - started
        print(f"  {'connected client CreateDevice':<34} {create:8.2f} s  "
              f"{create / len(names) * 1000:8.1f} ms/device")
        settle()
        started = time.perf_counter()
        for path in paths:
            await call_dmd(bus, path, DEVICE, "Remove", "a{sv}", [{}])
        remove = time.perf_counter() - started
        print(f"  {'connected client Remove':<34} {remove:8.2f} s  "
              f"{remove / len(names) * 1000:8.1f} ms/device")
        return create, remove
    finally:
        bus.disconnect()


def bench_recovery(dmd: Dmd, m: int) -> dict[str, float]:
    print(f"(b) start-up with {m} managed persistent devices")
    names = [f"{PREFIX}p{i:05d}" for i in range(m)]
    asyncio.run(create_through_dmd(names))
    dmd.stop()
    out: dict[str, float] = {}
    out["start_with_devices_present"] = dmd.start()
    print(f"  dmd start, {m} devices present:     {out['start_with_devices_present']:8.2f} s")
    dmd.stop()
    remove_bench_devices()  # the reboot
    out["start_recreating"] = dmd.start()
    print(f"  dmd start, re-creating {m} devices: {out['start_recreating']:8.2f} s")
    listed = [line.split()[0] for line in run("dmsetup", "ls").splitlines() if line.strip()]
    back = sum(1 for name in listed if name.startswith(f"{PREFIX}p"))
    assert back == m, f"only {back} of {m} devices came back"
    dmd.stop()
    remove_bench_devices()
    concise = ";".join(f"{name},,,,0 2048 zero" for name in names)
    started = time.perf_counter()
    run("dmsetup", "create", "--concise", concise)
    settle()
    out["dmsetup_concise_create"] = time.perf_counter() - started
    print(f"  dmsetup create --concise ({m}):      {out['dmsetup_concise_create']:8.2f} s")
    print(f"  ratio dmd recovery / dmsetup: "
          f"{out['start_recreating'] / out['dmsetup_concise_create']:.2f}")
    remove_bench_devices()
    return out


def install_policy() -> None:
    for conf in (ROOT / "data" / "dbus-policy").glob("*.conf"):
        shutil.copy(conf, "/etc/dbus-1/system.d/")
    busctl("call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
           "ReloadConfig")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100, help="devices for (a)")
    parser.add_argument("--m", type=int, default=1000, help="devices for (b)")
    parser.add_argument("--latency-n", type=int, default=20, help="devices for (c)")
    parser.add_argument("--storm", type=int, default=500, help="devices for (d)")
    parser.add_argument("--sections", default="abc",
                        help="which sections to run: a, b, c (c includes d and e)")
    parser.add_argument("--json", type=Path, default=ROOT / ".lab-results" / "bench-daemon.json")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="run dmd under cProfile, writing FILE (figures are then off)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run inside the lab: bench/run-daemon")
    install_policy()
    remove_bench_devices()
    state = Path(tempfile.mkdtemp(prefix="dmd-bench-")) / "state"
    dmd = Dmd(state, args.profile)
    results: dict[str, Any] = {"kernel": os.uname().release, "n": args.n, "m": args.m}
    print(f"dmd start-up (empty): {dmd.start():.2f} s")
    try:
        if "a" in args.sections:
            results["create"] = bench_create(args.n)
            save(args.json, results)
        if "b" in args.sections:
            results["recovery"] = bench_recovery(dmd, args.m)
            save(args.json, results)
        if "c" in args.sections:
            if dmd.proc is None or dmd.proc.poll() is not None:
                dmd.start()
            assert dmd.proc is not None
            try:
                results["events"] = asyncio.run(
                    bench_events(dmd.proc.pid, PREFIX, args.latency_n, args.storm))
            except AssertionError:
                # Something was never announced: have dmd log where it waits.
                dmd.proc.send_signal(signal.SIGUSR1)
                time.sleep(2)
                print(f"dmd's log, with its tasks: {DMD_LOG}")
                raise
    finally:
        dmd.stop()
        remove_bench_devices()
    save(args.json, results)
    print(f"written {args.json}")


def save(path: Path, results: dict[str, Any]) -> None:
    """After every section: a run cut short still leaves what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
