"""Volumes handed to services, on the real kernel.

Volume.OpenDevice: a service that runs as its own user (here uid 65534,
allowed the volume action by a polkit rule) makes a volume,
gets its block device as a file descriptor over the system bus, writes
through it, and root reads the same bytes from /dev/mapper, whose node stays
root's and closed to that user. Another user is refused the volume; an
exclusive open is refused while someone holds the device exclusively; the
open descriptor keeps the volume from being deleted under its user.
CreateVolume's filesystem option: ext4 and xfs made in the creating job,
mounted, written, checked clean by their own fsck, read back."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from lab_daemon import SystemDmd, busctl, polkitd, unfinished
from test_pools_lab import create_pool, disks, prop, wait

from dmd.dbus.names import (
    BUS_NAME,
    ERROR_PREFIX,
    JOB_INTERFACE,
    POOL_INTERFACE,
    VOLUME_INTERFACE,
)

__all__ = ["disks"]  # the fixture, used by name

pytestmark = [pytest.mark.kernel, pytest.mark.kernel_volumes]

MIB = 1 << 20
PYTHON = os.path.realpath(sys.executable)
SERVICE, OTHER = "65534", "1"  # nobody, daemon
RULE = """polkit.addRule(function(action, subject) {
    if (action.id == "org.example.devicemapper.volume" &&
        (subject.user == "nobody" || subject.user == "daemon"))
        return polkit.Result.YES;
});
"""

# The service: asks for the volume's device and uses the descriptor it gets.
CLIENT = textwrap.dedent('''
    import asyncio, hashlib, os, sys
    from dbus_fast import BusType, Message, MessageType, Variant
    from dbus_fast.aio import MessageBus

    async def main(volume, mode, action, size, exclusive):
        bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
        reply = await bus.call(Message(
            destination="org.example.DeviceMapper", path=volume,
            interface="org.example.DeviceMapper.Volume", member="OpenDevice",
            signature="sa{sv}", body=[mode, {"exclusive": Variant("b", exclusive)}]))
        if reply.message_type is MessageType.ERROR:
            print(reply.error_name, reply.body[0])
            sys.exit(3)
        fd = reply.unix_fds[reply.body[0]]
        if action == "write":
            data = b"".join(hashlib.sha256(i.to_bytes(8, "little")).digest() * 128
                            for i in range(size // 4096))
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            print(hashlib.sha256(data).hexdigest())
        elif action == "read":
            print(hashlib.sha256(os.pread(fd, size, 0)).hexdigest())
        else:  # hold it open until told
            print("open", flush=True)
            sys.stdin.readline()
        os.close(fd)

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                     sys.argv[5] == "x"))
''')


@pytest.fixture
def client() -> Iterator[Path]:
    """The service's script, and the dbus-fast it imports, where uid 65534 can
    read them (the project's own directory may be closed to it), run by the
    base interpreter (the venv's python is a link to it)."""
    import dbus_fast

    home = Path(tempfile.mkdtemp(prefix="dmdtest-service-", dir="/run"))
    shutil.copytree(Path(dbus_fast.__file__).parent, home / "dbus_fast")
    (home / "service.py").write_text(CLIENT)
    for path in [home, *home.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        yield home / "service.py"
    finally:
        shutil.rmtree(home)


def as_user(user: str, *command: str, cwd: str = "/") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                           *command], capture_output=True, text=True, timeout=120, cwd=cwd)


def service(client: Path, user: str, volume: str, mode: str, action: str,
            size: int = 8 * MIB, exclusive: bool = False) -> subprocess.CompletedProcess[str]:
    return as_user(user, PYTHON, str(client), volume, mode, action, str(size),
                   "x" if exclusive else "-")


@pytest.fixture
def volume_rule() -> Iterator[None]:
    rules = Path("/etc/polkit-1/rules.d/49-dmdtest-open.rules")
    rules.parent.mkdir(parents=True, exist_ok=True)
    rules.write_text(RULE)
    try:
        with polkitd():
            yield
    finally:
        rules.unlink(missing_ok=True)


def test_a_service_gets_its_volume_as_a_descriptor(system_dmd: SystemDmd, disks: list[str],
                                                   client: Path, volume_rule: None) -> None:
    pool = create_pool("dmdtpo", disks[:1])
    made = busctl("--json=short", "call", BUS_NAME, pool, POOL_INTERFACE, "CreateVolume",
                  "sta{sv}", "svc", str(64 * MIB), "0", user=SERVICE)
    assert made.returncode == 0, made.stderr
    volume, job = json.loads(made.stdout)["data"]
    wait(job)
    assert prop(volume, VOLUME_INTERFACE, "Owner") == 65534
    node = "/dev/mapper/dmdtpo-svc"

    written = service(client, SERVICE, volume, "rw", "write")
    assert written.returncode == 0, (written.stdout, written.stderr)
    with open(node, "rb") as f:
        assert hashlib.sha256(f.read(8 * MIB)).hexdigest() == written.stdout.strip()

    # The node stays root's, closed to the service: the descriptor is its way in.
    st = os.stat(os.path.realpath(node))
    assert stat.S_ISBLK(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o007
    direct = as_user(SERVICE, "dd", f"if={node}", "of=/dev/null", "count=1", "status=none")
    assert direct.returncode != 0 and "Permission denied" in direct.stderr

    other = service(client, OTHER, volume, "r", "read")
    assert other.returncode == 3 and "NotAuthorized" in other.stdout, other.stdout
    assert "belongs to uid 65534" in other.stdout

    read = service(client, SERVICE, volume, "r", "read")
    assert read.returncode == 0 and read.stdout.strip() == written.stdout.strip()

    # O_EXCL: refused while another holder has the device exclusively.
    holder = os.open(node, os.O_RDONLY | os.O_EXCL)
    try:
        busy = service(client, SERVICE, volume, "r", "read", exclusive=True)
        assert busy.returncode == 3 and "Busy" in busy.stdout, busy.stdout
    finally:
        os.close(holder)
    alone = service(client, SERVICE, volume, "r", "read", exclusive=True)
    assert alone.returncode == 0 and alone.stdout.strip() == written.stdout.strip()

    # The service's open descriptor keeps its volume from being deleted.
    holding = subprocess.Popen(
        ["setpriv", f"--reuid={SERVICE}", f"--regid={SERVICE}", "--clear-groups",
         PYTHON, str(client), volume, "r", "hold", "0", "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert holding.stdout is not None and holding.stdout.readline().strip() == "open"
        deleting = busctl("--json=short", "call", BUS_NAME, volume, VOLUME_INTERFACE,
                          "Delete", "a{sv}", "0", user=SERVICE)
        assert deleting.returncode == 0, deleting.stderr
        (job,) = json.loads(deleting.stdout)["data"]
        busctl("call", BUS_NAME, job, JOB_INTERFACE, "Wait", "d", "120")
        assert prop(job, JOB_INTERFACE, "ErrorName") == "Busy"
    finally:
        assert holding.stdin is not None
        holding.stdin.write("\n")
        holding.stdin.close()
        holding.wait(timeout=60)
    assert prop(volume, VOLUME_INTERFACE, "State") == "active"
    again = service(client, SERVICE, volume, "r", "read")
    assert again.returncode == 0 and again.stdout.strip() == written.stdout.strip()


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_a_volume_comes_with_the_filesystem_asked_for(system_dmd: SystemDmd, disks: list[str],
                                                      fstype: str, tmp_path: Path) -> None:
    pool = create_pool("dmdtpf", disks[:1])
    made = busctl("--json=short", "call", BUS_NAME, pool, POOL_INTERFACE, "CreateVolume",
                  "sta{sv}", "files", str(400 * MIB), "1", "filesystem", "s", fstype)
    assert made.returncode == 0, made.stderr
    volume, job = json.loads(made.stdout)["data"]
    wait(job)
    node = "/dev/mapper/dmdtpf-files"
    found = subprocess.run(["blkid", "-p", "-o", "export", node], capture_output=True,
                           text=True, check=True).stdout
    assert f"TYPE={fstype}" in found and "LABEL=files" in found, found
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    payload = os.urandom(3 * MIB)
    subprocess.run(["mount", node, str(mountpoint)], check=True)
    try:
        (mountpoint / "hello").write_bytes(payload)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    check = ["e2fsck", "-fn", node] if fstype == "ext4" else ["xfs_repair", "-n", node]
    checked = subprocess.run(check, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    subprocess.run(["mount", "-o", "ro", node, str(mountpoint)], check=True)
    try:
        assert (mountpoint / "hello").read_bytes() == payload
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    assert prop(volume, VOLUME_INTERFACE, "State") == "active"


def test_a_client_without_descriptor_passing_hears_why_at_once(
        system_dmd: SystemDmd, disks: list[str]) -> None:
    """The system bus drops a reply with a descriptor to such a client and
    counts the call as answered: dmd's error must still get through."""
    pool = create_pool("dmdtpn", disks[:1])
    made = busctl("--json=short", "call", BUS_NAME, pool, POOL_INTERFACE, "CreateVolume",
                  "sta{sv}", "v", str(16 * MIB), "0")
    volume, job = json.loads(made.stdout)["data"]
    wait(job)

    async def ask() -> tuple[str, float]:
        bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=False).connect()
        try:
            started = time.monotonic()
            reply = await asyncio.wait_for(bus.call(Message(
                destination=BUS_NAME, path=volume, interface=VOLUME_INTERFACE,
                member="OpenDevice", signature="sa{sv}", body=["r", {}])), 20)
            assert reply is not None and reply.message_type is MessageType.ERROR
            return reply.error_name or "", time.monotonic() - started
        finally:
            bus.disconnect()

    try:
        name, took = asyncio.run(ask())
    except TimeoutError:
        pytest.fail(f"no answer in 20 s; dmd's log ends:\n{system_dmd.log.read_text()[-4000:]}")
    assert name == ERROR_PREFIX + "InvalidArgument" and took < 10, (name, took)


FAILING_MKFS = """#!/bin/sh
# Writes over the start of the device it is given, then fails.
for last; do :; done
dd if=/dev/urandom of="$last" bs=1M count=4 conv=fsync status=none
echo "mkfs.ext4: the disk is made of cheese" >&2
exit 3
"""


def test_a_failing_mkfs_undoes_the_volume_on_the_kernel(stopped_dmd: SystemDmd,
                                                       disks: list[str]) -> None:
    """After mkfs wrote and closed the device, udev's watch rule probes it:
    the undo must wait that out, and leave no device, record or thin id."""
    tools = Path(tempfile.mkdtemp(prefix="dmdtest-tools-", dir="/run"))
    (tools / "mkfs.ext4").write_text(FAILING_MKFS)
    (tools / "mkfs.ext4").chmod(0o755)
    try:
        stopped_dmd.start(env={"PATH": f"{tools}:{os.environ['PATH']}"})
        pool = create_pool("dmdtpm", disks[:1])
        made = busctl("--json=short", "call", BUS_NAME, pool, POOL_INTERFACE, "CreateVolume",
                      "sta{sv}", "doomed", str(64 * MIB), "1", "filesystem", "s", "ext4")
        assert made.returncode == 0, made.stderr
        volume, job = json.loads(made.stdout)["data"]
        busctl("call", BUS_NAME, job, JOB_INTERFACE, "Wait", "d", "120")
        assert prop(job, JOB_INTERFACE, "State") == "failed"
        assert prop(job, JOB_INTERFACE, "ErrorName") == "Failed"
        assert prop(job, JOB_INTERFACE, "ErrorMessage") == \
            "mkfs.ext4 exited with status 3: mkfs.ext4: the disk is made of cheese"
        assert not Path("/dev/mapper/dmdtpm-doomed").exists()
        assert "dmdtpm-doomed" not in subprocess.run(["dmsetup", "ls"], capture_output=True,
                                                     text=True).stdout
        objects = busctl("--json=short", "call", BUS_NAME, "/org/example/DeviceMapper",
                         "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        assert objects.returncode == 0 and volume not in json.loads(objects.stdout)["data"][0]
        assert unfinished(stopped_dmd.state_dir) == 0
        status = subprocess.run(["dmsetup", "status", "dmdtpm-tpool"], capture_output=True,
                                text=True, check=True).stdout.split()
        assert status[3] == "2", status  # transaction id: the create, then its undo
    finally:
        shutil.rmtree(tools)
