"""Following other tools: dmd against udisks2 (udisksd) in the same lab boot.

  (c) latency: an external ``dmsetup create`` (udev sync: it returns once udev
      is done), then the time until each daemon announces the device with
      InterfacesAdded: dmd's /org/example/DeviceMapper/devices/dm_<minor>,
      udisks2's /org/freedesktop/UDisks2/block_devices/dm_2d<minor>. Measured
      from dmsetup's return (negative: announced before dmsetup returned);
  (d) storm: another process makes S devices with raw ioctls as fast as the
      kernel takes them; CPU time (user + system, from /proc) each daemon
      spends until it has announced all S, and the wall time until then;
  (e) idle: with 1,000 devices present and nothing happening, wake-ups
      (context switches of every thread) and CPU time over 60 s: with dmd's
      default timers one sync (a listing, every 60 s) falls in the window,
      an audit (every 600 s) most likely not.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from dmd.engine import DM, DmFlags, TargetLine, UdevSync

DMD = "org.example.DeviceMapper"
UDISKS = "org.freedesktop.UDisks2"
UDISKSD = "/usr/libexec/udisks2/udisksd"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def wakeups(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def minor_of(path: str) -> int | None:
    """The dm minor an object path of either daemon names."""
    tail = path.rsplit("/", 1)[-1]
    for prefix in ("dm_2d", "dm_"):
        if tail.startswith(prefix) and tail[len(prefix):].isdigit():
            return int(tail[len(prefix):])
    return None


class Announcements:
    """When each daemon first said InterfacesAdded / InterfacesRemoved for a minor."""

    def __init__(self) -> None:
        self.owners: dict[str, str] = {}  # unique name -> "dmd" / "udisks"
        self.added: dict[tuple[str, int], float] = {}
        self.removed: dict[tuple[str, int], float] = {}
        self.bus: MessageBus | None = None

    async def connect(self) -> None:
        self.bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        self.bus.add_message_handler(self._on_message)
        for name, who in ((DMD, "dmd"), (UDISKS, "udisks")):
            reply = await self.bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="GetNameOwner", signature="s",
                body=[name]))
            assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, name
            self.owners[reply.body[0]] = who
            for member in ("InterfacesAdded", "InterfacesRemoved"):
                await self.bus.call(Message(
                    destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                    body=[f"type='signal',sender='{name}',member='{member}'"]))

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL or msg.sender not in self.owners:
            return
        who = self.owners[msg.sender]
        minor = minor_of(str(msg.body[0]))
        if minor is None:
            return
        # body[1]: the interfaces (a dict when added, a list when removed)
        if who == "udisks" and "org.freedesktop.UDisks2.Block" not in msg.body[1]:
            return
        table = self.added if msg.member == "InterfacesAdded" else self.removed
        table.setdefault((who, minor), time.monotonic())

    async def wait(self, table: dict[tuple[str, int], float], keys: list[tuple[str, int]],
                   timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not all(k in table for k in keys):
            missing = [k for k in keys if k not in table]
            assert time.monotonic() < deadline, f"never announced: {missing[:5]}"
            await asyncio.sleep(0.01)

    def close(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()


def start_udisks() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([UDISKSD, "--no-debug"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while subprocess.run(["busctl", "--system", "status", UDISKS],
                         capture_output=True).returncode != 0:
        if proc.poll() is not None:
            raise SystemExit(f"udisksd exited with {proc.returncode}")
        time.sleep(0.05)
    return proc


async def latency(ann: Announcements, n: int, prefix: str) -> dict[str, Any]:
    print(f"(c) {n} external `dmsetup create`s, one at a time: announced after dmsetup returns")
    late: dict[str, list[float]] = {"dmd": [], "udisks": []}
    for i in range(n):
        name = f"{prefix}lat{i:03d}"
        proc = await asyncio.create_subprocess_exec(
            "dmsetup", "create", name, "--table", "0 2048 zero")
        await proc.wait()
        returned = time.monotonic()
        minor = os.minor(os.stat(f"/dev/mapper/{name}").st_rdev)
        keys = [("dmd", minor), ("udisks", minor)]
        await ann.wait(ann.added, keys)
        for who, m in keys:
            late[who].append(ann.added[(who, m)] - returned)
        proc = await asyncio.create_subprocess_exec("dmsetup", "remove", name)
        await proc.wait()
        await ann.wait(ann.removed, keys)
        for key in keys:
            ann.added.pop(key)
            ann.removed.pop(key)
    out = {who: {"median_ms": statistics.median(v) * 1000, "max_ms": max(v) * 1000}
           for who, v in late.items()}
    for who, figures in out.items():
        print(f"  {who:<7} median {figures['median_ms']:8.1f} ms   max {figures['max_ms']:8.1f} ms")
    gap = out["udisks"]["median_ms"] - out["dmd"]["median_ms"]
    print(f"  dmd announces {gap:.0f} ms sooner than udisks2 (median)")
    return out


def make_devices(names: list[str]) -> list[int]:
    minors = []
    with DM(udev_sync=UdevSync.NONE) as dm:
        for name in names:
            info = dm.device_create(name)
            dm.table_load(name, [TargetLine(0, 8, "zero", "")])
            dm.device_suspend(name, DmFlags(0))
            minors.append(info.device[1])
    return minors


def remove_devices(names: list[str]) -> None:
    with DM(udev_sync=UdevSync.NONE) as dm:
        for name in names:
            dm.device_remove(name)


async def storm(ann: Announcements, pids: dict[str, int], names: list[str],
                action: Callable[[list[str]], Any], table: dict[tuple[str, int], float],
                minors: list[int], label: str) -> dict[str, Any]:
    cpu = {who: cpu_seconds(pid) for who, pid in pids.items()}
    started = time.monotonic()
    result = await asyncio.get_running_loop().run_in_executor(None, action, names)
    minors = minors or result
    out: dict[str, Any] = {"devices": len(names)}
    for who, pid in pids.items():
        await ann.wait(table, [(who, m) for m in minors])
        out[who] = {"cpu_s": cpu_seconds(pid) - cpu[who],
                    "wall_s": max(table[(who, m)] for m in minors) - started}
    print(f"  {label} {len(names)}: " + "   ".join(
        f"{who} {f['cpu_s']:.2f} s CPU, all announced after {f['wall_s']:.1f} s"
        for who, f in out.items() if who != "devices"))
    out["minors"] = minors
    return out


async def idle(pids: dict[str, int], seconds: float) -> dict[str, Any]:
    before = {who: (wakeups(pid), cpu_seconds(pid)) for who, pid in pids.items()}
    await asyncio.sleep(seconds)
    out = {}
    for who, pid in pids.items():
        out[who] = {"wakeups": wakeups(pid) - before[who][0],
                    "cpu_s": cpu_seconds(pid) - before[who][1]}
    print(f"  idle {seconds:.0f} s: " + "   ".join(
        f"{who} {f['wakeups']} wake-ups, {f['cpu_s']:.2f} s CPU" for who, f in out.items()))
    return out


async def bench_events(dmd_pid: int, prefix: str, n: int, storm_size: int,
                       idle_seconds: float = 60.0) -> dict[str, Any]:
    udisks = start_udisks()
    ann = Announcements()
    try:
        subprocess.run(["udevadm", "settle"], check=False)
        await ann.connect()
        pids = {"dmd": dmd_pid, "udisks": udisks.pid}
        results: dict[str, Any] = {"latency": await latency(ann, n, prefix)}
        print(f"(d) storm: another process makes {storm_size} devices with raw ioctls")
        names = [f"{prefix}st{i:04d}" for i in range(storm_size)]
        made = await storm(ann, pids, names, make_devices, ann.added, [], "create")
        extra = [f"{prefix}id{i:04d}" for i in range(1000 - storm_size)]
        extra_minors = make_devices(extra)
        await ann.wait(ann.added, [(w, m) for w in pids for m in extra_minors])
        subprocess.run(["udevadm", "settle", "--timeout=600"], check=False)
        await asyncio.sleep(2)
        print(f"(e) idle with {storm_size + len(extra)} devices")
        results["idle"] = await idle(pids, idle_seconds)
        everything = names + extra
        removed = await storm(ann, pids, everything, remove_devices, ann.removed,
                              made["minors"] + extra_minors, "remove")
        made.pop("minors")
        removed.pop("minors")
        results["storm_create"], results["storm_remove"] = made, removed
        for key in ("storm_create", "storm_remove"):
            f = results[key]
            ratio = f["dmd"]["cpu_s"] / max(f["udisks"]["cpu_s"], 1e-9)
            print(f"  {key}: dmd/udisks CPU {ratio:.2f}")
        return results
    finally:
        ann.close()
        udisks.terminate()
        udisks.wait(timeout=60)
