"""Cache benchmark in the kernel lab: dmd's AttachCache/DetachCache against
LVM's ``lvconvert --type cache`` / ``lvconvert --splitcache``.

Not a test: it measures. Run it with ``bench/run-cache`` (boots the lab once).
Under emulation only ratios between programs of the same boot mean anything.

Each side has its own two loop devices, one slow, one fast. LVM: a linear LV
on the slow one and a cache pool on the fast one; dmd: a thick (linear)
volume in a pool on the slow one, the fast one as its cache device. Both in
writeback mode with 64 KiB blocks. N rounds, alternating sides: attach
(until the command or the job ends), write the same 16 MiB to the cached
volume, detach (both write the dirty blocks back first). Written to
.lab-results/bench-cache.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Variant
from dbus_fast.aio import MessageBus

from bench import DMD_LOG, MANAGER, POOL, ROOT, ROOT_PATH, Dmd, call, loop, run, settle, wait

VOLUME = "org.example.DeviceMapper.Volume"
VG = "dmdbenchcache"
MIB = 1 << 20
SIZE_MIB = 128
WRITE = 16 * MIB


def write(device: str) -> None:
    subprocess.run(["dd", "if=/dev/urandom", f"of={device}", "bs=1M",
                    f"count={WRITE // MIB}", "conv=fsync", "status=none"], check=True)


def lvm(*args: str) -> None:
    run("lvm", *args)


def dirty(device: str) -> int:
    """The cache's dirty blocks (dmsetup status: the 11th field after the type)."""
    words = run("dmsetup", "status", device).split()
    return int(words[3 + 10])


DIRTY: dict[str, list[int]] = {"lvm": [], "dmd": []}


def lvm_round(slow: str, fast: str) -> tuple[float, float]:
    lvm("lvcreate", "-q", "-y", "-L", "64M", "--type", "cache-pool", "--cachemode",
        "writeback", "--chunksize", "64k", "-n", "cpool", VG, fast)
    start = time.perf_counter()
    lvm("lvconvert", "-q", "-y", "--type", "cache", "--cachepool", f"{VG}/cpool",
        f"{VG}/origin")
    attach = time.perf_counter() - start
    write(f"/dev/{VG}/origin")
    DIRTY["lvm"].append(dirty(f"{VG}-origin"))
    start = time.perf_counter()
    lvm("lvconvert", "-q", "-y", "--splitcache", f"{VG}/origin")
    detach = time.perf_counter() - start
    lvm("lvremove", "-q", "-y", f"{VG}/cpool")
    return attach, detach


async def dmd_round(bus: MessageBus, volume: str, fast: str) -> tuple[float, float]:
    start = time.perf_counter()
    (job,) = await call(bus, volume, VOLUME, "AttachCache", "sa{sv}", [
        fast, {"mode": Variant("s", "writeback"), "block-size": Variant("t", 64 * 1024)}])
    await wait(bus, job)
    attach = time.perf_counter() - start
    await asyncio.to_thread(write, "/dev/mapper/dmdcache-origin")
    DIRTY["dmd"].append(dirty("dmdcache-origin"))
    start = time.perf_counter()
    (job,) = await call(bus, volume, VOLUME, "DetachCache", "a{sv}", [{}])
    await wait(bus, job)
    return attach, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="rounds")
    args = parser.parse_args()
    DMD_LOG.parent.mkdir(exist_ok=True)
    DMD_LOG.write_text("")
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    disks = {name: loop(work, name, SIZE_MIB + 64) for name in
             ("lvm-slow", "lvm-fast", "dmd-slow", "dmd-fast")}
    lvm("vgcreate", "-q", VG, disks["lvm-slow"], disks["lvm-fast"])
    lvm("lvcreate", "-q", "-y", "-L", "64M", "-n", "origin", VG, disks["lvm-slow"])
    dmd = Dmd(work / "state")
    dmd.start()
    peer: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    try:
        async def rounds() -> None:
            bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
            try:
                pool, job = await call(bus, ROOT_PATH, MANAGER, "CreatePool", "sasa{sv}", [
                    "dmdcache", [disks["dmd-slow"]], {"data-size": Variant("t", 32 * MIB)}])
                await wait(bus, job)
                volume, job = await call(bus, pool, POOL, "CreateVolume", "sta{sv}", [
                    "origin", 64 * MIB, {"thin": Variant("b", False)}])
                await wait(bus, job)
                for i in range(args.n):
                    peer.append(await asyncio.to_thread(
                        lvm_round, disks["lvm-slow"], disks["lvm-fast"]))
                    ours.append(await dmd_round(bus, volume, disks["dmd-fast"]))
                    print(f"round {i + 1}: lvconvert {peer[-1][0]:.2f} s + {peer[-1][1]:.2f} s,"
                          f" dmd {ours[-1][0]:.2f} s + {ours[-1][1]:.2f} s", flush=True)
            finally:
                bus.disconnect()

        asyncio.run(rounds())
    finally:
        dmd.stop()
        subprocess.run(["lvm", "vgremove", "-q", "-y", "-f", VG], check=False)
        settle()
        for disk in disks.values():
            subprocess.run(["losetup", "-d", disk], check=False)
    figures: dict[str, Any] = {
        "n": args.n,
        "lvconvert_attach_s": statistics.median(p[0] for p in peer),
        "dmd_attach_s": statistics.median(o[0] for o in ours),
        "lvconvert_splitcache_s": statistics.median(p[1] for p in peer),
        "dmd_detach_s": statistics.median(o[1] for o in ours),
        "rounds": {"lvm": peer, "dmd": ours},
        "dirty_blocks_before_detach": DIRTY,
    }
    figures["attach_ratio"] = figures["dmd_attach_s"] / figures["lvconvert_attach_s"]
    figures["detach_ratio"] = figures["dmd_detach_s"] / figures["lvconvert_splitcache_s"]
    print(f"\nmedian of {args.n}           LVM        dmd")
    print(f"attach          {figures['lvconvert_attach_s']:8.2f} s {figures['dmd_attach_s']:8.2f} s"
          f"  ({figures['attach_ratio']:.2f}x)")
    print(f"detach          {figures['lvconvert_splitcache_s']:8.2f} s "
          f"{figures['dmd_detach_s']:8.2f} s  ({figures['detach_ratio']:.2f}x)")
    print(f"dirty blocks when each detach began: LVM {DIRTY['lvm']}, dmd {DIRTY['dmd']}")
    out = ROOT / ".lab-results" / "bench-cache.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
