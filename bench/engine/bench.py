"""Engine benchmark: dmd's DM against raw C ioctls and dmsetup, in one lab boot.

Not a test: it measures. Run it with ``bench/run`` (boots the kernel lab and
runs this inside, as root, with udevd running). Timings under emulation mean
something only as ratios between programs measured in the same boot.

Sections:
  (a) C floor: bench/engine/dm_floor.c issuing the raw ioctls (create, load a
      zero table, resume; then remove), udev flags in event_nr, no udev wait;
  (b) dmd.engine.DM(udev_sync=UdevSync.NONE) doing the same ioctls;
  (c) dmsetup --noudevsync, one process per step (create --table, remove);
  (d) with udev sync: DM() (waits for udev's node and database record)
      against dmsetup create/remove (libdm's semaphore cookies);
  (e) list_devices() with many devices: ioctls per call on a cold and a warm
      handle, time against the C floor's DM_LIST_DEVICES and `dmsetup ls`;
  (f) (a) and (b) with udev's queue running, not paused.
Results are printed and written to .lab-results/bench-engine.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmd.engine import DM, DevId, DmError, DmFlags, TargetLine, UdevSync

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "dmdbench-"
ZERO = [TargetLine(0, 2048, "zero", "")]
RESUME = DmFlags(0)


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(n)]  # as dm_floor.c names them


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def settle() -> None:
    """Let udev finish the previous section's events (not timed)."""
    subprocess.run(["udevadm", "settle", "--timeout=300"], check=False)


def key_values(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in (item.split("=", 1) for item in line.split())}


def cleanup() -> None:
    with DM(udev_sync=UdevSync.NONE) as dm:
        for dev in dm.list_devices():
            if dev.name.startswith(PREFIX):
                with contextlib.suppress(DmError):
                    dm.device_remove(dev.name)
    settle()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- the contenders ---------------------------------------------------------
# Between creating and removing, every contender lets udev finish (untimed):
# udev's probes open the new devices, and a remove that races them fails with
# EBUSY, for C, the engine and dmsetup alike.
#
# Where nobody waits for udev, udev's queue is paused while a phase is timed
# and drained after it (untimed): otherwise udev's workers share the two
# emulated CPUs with whichever program runs longer, and a slower loop is
# charged for udev's work on the events it made. This measures the ioctl path.
@contextlib.contextmanager
def udev_paused() -> Any:
    subprocess.run(["udevadm", "control", "--stop-exec-queue"], check=True)
    try:
        yield
    finally:
        subprocess.run(["udevadm", "control", "--start-exec-queue"], check=True)


def c_cycle(floor: str, n: int, prefix: str, *, pause: bool = True) -> dict[str, float]:
    paused = udev_paused if pause else contextlib.nullcontext
    with paused():
        made = key_values(run(floor, "create", str(n), prefix))
    settle()
    with paused():
        gone = key_values(run(floor, "remove", str(n), prefix))
    settle()
    assert made["ioctls"] + gone["ioctls"] == 4 * n, (made, gone)
    return {"create": made["create_s"], "remove": gone["remove_s"]}


def engine_cycle(dm: DM, n: int, prefix: str, *, pause: bool = True) -> dict[str, float]:
    devices = names(prefix, n)
    before = dm.ioctl_count
    paused = udev_paused if pause else contextlib.nullcontext
    with paused():
        start = time.perf_counter()
        for name in devices:
            dev = DevId.name(name)
            dm.device_create(name)
            dm.table_load(dev, ZERO)
            dm.device_suspend(dev, RESUME)
        created = time.perf_counter()
    settle()
    with paused():
        removing = time.perf_counter()
        for name in devices:
            dm.device_remove(name)
        removed = time.perf_counter()
    settle()
    return {"create": created - start, "remove": removed - removing,
            "ioctls_per_device": (dm.ioctl_count - before) / n}


def dmsetup_cycle(n: int, prefix: str, *, udev_sync: bool) -> dict[str, float]:
    sync = [] if udev_sync else ["--noudevsync"]
    paused = contextlib.nullcontext if udev_sync else udev_paused
    devices = names(prefix, n)
    with paused():
        start = time.perf_counter()
        for name in devices:
            run("dmsetup", *sync, "create", name, "--table", "0 2048 zero")
        created = time.perf_counter()
    settle()
    with paused():
        removing = time.perf_counter()
        for name in devices:
            run("dmsetup", *sync, "remove", name)
        removed = time.perf_counter()
    settle()
    return {"create": created - start, "remove": removed - removing}


