"""Pools benchmark in the kernel lab: dmd's thin volumes against LVM's.

Not a test: it measures. Run it with ``bench/run-pools`` (boots the lab once
and runs this inside, as root, with udevd and a system bus). Under emulation
only ratios between programs of the same boot mean anything.

On two loop devices of the same size, one for each: LVM (Debian's lvm2, a
volume group with a thin pool made by ``lvcreate -T``) and dmd (a pool made
by ``CreatePool``). Then, one at a time, N times each, timed per operation
until it is done (the device node there, or gone):

  create    ``lvcreate -T -V SIZE -n NAME VG/POOL``   vs  Pool.CreateVolume
  snapshot  ``lvcreate -s -kn -n NAME VG/LV``        vs  Volume.Snapshot
            (-kn: LVM skips activating thin snapshots by default; dmd
            activates them, so both sides make the device)
  delete    ``lvremove -y VG/LV`` (snapshots, then volumes)  vs  Volume.Delete

dmd is driven two ways: ``busctl`` (the call, then ``Job.Wait``: two
processes, as a shell script does it) and a connected client (one dbus-fast
connection kept open, as a service has). Printed as each one's time per
operation and its ratio to LVM's; written to .lab-results/bench-pools.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

ROOT = Path(__file__).resolve().parents[2]
BUS_NAME = "org.example.DeviceMapper"
ROOT_PATH = "/org/example/DeviceMapper"
MANAGER = "org.example.DeviceMapper.Manager"
POOL = "org.example.DeviceMapper.Pool"
VOLUME = "org.example.DeviceMapper.Volume"
JOB = "org.example.DeviceMapper.Job"
VG = "dmdbenchvg"
DMD_LOG = ROOT / ".lab-results" / "bench-pools-dmd.log"
MIB = 1 << 20


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def lvm(*args: str) -> None:
    run("lvm", *args, "--quiet")


def busctl(*args: str) -> list[Any]:
    out = run("busctl", "--system", "--json=short", *args)
    return list(json.loads(out)["data"]) if out.strip() else []


def settle() -> None:
    subprocess.run(["udevadm", "settle", "--timeout=300"], check=False)


def loop(directory: Path, name: str, size_mib: int) -> str:
    image = directory / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(size_mib * MIB)
    return run("losetup", "-f", "--show", str(image)).strip()


def timed(fn: Any, count: int) -> float:
    """Seconds per call of fn(i), i in range(count)."""
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return (time.perf_counter() - start) / count


async def timed_async(fn: Any, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        await fn(i)
    return (time.perf_counter() - start) / count


def bench_lvm(device: str, n: int, size_mib: int, pool_mib: int) -> dict[str, float]:
    lvm("pvcreate", device)
    lvm("vgcreate", VG, device)
    lvm("lvcreate", "-T", "-L", f"{pool_mib}M", "-n", "pool", VG)
    settle()
    result = {
        "create": timed(lambda i: lvm("lvcreate", "-T", "-V", f"{size_mib}M", "-n", f"lv{i}",
                                      f"{VG}/pool"), n),
        "snapshot": timed(lambda i: lvm("lvcreate", "-s", "-kn", "-n", f"snap{i}",
                                        f"{VG}/lv{i}"), n),
    }
    for i in range(n):
        assert os.path.exists(f"/dev/{VG}/snap{i}"), f"LVM's snap{i} has no device"
    settle()
    half = timed(lambda i: lvm("lvremove", "-y", f"{VG}/snap{i}"), n)
    other = timed(lambda i: lvm("lvremove", "-y", f"{VG}/lv{i}"), n)
    result["delete"] = (half + other) / 2
    lvm("vgremove", "-y", VG)
    lvm("pvremove", "-y", device)
    return result


class Dmd:
    def __init__(self, state: Path, profile: Path | None = None) -> None:
        self.state, self.profile = state, profile
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "dmd", "--state-dir", str(self.state), "--log-level",
                   "warning"]
        if self.profile is not None:
            if not (Path(sys.executable).parent / "py-spy").exists():
                raise SystemExit("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
            # Wall-clock samples (--idle: waits on the kernel and udev count),
            # every thread, as collapsed stacks.
            command = [str(Path(sys.executable).parent / "py-spy"), "record", "--idle",
                       "--threads", "--rate", "50", "--format", "raw", "-o", str(self.profile),
                       "--", *command]
        with DMD_LOG.open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=log, cwd=ROOT)
        for _ in range(600):
            if subprocess.run(["busctl", "--system", "status", BUS_NAME],
                              capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("dmd did not take its name")

    def stop(self) -> None:
        if self.proc is not None:
            pid = self.proc.pid
            if self.profile is not None:  # dmd is py-spy's child: py-spy writes once it ends
                pid = int(run("pgrep", "-P", str(pid)).split()[0])
            os.kill(pid, signal.SIGTERM)
            self.proc.wait(timeout=300)


async def call(bus: MessageBus, path: str, interface: str, member: str, signature: str,
               body: list[Any], fds: list[int] | None = None) -> list[Any]:
    reply = await bus.call(Message(destination=BUS_NAME, path=path, interface=interface,
                                   member=member, signature=signature, body=body,
                                   unix_fds=fds or []))
    for fd in fds or []:
        os.close(fd)
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise RuntimeError(f"{member}: {reply.error_name}: {reply.body}")
    return list(reply.body)


async def wait(bus: MessageBus, job: str) -> None:
    assert await call(bus, job, JOB, "Wait", "d", [600.0]) == [True]
    state = await call(bus, job, "org.freedesktop.DBus.Properties", "Get", "ss",
                       [JOB, "State"])
    assert state[0].value == "completed", state


def wait_busctl(job: str) -> None:
    assert busctl("call", BUS_NAME, job, JOB, "Wait", "d", "300") == [True]


def bench_busctl(pool: str, n: int, size: int, tag: str) -> dict[str, float]:
    volumes: list[str] = []
    snaps: list[str] = []

    def create(i: int) -> None:
        volume, job = busctl("call", BUS_NAME, pool, POOL, "CreateVolume", "sta{sv}",
                             f"{tag}{i}", str(size), "0")
        wait_busctl(job)
        volumes.append(volume)

    def snapshot(i: int) -> None:
        snap, job = busctl("call", BUS_NAME, volumes[i], VOLUME, "Snapshot", "sa{sv}",
                           f"{tag}{i}.s", "0")
        wait_busctl(job)
        snaps.append(snap)

    result = {"create": timed(create, n), "snapshot": timed(snapshot, n)}
    doomed = [*snaps, *volumes]
    result["delete"] = timed(lambda i: wait_busctl(
        busctl("call", BUS_NAME, doomed[i], VOLUME, "Delete", "a{sv}", "0")[0]), 2 * n) * 1.0
    return result


async def bench_connected(pool: str, n: int, size: int, tag: str) -> dict[str, float]:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()

    async def call(path: str, interface: str, member: str, signature: str,
                   body: list[Any]) -> list[Any]:
        reply = await bus.call(Message(destination=BUS_NAME, path=path, interface=interface,
                                       member=member, signature=signature, body=body))
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            raise RuntimeError(f"{member}: {reply.error_name}: {reply.body}")
        return list(reply.body)

    async def done(job: str) -> None:
        assert await call(job, JOB, "Wait", "d", [300.0]) == [True]

    volumes: list[str] = []
    snaps: list[str] = []

    async def create(i: int) -> None:
        volume, job = await call(pool, POOL, "CreateVolume", "sta{sv}", [f"{tag}{i}", size, {}])
        await done(job)
        volumes.append(volume)

    async def snapshot(i: int) -> None:
        snap, job = await call(volumes[i], VOLUME, "Snapshot", "sa{sv}", [f"{tag}{i}.s", {}])
        await done(job)
        snaps.append(snap)

    doomed: list[str] = []

    async def delete(i: int) -> None:
        (job,) = await call(doomed[i], VOLUME, "Delete", "a{sv}", [{}])
        await done(job)

    result = {"create": await timed_async(create, n),
              "snapshot": await timed_async(snapshot, n)}
    doomed += [*snaps, *volumes]
    result["delete"] = await timed_async(delete, 2 * n)
    bus.disconnect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="operations of each kind")
    parser.add_argument("--size-mib", type=int, default=64, help="each volume's size")
    parser.add_argument("--profile", type=Path, default=None,
                        help="run dmd under py-spy, collapsed stacks written here")
    parser.add_argument("--skip-lvm", action="store_true",
                        help="dmd only (with --profile: no ratio is printed)")
    args = parser.parse_args()
    DMD_LOG.parent.mkdir(exist_ok=True)
    DMD_LOG.write_text("")
    work = Path(tempfile.mkdtemp(prefix="bench-pools-"))
    pool_mib = 1024
    lvm_disk, dmd_disk = loop(work, "lvm", pool_mib + 64), loop(work, "dmd", pool_mib + 64)
    figures: dict[str, Any] = {"n": args.n, "size_mib": args.size_mib}
    try:
        if not args.skip_lvm:
            print(f"LVM: {args.n} x lvcreate -T, lvcreate -s -kn, lvremove ...", flush=True)
            figures["lvm"] = bench_lvm(lvm_disk, args.n, args.size_mib, pool_mib)
        dmd = Dmd(work / "state", args.profile)
        dmd.start()
        try:
            pool, job = busctl("call", BUS_NAME, ROOT_PATH, MANAGER, "CreatePool", "sasa{sv}",
                               "dmdbench", "1", dmd_disk, "0")
            wait_busctl(job)
            size = args.size_mib * MIB
            print(f"dmd through busctl: {args.n} x CreateVolume, Snapshot, Delete ...",
                  flush=True)
            figures["dmd_busctl"] = bench_busctl(pool, args.n, size, "b")
            print("dmd through a connected client ...", flush=True)
            figures["dmd_connected"] = asyncio.run(bench_connected(pool, args.n, size, "c"))
            (job,) = busctl("call", BUS_NAME, pool, POOL, "Destroy", "a{sv}", "1", "force",
                            "b", "true")
            wait_busctl(job)
        finally:
            dmd.stop()
    finally:
        settle()
        for disk in (lvm_disk, dmd_disk):
            subprocess.run(["losetup", "-d", disk], check=False)
    lvm_ = figures.get("lvm")
    print(f"\n{'per operation':<10} {'LVM':>9} {'dmd busctl':>18} {'dmd connected':>18}")
    for op in ("create", "snapshot", "delete"):
        b, c = figures["dmd_busctl"][op], figures["dmd_connected"][op]
        if lvm_ is None:
            print(f"{op:<10} {'-':>9} {b * 1000:8.0f}ms {c * 1000:17.0f}ms")
            continue
        print(f"{op:<10} {lvm_[op] * 1000:7.0f}ms {b * 1000:8.0f}ms ({b / lvm_[op]:4.2f}x) "
              f"{c * 1000:8.0f}ms ({c / lvm_[op]:4.2f}x)")
    out = ROOT / ".lab-results" / "bench-pools.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
