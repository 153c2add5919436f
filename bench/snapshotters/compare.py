"""Snapshotters benchmark in the kernel lab: dmd-snapshotter against
containerd's devmapper snapshotter, with overlayfs as the floor.

Not a test: it measures. Run it with ``bench/run-snapshotters`` (builds the
Go programs on the host, boots the lab once, runs this inside as root).
Under emulation only ratios between programs of the same boot mean anything.

Each on a loop device of its own (devmapper: a thin-pool made with dmsetup
over a data and a metadata loop device, as containerd's own tests make it;
dmd: a pool made by CreatePool):

- per operation (``snapshotters-bench``, bench/snapshotters/main.go, N
  rounds): Prepare with a parent (its mounts then written, as an unpack
  does), Commit, View, Remove of the view, Remove of the committed layer;
  dmd-snapshotter through containerd's gRPC proxy client, the others in
  the driver's process, each as containerd holds it;
- containerd's snapshotter suite, the whole of it, timed: devmapper's own
  test binary, and dmd-snapshotter's (tests/lab/containerd);
- ``ctr run --rm`` of the same image (tests/lab/oci_image.py) on each,
  through Debian's containerd with the proxy plugin and devmapper
  configured.

Printed as medians and ratios to devmapper's; written to
.lab-results/bench-snapshotters.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "pools"))
sys.path.insert(0, str(ROOT / "tests" / "lab"))

from oci_image import write_archive  # noqa: E402

from bench import MANAGER, ROOT_PATH, Dmd, busctl, loop, run, settle  # noqa: E402

RESULTS = ROOT / ".lab-results"
BUILT = RESULTS / "bench-snapshotters"
DRIVER = BUILT / "snapshotters-bench"
DEVMAPPER_SUITE = BUILT / "devmapper-suite.test"
DMD_SUITE = RESULTS / "containerd" / "dmd-snapshotter-suite.test"
SNAPSHOTTER = Path(sys.executable).parent / "dmd-snapshotter"
JOB = "org.example.DeviceMapper.Job"
POOL = "ctdbench"
THIN_POOL = "ctdbench-devmapper"
IMAGE = "docker.io/library/dmd-bench:latest"
MIB = 1 << 20
OPS = ("prepare", "commit", "view", "remove-view", "remove")


def devmapper_pool(work: Path) -> None:
    """A thin-pool as containerd's devmapper tests make one: 64 KiB blocks,
    block zeroing skipped."""
    data, meta = loop(work, "dm-data", 4096), loop(work, "dm-meta", 256)
    sectors = int(run("blockdev", "--getsz", data))
    run("dmsetup", "create", THIN_POOL, "--table",
        f"0 {sectors} thin-pool {meta} {data} 128 32768 1 skip_block_zeroing")


def start_dmd_snapshotter(work: Path, socket: Path) -> subprocess.Popen[bytes]:
    disk = loop(work, "dmd", 4096)
    _, job = busctl("call", "org.example.DeviceMapper", ROOT_PATH, MANAGER, "CreatePool",
                       "sasa{sv}", POOL, "1", disk, "0")
    busctl("call", "org.example.DeviceMapper", job, JOB, "Wait", "d", "600")
    log = (RESULTS / "bench-snapshotters-snapshotter.log").open("ab")
    proc = subprocess.Popen([str(SNAPSHOTTER), "--pool", POOL, "--socket", str(socket),
                             "--log-level", "warning"], stdout=log, stderr=log)
    while not socket.exists():
        if proc.poll() is not None:
            raise SystemExit("dmd-snapshotter did not start: see its log")
        time.sleep(0.1)
    return proc


def per_operation(kind: str, work: Path, n: int, socket: Path) -> dict[str, list[float]]:
    root = work / f"root-{kind}"
    root.mkdir()
    if kind == "overlayfs":
        # The guest's / is itself an overlay, which overlayfs refuses as an upper.
        run("mount", "-t", "tmpfs", "bench-overlayfs", str(root))
    args = [str(DRIVER), "-kind", kind, "-root", str(root), "-n", str(n)]
    if kind == "dmd":
        args += ["-socket", str(socket)]
    if kind == "devmapper":
        args += ["-pool", THIN_POOL]
    out = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{kind}: {out.stderr.strip()}")
    seconds: dict[str, list[float]] = json.loads(out.stdout)["seconds"]
    return seconds


def suite(binary: Path, args: list[str], work: Path) -> float:
    start = time.perf_counter()
    out = subprocess.run([str(binary), "-test.root", "-test.timeout", "60m", *args],
                         cwd=work, env=dict(os.environ, TMPDIR=str(work)),
                         capture_output=True, text=True, timeout=3900)
    took = time.perf_counter() - start
    (RESULTS / f"bench-snapshotters-{binary.stem}.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"{binary.name} failed: see its log")
    return took


CONTAINERD = """version = 2
root = "{work}/containerd"
state = "/run/dmd-bench-containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "/run/dmd-bench-containerd/containerd.sock"
[proxy_plugins]
  [proxy_plugins.dmd]
    type = "snapshot"
    address = "{socket}"