def total(r: dict[str, float]) -> float:
    return r["create"] + r["remove"]


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The fastest of repeated runs (least disturbed by the emulator)."""
    return min(runs, key=total)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "n/a"


def row(label: str, r: dict[str, float], n: int) -> str:
    return (f"  {label:<44} {r['create']:8.3f} {r['remove']:8.3f} {total(r):8.3f}"
            f" {1000 * total(r) / n:9.2f}")


HEADER = f"  {'':<44} {'create s':>8} {'remove s':>8} {'total s':>8} {'ms/device':>9}"


# -- sections ---------------------------------------------------------------
def no_udev_wait(floor: str, n: int, repeat: int) -> dict[str, Any]:
    print(f"\n(a)-(c) {n} devices: create + load zero + resume, then remove; "
          f"nobody waits for udev; its queue paused while timing (best of {repeat} for a and b)")
    c_runs: list[dict[str, float]] = []
    e_runs: list[dict[str, float]] = []
    with DM(udev_sync=UdevSync.NONE) as dm:
        for _ in range(repeat):  # interleaved, so drift hits both alike
            c_runs.append(c_cycle(floor, n, PREFIX + "c-"))
            settle()
            e_runs.append(engine_cycle(dm, n, PREFIX + "e-"))
            settle()
    d = dmsetup_cycle(n, PREFIX + "d-", udev_sync=False)
    settle()
    c, e = best(c_runs), best(e_runs)
    print(HEADER)
    print(row("(a) C floor, raw ioctls", c, n))
    print(row("(b) dmd engine DM(udev_sync=NONE)", e, n))
    print(row("(c) dmsetup --noudevsync, 1 process/step", d, n))
    print(f"  engine ioctls per device: {e['ioctls_per_device']:g} (C: 4)")
    print(f"  engine/C = {ratio(total(e), total(c))}"
          f" (create {ratio(e['create'], c['create'])}, remove {ratio(e['remove'], c['remove'])})")
    print(f"  dmsetup/C = {ratio(total(d), total(c))}")
    print(f"  dmsetup/engine = {ratio(total(d), total(e))}")
    return {"n": n, "repeat": repeat, "c_floor": c, "engine": e, "dmsetup_noudevsync": d,
            "c_runs": c_runs, "engine_runs": e_runs}


def with_udev(n: int) -> dict[str, Any]:
    print(f"\n(d) {n} devices with udev sync: each call returns when udev is done")
    with DM() as dm:
        mode = dm.nodes.mode
        e = engine_cycle(dm, n, PREFIX + "ue-", pause=False)
    settle()
    d = dmsetup_cycle(n, PREFIX + "ud-", udev_sync=True)
    settle()
    print(HEADER)
    print(row(f"dmd engine DM() (udev_sync={mode.value})", e, n))
    print(row("dmsetup create/remove (udev cookies)", d, n))
    print(f"  dmsetup/engine = {ratio(total(d), total(e))}"
          f" (create {ratio(d['create'], e['create'])}, remove {ratio(d['remove'], e['remove'])})")
    return {"n": n, "engine_mode": mode.value, "engine": e, "dmsetup": d}


def udev_running(floor: str, n: int, repeat: int) -> dict[str, Any]:
    """(a) and (b) again with udev's queue running: udev's workers compete
    for the CPUs with whichever loop is timed, as on a busy machine."""
    print(f"\n(f) {n} devices: (a) and (b) with udev running, not paused, nobody "
          f"waiting for it (best of {repeat})")
    c_runs: list[dict[str, float]] = []
    e_runs: list[dict[str, float]] = []
    with DM(udev_sync=UdevSync.NONE) as dm:
        for _ in range(repeat):
            c_runs.append(c_cycle(floor, n, PREFIX + "fc-", pause=False))
            settle()
            e_runs.append(engine_cycle(dm, n, PREFIX + "fe-", pause=False))
            settle()
    c, e = best(c_runs), best(e_runs)
    print(HEADER)
    print(row("(a) C floor, raw ioctls, udev running", c, n))
    print(row("(b) dmd engine DM(udev_sync=NONE), udev running", e, n))
    print(f"  engine/C = {ratio(total(e), total(c))}"
          f" (create {ratio(e['create'], c['create'])}, remove {ratio(e['remove'], c['remove'])})")
    return {"n": n, "repeat": repeat, "c_floor": c, "engine": e,
            "c_runs": c_runs, "engine_runs": e_runs}


def listing(floor: str, n: int, repeat: int) -> dict[str, Any]:
    print(f"\n(e) list_devices() with {n} devices (udev's queue paused while they exist)")
    prefix = PREFIX + "l-"
    subprocess.run(["udevadm", "control", "--stop-exec-queue"], check=True)
    try:
        run(floor, "create", str(n), prefix)
        with DM(udev_sync=UdevSync.NONE) as dm:
            count0 = dm.ioctl_count
            cold_s = timed(dm.list_devices)
            cold_ioctls = dm.ioctl_count - count0
            count0 = dm.ioctl_count
            start = time.perf_counter()
            for _ in range(repeat):
                listed = dm.list_devices()
            warm_s = (time.perf_counter() - start) / repeat
            warm_ioctls = (dm.ioctl_count - count0) / repeat
        ours = sum(1 for d in listed if d.name.startswith(prefix))
        assert ours == n, f"listed {ours} of {n} devices"
        c = key_values(run(floor, "list", str(repeat)))
        dmsetup_s = min(timed(lambda: run("dmsetup", "ls")) for _ in range(5))
        c_proc_s = min(timed(lambda: run(floor, "list", "1")) for _ in range(5))
        run(floor, "remove", str(n), prefix)
    finally:
        subprocess.run(["udevadm", "control", "--start-exec-queue"], check=False)
    total_devices = len(listed)
    print(f"  devices listed: {total_devices}")
    print(f"  engine ioctls per list_devices(): cold handle {cold_ioctls}, warm handle "
          f"{warm_ioctls:g} (C floor: {c['ioctls'] - repeat:g} cold, then 1)")
    print(f"  engine  list_devices(): cold {1000 * cold_s:8.2f} ms, warm {1000 * warm_s:8.2f} ms"
          f"/call (mean of {repeat})")
    print(f"  C floor DM_LIST_DEVICES: cold {1000 * c['cold_s']:8.2f} ms, warm "
          f"{1000 * c['warm_per_call_s']:8.2f} ms/call")
    print(f"  processes: `dmsetup ls` {1000 * dmsetup_s:8.2f} ms, `dm_floor list 1` "
          f"{1000 * c_proc_s:8.2f} ms (best of 5, start-up included)")
    print(f"  engine/C (warm call) = {ratio(warm_s, c['warm_per_call_s'])}, "
          f"engine/C (cold) = {ratio(cold_s, c['cold_s'])}")
    print(f"  dmsetup ls / C process = {ratio(dmsetup_s, c_proc_s)}, "
          f"dmsetup ls / engine warm call = {ratio(dmsetup_s, warm_s)}")
    return {"n": n, "devices_listed": total_devices, "repeat": repeat,
            "engine": {"cold_s": cold_s, "cold_ioctls": cold_ioctls,
                       "warm_s": warm_s, "warm_ioctls": warm_ioctls},
            "c_floor": c, "dmsetup_ls_process_s": dmsetup_s, "c_list_process_s": c_proc_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="devices for (a)-(c) [200]")
    ap.add_argument("--n-udev", type=int, default=50, help="devices for (d) [50]")
    ap.add_argument("--n-list", type=int, default=1000, help="devices for (e) [1000]")
    ap.add_argument("--repeat", type=int, default=3, help="runs of (a), (b); list calls [3]")
    ap.add_argument("--floor", default=str(ROOT / "bench/engine/build/dm_floor"),
                    help="the compiled dm_floor.c")
    ap.add_argument("--n-running", type=int, default=40, help="devices for (f) [40]")
    ap.add_argument("--sections", default="adef",
                    help="which to run: a (a-c), d, e, f [adef]")
    ap.add_argument("--json", default=str(ROOT / ".lab-results/bench-engine.json"))
    args = ap.parse_args()

    if os.geteuid() != 0 or not Path("/dev/mapper/control").exists():
        print("bench: needs root and /dev/mapper/control: run it with bench/run",
              file=sys.stderr)
        return 2
    with DM(udev_sync=UdevSync.NONE) as dm:
        version = ".".join(map(str, dm.version()))
    udev = Path("/run/udev/control").exists()
    print(f"engine benchmark: kernel {platform.release()}, dm {version}, {os.cpu_count()} cpus,"
          f" udevd {'running' if udev else 'NOT running'}, python {platform.python_version()}")
    cleanup()
    started = time.perf_counter()
    results: dict[str, Any] = {"kernel": platform.release(), "dm_version": version}
    try:
        if "a" in args.sections:
            results["no_udev_wait"] = no_udev_wait(args.floor, args.n, args.repeat)
        if "d" in args.sections:
            results["udev"] = with_udev(args.n_udev)
        if "e" in args.sections:
            results["list"] = listing(args.floor, args.n_list, max(args.repeat, 10))
        if "f" in args.sections:
            results["udev_running"] = udev_running(args.floor, args.n_running, args.repeat)
    finally:
        cleanup()
    print(f"\nbench: done in {time.perf_counter() - started:.0f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"bench: results in {os.path.relpath(args.json, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
