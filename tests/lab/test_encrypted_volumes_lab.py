"""Encrypted volumes on the real kernel, with the real cryptsetup.

A volume dmd encrypts opens with ``cryptsetup open`` once dmd is stopped (a
rescue system's way), and holds what was written through dmd; its snapshot
opens with the same key and holds the data of its moment. While everything
runs, the key is looked for in every place it must not be: the bus (a
monitor's capture of every message), dmd's log, its database, the
arguments of every cryptsetup it ran, and ``dmsetup table`` (the key is in
the kernel by keyring reference only, loaded with DM_SECURE_DATA by
cryptsetup). kill -9 while luksFormat and while cryptsetup open run leaves
nothing half-made and no cleartext device for a volume shown locked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from lab_daemon import SystemDmd, dmsetup, unfinished
from test_pools_lab import (
    MIB,
    call,
    checksum,
    create_pool,
    disks,
    kernel_thin_ids,
    prop,
    recorded_thin_ids,
    settle,
    volume_paths,
    wait,
    write_pattern,
)

from dmd.dbus.names import BUS_NAME, JOB_INTERFACE, POOL_INTERFACE, VOLUME_INTERFACE

__all__ = ["disks"]  # the fixture, used by name

pytestmark = [pytest.mark.kernel, pytest.mark.kernel_volumes]

KEY = b"lab key: correct horse battery staple"
SECOND = b"lab key: the second keyslot's"
WRONG = b"lab key: not this volume's key"
FAST = {"pbkdf-memory-kib": Variant("u", 1024), "pbkdf-iterations": Variant("u", 4)}
SIZE = 8 * MIB
POOL = "dmdtpc"  # the lab's clean-up removes dmdtp* devices


def key_pipe(key: bytes) -> int:
    read_end, write_end = os.pipe()
    os.write(write_end, key)
    os.close(write_end)
    return read_end


def fd_call(path: str, interface: str, member: str, signature: str, body: list[Any],
            keys: list[bytes] = ()) -> tuple[str | None, list[Any]]:  # type: ignore[assignment]
    """(the error's name or None, the reply's body) of a call that sends
    each of *keys* on a pipe (as descriptors 0, 1, ...)."""
    async def attempt() -> tuple[str | None, list[Any]]:
        fds = [key_pipe(k) for k in keys]
        client = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
        try:
            reply = await client.call(Message(
                destination=BUS_NAME, path=path, interface=interface, member=member,
                signature=signature, body=body, unix_fds=fds))
        finally:
            client.disconnect()
            for fd in fds:
                os.close(fd)
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            return reply.error_name, list(reply.body)
        return None, list(reply.body)

    return asyncio.run(attempt())


def create_encrypted(pool: str, name: str, key: bytes = KEY, wait_for: bool = True,
                     **options: Variant) -> tuple[str, str]:
    error, body = fd_call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                          [name, 32 * MIB, {"encryption": Variant("s", "luks2"),
                                            "key": Variant("h", 0), **(options or FAST)}],
                          [key])
    assert error is None, body
    volume, job = body
    if wait_for:
        wait(job)
    return volume, job


def volume_call(volume: str, member: str, options: dict[str, Variant],
                keys: list[bytes] = ()) -> str | None:  # type: ignore[assignment]
    error, _ = fd_call(volume, VOLUME_INTERFACE, member, "a{sv}", [options], keys)
    return error


def unlock(volume: str, key: bytes) -> str | None:
    return volume_call(volume, "Unlock", {"key": Variant("h", 0)}, [key])


def lock(volume: str) -> str | None:
    return volume_call(volume, "Lock", {})


class Wrapped:
    """cryptsetup first on dmd's PATH: a script that writes its arguments to
    a file, then runs the real one."""

    def __init__(self, tmp: Path) -> None:
        self.bin, self.argv = tmp / "bin", tmp / "cryptsetup-argv"
        self.bin.mkdir()
        script = self.bin / "cryptsetup"
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {self.argv}\n'
                          'exec /usr/sbin/cryptsetup "$@"\n')
        script.chmod(0o755)

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}"}


@pytest.fixture
def monitor(tmp_path: Path) -> Any:
    """Every message on the system bus, as dbus-monitor captures it (pcap)."""
    capture = tmp_path / "bus.pcap"
    with capture.open("wb") as out:
        proc = subprocess.Popen(["dbus-monitor", "--system", "--pcap"], stdout=out,
                                stderr=subprocess.DEVNULL)
    time.sleep(1)
    yield capture
    proc.terminate()
    proc.wait(timeout=30)


def assert_nowhere(places: dict[str, bytes], *keys: bytes) -> None:
    for name, content in places.items():
        for key in keys:
            assert key not in content, f"a key is in {name}"
            assert key.hex().encode() not in content.lower(), f"a key, in hex, is in {name}"


def test_rescue_snapshot_and_no_key_anywhere(stopped_dmd: SystemDmd, disks: list[str],
                                             tmp_path: Path, monitor: Path) -> None:
    wrapped = Wrapped(tmp_path)
    dmd = stopped_dmd
    dmd.start(env=wrapped.env())
    pool = create_pool(POOL, [disks[0]])
    volume, _ = create_encrypted(pool, "vault")
    assert prop(volume, VOLUME_INTERFACE, "Encryption") == "luks2"
    assert not prop(volume, VOLUME_INTERFACE, "Locked")
    cleartext = f"/dev/mapper/{POOL}-vault-crypt"
    assert prop(volume, VOLUME_INTERFACE, "CleartextPath") == cleartext
    first = write_pattern(cleartext, b"before the snapshot", SIZE)
    (snap, job) = fd_call(volume, VOLUME_INTERFACE, "Snapshot", "sa{sv}", ["copy", {}])[1]
    wait(job)
    later = write_pattern(cleartext, b"after the snapshot", SIZE)
    # The table in the kernel names a keyring entry, not the key.
    shown = dmsetup("table", "--showkeys", f"{POOL}-vault-crypt")
    assert ":logon:" in shown, shown

    assert volume_call(volume, "ChangeKey", {"key": Variant("h", 0),
                                             "new-key": Variant("h", 1), **FAST},
                       [KEY, SECOND]) is None
    assert lock(volume) is None
    assert prop(volume, VOLUME_INTERFACE, "Locked")
    assert not Path(cleartext).exists()
    assert unlock(volume, WRONG) == "org.example.DeviceMapper.Error.WrongKey"
    assert not Path(cleartext).exists()
    assert unlock(volume, SECOND) is None
    assert checksum(cleartext, SIZE) == later
    # The snapshot: the origin's header, so the origin's keys; locked until asked.
    assert prop(snap, VOLUME_INTERFACE, "Locked")
    assert unlock(snap, KEY) is None
    assert checksum(f"/dev/mapper/{POOL}-copy-crypt", SIZE) == first
    places = {"dmsetup table": dmsetup("table").encode(),
              "dmsetup table --showkeys": dmsetup("table", "--showkeys").encode()}
    assert lock(snap) is None and lock(volume) is None
    settle()
    dmd.stop()

    # A rescue system: cryptsetup alone opens the volume with its key.
    key_file = tmp_path / "rescue.key"
    key_file.write_bytes(KEY)
    subprocess.run(["cryptsetup", "open", "--key-file", str(key_file),
                    f"/dev/mapper/{POOL}-vault", "rescued"], check=True)
    try:
        assert checksum("/dev/mapper/rescued", SIZE) == later
    finally:
        subprocess.run(["cryptsetup", "close", "rescued"], check=True)
        key_file.unlink()

    argv = wrapped.argv.read_bytes()
    assert b"luksFormat" in argv and b"open" in argv, argv
    time.sleep(1)  # the monitor's last messages
    places.update({
        "the bus": monitor.read_bytes(), "dmd's log": dmd.log.read_bytes(),
        "cryptsetup's arguments": argv,
        **{f"the database ({p.name})": p.read_bytes()
           for p in dmd.state_dir.rglob("*") if p.is_file()},
    })
    assert len(places["the bus"]) > 10_000, "the monitor saw the calls"
    assert_nowhere(places, KEY, SECOND, WRONG)


def test_an_open_cleartext_keeps_its_volume_unlocked(system_dmd: SystemDmd,
                                                      disks: list[str]) -> None:
    pool = create_pool(POOL, [disks[0]])
    volume, _ = create_encrypted(pool, "held")
    fd = os.open(f"/dev/mapper/{POOL}-held-crypt", os.O_RDONLY)
    try:
        assert lock(volume) == "org.example.DeviceMapper.Error.Busy"
        error, (job,) = fd_call(volume, VOLUME_INTERFACE, "Delete", "a{sv}", [{}])
        assert error is None  # the delete is a job: it fails, and changes nothing
        assert call(job, JOB_INTERFACE, "Wait", "d", "120") == [True]
        assert prop(job, JOB_INTERFACE, "ErrorName").endswith("Busy")
    finally:
        os.close(fd)
    assert not prop(volume, VOLUME_INTERFACE, "Locked")
    assert Path(f"/dev/mapper/{POOL}-held-crypt").exists()


def job_progress_at_least(job: str, fraction: float, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while prop(job, JOB_INTERFACE, "Progress") < fraction:
        assert time.monotonic() < deadline, "the job never got there"
        time.sleep(0.1)


def wait_for(check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def cryptsetup_running(command: str) -> bool:
    return subprocess.run(["pgrep", "-f", f"cryptsetup {command}"],
                          capture_output=True).returncode == 0


@pytest.mark.kernel_volumes_last  # the boots' balance: docs/kernel-lab.md
def test_kill_9_while_cryptsetup_runs(stopped_dmd: SystemDmd, disks: list[str]) -> None:
    """luksFormat and cryptsetup open take seconds (the PBKDF, on purpose):
    dmd is killed while each runs. The create is undone; the unlock leaves
    no cleartext device (cryptsetup dies with dmd, or start-up removes what
    it made for a volume recorded locked)."""
    dmd = stopped_dmd
    dmd.start()
    pool = create_pool(POOL, [disks[0]])
    slow = {"pbkdf-time-ms": Variant("u", 2000)}
    slowly, _ = create_encrypted(pool, "slowly", **slow)  # its keyslot: 2 s to open
    assert lock(slowly) is None
    create_encrypted(pool, "half", wait_for=False, **slow)
    wait_for(lambda: cryptsetup_running("luksFormat"))
    time.sleep(1)
    assert dmd.proc is not None
    dmd.proc.send_signal(signal.SIGKILL)
    dmd.wait_exit()
    wait_for(lambda: not cryptsetup_running("luksFormat"), 10)  # it died with dmd
    dmd.start()
    names = {prop(p, VOLUME_INTERFACE, "Name") for p in volume_paths()}
    assert names == {"slowly"}
    assert not [n for n in dmsetup("ls").split() if n.startswith(f"{POOL}-half")]
    assert unfinished(dmd.state_dir) == 0
    assert kernel_thin_ids(POOL) == recorded_thin_ids(dmd.state_dir)

    outcome: list[str | None] = []
    thread = threading.Thread(target=lambda: outcome.append(unlock(slowly, KEY)))
    thread.start()
    wait_for(lambda: cryptsetup_running("open"))
    time.sleep(1)
    dmd.proc.send_signal(signal.SIGKILL)
    dmd.wait_exit()
    thread.join(timeout=60)
    wait_for(lambda: not cryptsetup_running("open"), 10)
    dmd.start()
    # Recorded locked (the unlock never recorded its end), so shown locked,
    # and the kernel holds no cleartext device, so no key.
    assert prop(slowly, VOLUME_INTERFACE, "Locked")
    assert not Path(f"/dev/mapper/{POOL}-slowly-crypt").exists()
    assert f"{POOL}-slowly-crypt" not in dmsetup("ls")
    assert unlock(slowly, KEY) is None
    assert Path(f"/dev/mapper/{POOL}-slowly-crypt").exists()
    dmd.stop()