[plugins."io.containerd.snapshotter.v1.devmapper"]
  root_path = "{work}/containerd-devmapper"
  pool_name = "{pool}"
  base_image_size = "10GiB"
"""


def ctr_runs(work: Path, socket: Path, n: int) -> dict[str, list[float]]:
    config = work / "containerd.toml"
    config.write_text(CONTAINERD.format(work=work, socket=socket, pool=THIN_POOL))
    (work / "containerd").mkdir()  # on a tmpfs: overlayfs refuses the guest's overlaid /
    run("mount", "-t", "tmpfs", "bench-containerd", str(work / "containerd"))
    address = "/run/dmd-bench-containerd/containerd.sock"
    log = (RESULTS / "bench-snapshotters-containerd.log").open("ab")
    daemon = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log)

    def ctr(*args: str) -> None:
        run("ctr", "--address", address, "--namespace", "bench", *args)

    try:
        for _ in range(600):
            if subprocess.run(["ctr", "--address", address, "version"],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        archive = work / "image.tar"
        write_archive(archive, IMAGE)
        times: dict[str, list[float]] = {}
        for kind in ("overlayfs", "devmapper", "dmd"):
            ctr("images", "import", "--snapshotter", kind, str(archive))
            for i in range(n):
                start = time.perf_counter()
                ctr("run", "--rm", "--snapshotter", kind, IMAGE, f"{kind}-{i}", "/bin/true")
                times.setdefault(kind, []).append(time.perf_counter() - start)
        return times
    finally:
        daemon.terminate()
        daemon.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="rounds of each operation")
    parser.add_argument("--runs", type=int, default=5, help="ctr runs on each")
    parser.add_argument("--no-suite", action="store_true", help="skip the two suites (~10 min)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="dmd's wall-clock samples (py-spy, raw) to this file; "
                             "dmd-snapshotter's operations only, no ratio")
    args = parser.parse_args()
    for built in (DRIVER, DEVMAPPER_SUITE, DMD_SUITE):
        if not built.exists():
            raise SystemExit(f"{built} is missing: bench/run-snapshotters builds it")
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        subprocess.run(["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"], check=False)
    work = Path(tempfile.mkdtemp(prefix="bench-snapshotters-"))
    socket = work / "snapshotter.sock"
    devmapper_pool(work)
    dmd = Dmd(work / "state", args.profile)
    dmd.start()
    snapshotter = start_dmd_snapshotter(work, socket)
    figures: dict[str, Any] = {"n": args.n}
    try:
        if args.profile is not None:
            times = per_operation("dmd", work, args.n, socket)
            print(json.dumps({op: round(statistics.median(times[op]) * 1000, 1) for op in OPS}))
            return
        ops = {kind: per_operation(kind, work, args.n, socket)
               for kind in ("overlayfs", "devmapper", "dmd")}
        figures["operations_ms"] = {
            kind: {op: round(statistics.median(times[op]) * 1000, 1) for op in OPS}
            for kind, times in ops.items()}
        figures["ratios"] = {op: round(figures["operations_ms"]["dmd"][op]
                                       / figures["operations_ms"]["devmapper"][op], 2)
                             for op in OPS}
        print(json.dumps(figures, indent=1), flush=True)
        runs = ctr_runs(work, socket, args.runs)
        figures["ctr_run_s"] = {kind: round(statistics.median(t), 2) for kind, t in runs.items()}
        figures["ctr_run_ratio"] = round(figures["ctr_run_s"]["dmd"]
                                         / figures["ctr_run_s"]["devmapper"], 2)
        print(json.dumps({k: figures[k] for k in ("ctr_run_s", "ctr_run_ratio")}), flush=True)
        if not args.no_suite:
            figures["suite_s"] = {
                "devmapper": round(suite(DEVMAPPER_SUITE, ["-test.run", "TestSnapshotterSuite"],
                                         work), 1),
                "dmd": round(suite(DMD_SUITE, ["-socket", str(socket)], work), 1)}
            figures["suite_ratio"] = round(figures["suite_s"]["dmd"]
                                           / figures["suite_s"]["devmapper"], 2)
    finally:
        snapshotter.terminate()
        snapshotter.wait(timeout=60)
        dmd.stop()
        settle()
    print(json.dumps(figures, indent=1))
    (RESULTS / "bench-snapshotters.json").write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
