"""Encrypted volumes benchmark in the kernel lab: dmd against cryptsetup.

Not a test: it measures. Run it with ``bench/run-crypt`` (boots the lab once).
Under emulation only ratios between programs of the same boot mean anything.

Both sides use cryptsetup's default PBKDF (argon2id benchmarked to 2 s, its
memory capped by the machine's): the key derivation dominates by design, and
neither side may weaken it to win. N times each, alternating:

  cryptsetup  ``luksFormat --type luks2`` + ``open`` on a plain volume
              dmd made (the same kind of device), key on a file
  dmd         Pool.CreateVolume with encryption luks2 and the key on a pipe,
              until its job ends (the thin volume made, luksFormat, open,
              the cleartext device managed), through a connected client
  dmd unlock  Volume.Lock, then Volume.Unlock (cryptsetup open inside),
              timed alone against ``cryptsetup close`` + ``open``

Written to .lab-results/bench-crypt.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
KEY = b"benchmark key: correct horse battery staple"
MIB = 1 << 20
SIZE = 64 * MIB


def key_pipe() -> int:
    read_end, write_end = os.pipe()
    os.write(write_end, KEY)
    os.close(write_end)
    return read_end


def cryptsetup_round(device: str, key_file: Path, name: str) -> tuple[float, float]:
    """(luksFormat + open, close + open) in seconds."""
    start = time.perf_counter()
    run("cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file",
        str(key_file), device)
    run("cryptsetup", "open", "--type", "luks2", "--key-file", str(key_file), device, name)
    made = time.perf_counter() - start
    start = time.perf_counter()
    run("cryptsetup", "close", name)
    run("cryptsetup", "open", "--type", "luks2", "--key-file", str(key_file), device, name)
    reopened = time.perf_counter() - start
    run("cryptsetup", "close", name)
    return made, reopened


async def dmd_round(bus: MessageBus, pool: str, name: str) -> tuple[float, float]:
    start = time.perf_counter()
    volume, job = await call(bus, pool, POOL, "CreateVolume", "sta{sv}", [
        name, SIZE, {"encryption": Variant("s", "luks2"), "key": Variant("h", 0)}],
        [key_pipe()])
    await wait(bus, job)
    made = time.perf_counter() - start
    start = time.perf_counter()
    await call(bus, volume, VOLUME, "Lock", "a{sv}", [{}])
    await call(bus, volume, VOLUME, "Unlock", "a{sv}", [{"key": Variant("h", 0)}],
               [key_pipe()])
    reopened = time.perf_counter() - start
    return made, reopened


async def bench(n: int, pool: str, plain: list[str], key_file: Path) -> dict[str, Any]:
    bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    peer: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    try:
        for i in range(n):  # alternating, so that a drift of the machine hits both
            peer.append(cryptsetup_round(plain[i], key_file, f"benchpeer{i}"))
            ours.append(await dmd_round(bus, pool, f"enc{i}"))
            print(f"round {i + 1}: cryptsetup {peer[-1][0]:.2f} s + {peer[-1][1]:.2f} s, "
                  f"dmd {ours[-1][0]:.2f} s + {ours[-1][1]:.2f} s", flush=True)
    finally:
        bus.disconnect()
    return {
        "cryptsetup_create_open_s": statistics.median(p[0] for p in peer),
        "dmd_create_s": statistics.median(o[0] for o in ours),
        "cryptsetup_reopen_s": statistics.median(p[1] for p in peer),
        "dmd_lock_unlock_s": statistics.median(o[1] for o in ours),
        "rounds": {"cryptsetup": peer, "dmd": ours},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5, help="rounds")
    args = parser.parse_args()
    DMD_LOG.parent.mkdir(exist_ok=True)
    DMD_LOG.write_text("")
    work = Path(tempfile.mkdtemp(prefix="bench-crypt-"))
    key_file = work / "key"
    key_file.write_bytes(KEY)
    disk = loop(work, "dmd", (2 * args.n + 2) * SIZE // MIB + 256)
    dmd = Dmd(work / "state")
    dmd.start()
    try:
        async def prepare() -> tuple[str, list[str]]:
            bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
            try:
                pool, job = await call(bus, ROOT_PATH, MANAGER, "CreatePool", "sasa{sv}",
                                       ["dmdcrypt", [disk], {}])
                await wait(bus, job)
                plain = []
                for i in range(args.n):
                    _, job = await call(bus, pool, POOL, "CreateVolume", "sta{sv}",
                                        [f"plain{i}", SIZE, {}])
                    await wait(bus, job)
                    plain.append(f"/dev/mapper/dmdcrypt-plain{i}")
                return pool, plain
            finally:
                bus.disconnect()

        pool, plain = asyncio.run(prepare())
        settle()
        figures = asyncio.run(bench(args.n, pool, plain, key_file))
    finally:
        dmd.stop()
        settle()
        subprocess.run(["losetup", "-d", disk], check=False)
    create = figures["dmd_create_s"] / figures["cryptsetup_create_open_s"]
    reopen = figures["dmd_lock_unlock_s"] / figures["cryptsetup_reopen_s"]
    print(f"\nmedian of {args.n}     cryptsetup        dmd")
    for what, peer, ours, ratio in (
            ("create + open", figures["cryptsetup_create_open_s"], figures["dmd_create_s"],
             create),
            ("lock + unlock", figures["cryptsetup_reopen_s"], figures["dmd_lock_unlock_s"],
             reopen)):
        print(f"{what:<15} {peer:8.2f} s {ours:8.2f} s  ({ratio:.2f}x)")
    figures.update(create_ratio=create, reopen_ratio=reopen, n=args.n)
    out = ROOT / ".lab-results" / "bench-crypt.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
