"""containerd itself on dmd's volumes: Debian's containerd with
dmd-snapshotter as its proxy snapshotter "dmd", an image imported from an
OCI archive made here (tests/lab/oci_image.py), a container run by runc on
a root file system that is a dmd volume, containerd restarted, its garbage
collector removing what it no longer needs (and dmd's volumes following)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from lab_daemon import SystemDmd
from oci_image import write_archive
from test_pools_lab import create_pool
from test_snapshotter_lab import RESULTS, start_snapshotter

from dmd.dbus.names import BUS_NAME, OBJECT_MANAGER_INTERFACE, ROOT_PATH, VOLUME_INTERFACE
from tests.helpers import unvariant

pytestmark = [pytest.mark.kernel, pytest.mark.kernel_containerd]

IMAGE = "docker.io/library/dmd-lab:latest"
POOL = "dmdtpctd"  # dmdtp*: the lab fixtures remove its devices after the test
RUN = Path("/run/dmd-lab-containerd")  # short: the shims' socket paths must fit
CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[proxy_plugins]
  [proxy_plugins.dmd]
    type = "snapshot"
    address = "{snapshotter}"
"""


@dataclass
class Containerd:
    config: Path
    socket: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.config)],
                                         stdout=out, stderr=out)
        deadline = time.monotonic() + 120
        while self.ctr("version", check=False).returncode != 0:
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                self.log.read_text()[-4000:]
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=120)

    def ctr(self, *args: str, check: bool = True, timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "lab", *args],
                             capture_output=True, text=True, timeout=timeout)
        if check:
            assert out.returncode == 0, (args, out.stdout, out.stderr,
                                         self.log.read_text()[-3000:])
        return out

    def snapshots(self) -> dict[str, str]:
        """containerd's list of the dmd snapshotter's snapshots: key -> kind."""
        lines = self.ctr("snapshots", "--snapshotter", "dmd", "ls").stdout.splitlines()[1:]
        return {line.split()[0]: line.split()[-1] for line in lines if line.strip()}


def _cgroups() -> None:
    """runc needs a cgroup file system; the lab's init may not mount one."""
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists() and \
            not any(Path("/sys/fs/cgroup").iterdir()):
        subprocess.run(["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"], check=True)


@pytest.fixture
def containerd(system_dmd: SystemDmd, loop_device: Callable[[int], str],
               tmp_path: Path) -> Iterator[Containerd]:
    _cgroups()
    create_pool(POOL, [loop_device(2048)])
    RESULTS.mkdir(parents=True, exist_ok=True)
    snapshotter = start_snapshotter(POOL, tmp_path / "snapshotter.sock",
                                    RESULTS / "snapshotter-containerd.log")
    RUN.mkdir(mode=0o700, exist_ok=True)
    config = tmp_path / "containerd.toml"
    config.write_text(CONFIG.format(root=tmp_path / "root", state=RUN / "state",
                                    socket=RUN / "containerd.sock",
                                    snapshotter=snapshotter.socket))
    daemon = Containerd(config, RUN / "containerd.sock", RESULTS / "containerd.log")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        snapshotter.stop()


def pool_volumes(pool: str = POOL) -> dict[str, dict[str, str]]:
    """The pool's volumes in dmd: name -> labels."""
    async def read() -> dict[str, dict[str, str]]:
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        try:
            reply = await bus.call(Message(destination=BUS_NAME, path=ROOT_PATH,
                                           interface=OBJECT_MANAGER_INTERFACE,
                                           member="GetManagedObjects"))
        finally:
            bus.disconnect()
        assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, reply
        volumes = (unvariant(i[VOLUME_INTERFACE]) for i in reply.body[0].values()
                   if VOLUME_INTERFACE in i)
        return {v["Name"]: v["Labels"] for v in volumes if v["PoolName"] == pool}
    return asyncio.run(read())


def test_a_container_runs_on_a_dmd_volume(containerd: Containerd, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    write_archive(archive, IMAGE)
    containerd.ctr("images", "import", "--snapshotter", "dmd", str(archive))
    layers = containerd.snapshots()
    assert sorted(layers.values()) == ["Committed", "Committed"], layers
    # Each layer is a volume of the pool, its key among its labels.
    volumes = pool_volumes()
    keys = {labels.get("containerd/name", "").rpartition("/")[2] for labels in volumes.values()}
    assert set(layers) <= keys, (layers, volumes)

    script = ("cat /etc/lab-release; grep ' / ' /proc/mounts; "
              "cat /data/log 2>/dev/null; echo run >> /data/log; sync")
    out = containerd.ctr("run", "--snapshotter", "dmd", IMAGE, "c1", "/bin/sh", "-c", script)
    lines = out.stdout.splitlines()
    assert lines[0] == "dmd lab"
    source, _, fstype = lines[1].split()[:3]
    assert source.startswith("/dev/dm-") and fstype == "ext4", lines
    dm_name = Path(f"/sys/block/{source.removeprefix('/dev/')}/dm/name").read_text().strip()
    assert dm_name.startswith(f"{POOL}-containerd."), dm_name  # one of the pool's volumes
    assert "run" not in lines[2:]
    assert set(containerd.snapshots()) == set(layers) | {"c1"}

    # containerd restarted: its snapshots are all still there, the data too.
    containerd.stop()
    containerd.start()
    assert containerd.snapshots() == {**layers, "c1": "Active"}
    out = containerd.ctr("task", "start", "c1")
    assert out.stdout.splitlines()[2:] == ["run"], out.stdout

    # Garbage: the container and its snapshot, then the image and its layers.
    containerd.ctr("containers", "rm", "c1")
    assert containerd.snapshots() == layers
    containerd.ctr("images", "rm", "--sync", IMAGE)
    deadline = time.monotonic() + 120
    while containerd.snapshots() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert containerd.snapshots() == {}
    assert list(pool_volumes()) == ["containerd.base"]
    (RESULTS / "containerd-volumes.json").write_text(json.dumps(volumes, indent=1))
