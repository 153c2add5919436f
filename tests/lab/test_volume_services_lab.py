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
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from lab_daemon import SystemDmd, busctl, dmsetup, polkitd, unfinished
from test_pools_lab import call as pools_call
from test_pools_lab import create_pool, disks, prop, wait

from dmd.dbus.names import (
    BUS_NAME,
    ERROR_PREFIX,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    POOL_INTERFACE,
    ROOT_PATH,
    VOLUME_INTERFACE,
)

__all__ = ["disks"]  # the fixture, used by name

pytestmark = [pytest.mark.kernel]

MIB = 1 << 20
PYTHON = os.path.realpath(sys.executable)
SERVICE, OTHER = "65534", "1"  # nobody, daemon
NOBODY_ALLOWED = "2"  # bin: no rule allows it anything
RULE = """polkit.addRule(function(action, subject) {
    if (action.id == "org.example.devicemapper.volume" &&
        (subject.user == "nobody" || subject.user == "daemon"))
        return polkit.Result.YES;
});
"""

# Any call, as a user, printing the reply or the error's name (busctl prints
# only an error's message).
ASK = textwrap.dedent('''
    import asyncio, json, sys
    from dbus_fast import BusType, Message, MessageType, Variant
    from dbus_fast.aio import MessageBus

    async def main(path, interface, member, signature, body):
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        args = [{k: Variant(*v) for k, v in a.items()} if isinstance(a, dict) else a
                for a in json.loads(body)]
        reply = await bus.call(Message(
            destination="org.example.DeviceMapper", path=path, interface=interface,
            member=member, signature=signature, body=args))
        if reply.message_type is MessageType.ERROR:
            print(json.dumps({"error": reply.error_name.removeprefix(
                "org.example.DeviceMapper.Error."), "message": str(reply.body[:1])}))
        else:
            print(json.dumps({"data": reply.body}))

    asyncio.run(main(*sys.argv[1:6]))
''')

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
    (home / "ask.py").write_text(ASK)
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


@pytest.mark.kernel_volumes  # the boots' balance: docs/kernel-lab.md
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


@pytest.mark.kernel_volumes  # the boots' balance: docs/kernel-lab.md
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
    if fstype == "ext4":  # a thin volume reads zeros: no inode table was written
        dump = subprocess.run(["dumpe2fs", node], capture_output=True, text=True, check=True)
        groups = re.findall(r"^Group \d+: .*$", dump.stdout, re.MULTILINE)
        assert groups and all("ITABLE_ZEROED" in group for group in groups), groups
    subprocess.run(["mount", "-o", "ro", node, str(mountpoint)], check=True)
    try:
        assert (mountpoint / "hello").read_bytes() == payload
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    assert prop(volume, VOLUME_INTERFACE, "State") == "active"


@pytest.mark.kernel_volumes  # the boots' balance: docs/kernel-lab.md
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


@pytest.mark.kernel_volumes  # the boots' balance: docs/kernel-lab.md
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


def _ask(client: Path, user: str, path: str, interface: str, member: str, signature: str,
         *args: Any) -> tuple[str, Any]:
    """("", the reply's body) or (the error's name, its message), as *user*;
    an a{sv} argument as a dict of name -> (signature, value)."""
    out = as_user(user, PYTHON, str(client.parent / "ask.py"), path, interface, member,
                  signature, json.dumps(list(args)))
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    return (reply["error"], reply["message"]) if "error" in reply else ("", reply["data"])


def test_a_service_reaches_nothing_but_its_own_volumes(
        system_dmd: SystemDmd, disks: list[str], client: Path, volume_rule: None) -> None:
    """Issue 26's attacks, by a uid polkit allows the volume action and
    nothing else, on the real kernel: each gets a named error or its own
    data, never the pool's devices, another's volume, or what a deleted
    volume left on the disk."""
    def ask(user: str, path: str, interface: str, member: str, signature: str,
            *args: Any) -> tuple[str, Any]:
        return _ask(client, user, path, interface, member, signature, *args)

    def made(reply: tuple[str, Any]) -> str:
        error, data = reply
        assert not error, reply
        wait(data[-1])
        return str(data[0])

    # A pool with room for thick volumes past its data.
    pool, job = pools_call(ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}", "dmdtpi",
                           "1", disks[0], "1", "data-size", "t", str(32 * MIB))
    wait(job)
    size = 16 * MIB
    mine = made(ask(SERVICE, pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", "mine", size,
                    {}))

    # Names that are the pool's own devices, or that end in a newline.
    for name in ("tdata", "tmeta", "tpool"):
        assert ask(SERVICE, mine, VOLUME_INTERFACE, "Snapshot", "sa{sv}", name,
                   {"activate": ["b", False]})[0] == "InvalidArgument"
        assert ask(SERVICE, pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", name, size,
                   {})[0] == "InvalidArgument"
    assert ask(SERVICE, pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", "nl\n", size,
               {})[0] == "InvalidArgument"
    assert dmsetup("info", "-c", "--noheadings", "-o", "uuid", "dmdtpi-tdata").startswith(
        "DMD-POOL-")

    # A name people use: the device doubles its "-", as LVM's would.
    made(ask(SERVICE, pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", "web-data", size, {}))
    assert os.path.exists("/dev/mapper/dmdtpi-web--data")

    # Another uid allowed the same action: nothing of the first one's.
    for member, signature, args in [("Snapshot", "sa{sv}", ("stolen", {})),
                                    ("Resize", "ta{sv}", (2 * size, {})),
                                    ("Delete", "a{sv}", ({},)),
                                    ("Deactivate", "a{sv}", ({},)),
                                    ("AttachCache", "sa{sv}", ("dmdtpi/web-data", {})),
                                    ("Lock", "a{sv}", ({},)),
                                    ("Unlock", "a{sv}", ({},)),
                                    ("ChangeKey", "a{sv}", ({},))]:
        assert ask(OTHER, mine, VOLUME_INTERFACE, member, signature, *args)[0] == \
            "NotAuthorized", member
    opened = service(client, OTHER, mine, "r", "read")
    assert opened.returncode == 3 and "NotAuthorized" in opened.stdout
    # ... and the pool is not a volume user's to change.
    assert ask(SERVICE, pool, POOL_INTERFACE, "Destroy", "a{sv}", {})[0] == "NotAuthorized"
    # A uid no rule allows anything may read, and change nothing.
    assert ask(NOBODY_ALLOWED, pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", "mine2", size,
               {})[0] == "NotAuthorized"
    assert ask(NOBODY_ALLOWED, mine, VOLUME_INTERFACE, "Delete", "a{sv}", {})[0] == \
        "NotAuthorized"

    # A stale object: SERVICE's volume deleted, OTHER makes one of its name.
    old = made(ask(SERVICE, pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", "shared", size,
                   {}))
    wait(ask(SERVICE, old, VOLUME_INTERFACE, "Delete", "a{sv}", {})[1][0])
    new = made(ask(OTHER, pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", "shared", size,
                   {}))
    assert new != old
    error, _ = ask(SERVICE, old, VOLUME_INTERFACE, "OpenDevice", "sa{sv}", "rw", {})
    assert error in ("NotFound", "org.freedesktop.DBus.Error.UnknownObject",
                     "org.freedesktop.DBus.Error.UnknownMethod"), error

    # New room never shows what a deleted volume left: root fills a thick
    # volume, the service deletes it, then grows an inactive thick volume of
    # its own into that room, activates it and reads zeros.
    old_thick = made(ask(SERVICE, pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", "old",
                         size, {"thin": ["b", False]}))
    with open("/dev/mapper/dmdtpi-old", "r+b") as f:
        f.write(b"\xa5" * size)
        f.flush()
        os.fsync(f.fileno())
    wait(ask(SERVICE, old_thick, VOLUME_INTERFACE, "Delete", "a{sv}", {})[1][0])
    grown = made(ask(SERVICE, pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", "grown",
                     4 * MIB, {"thin": ["b", False]}))
    for member, signature, args in [("Deactivate", "a{sv}", ({},)),
                                    ("Resize", "ta{sv}", (size, {})),
                                    ("Activate", "a{sv}", ({},))]:
        error, data = ask(SERVICE, grown, VOLUME_INTERFACE, member, signature, *args)
        assert not error, (member, data)
        wait(data[0])
    read = service(client, SERVICE, grown, "r", "read", size=size)
    assert read.returncode == 0, read.stdout + read.stderr
    assert read.stdout.strip() == hashlib.sha256(bytes(size)).hexdigest()
