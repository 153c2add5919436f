"""A real reboot of the lab: every volume comes back with its data.

Two phases, two kernels. lab/run runs ``test_before_the_reboot`` in the
volumes boot (last there) and ``test_after_the_reboot`` in the next boot:

- before: dmd makes a pool on one disk, grows it over a second with
  AddDevice, makes volumes and a snapshot, writes data, deactivates one
  volume, and stops as at a shutdown (SIGTERM), leaving its devices up. The
  disks are image files in the project's results directory (the guest's
  tmpfs dies with the kernel) and dmd's state directory is kept beside them;
- after: a fresh kernel with no device-mapper devices; the disks come back
  under the same names (as a machine's disks do; a pool found on other
  device numbers is the on-disk description's work); dmd starts and brings
  the pool and its active volumes up with their data, the deactivated one
  stays down until asked, and the pool's thin ids and transaction id are as
  recorded;
- a volume renamed (and labelled) before the reboot comes back under its
  new name, with its data and labels;
- a revert scheduled while its origin was open is applied as dmd starts
  after the reboot: the origin reads its snapshot's data, its old thin id
  is gone;
- encrypted volumes: "sealed", whose key is a description in root's
  keyring, waits locked (and says for what) until the key is put there,
  then opens by itself with its data; "manual", whose key came as a
  descriptor, waits for an Unlock with it.

The after phase fails, never skips, when the before phase did not run, or
ran in this same boot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from dbus_fast import Variant
from lab_daemon import PROJECT, SystemDmd, dmsetup
from test_encrypted_volumes_lab import FAST, KEY, create_encrypted, fd_call, unlock
from test_pools_lab import (
    MIB,
    POOL_INTERFACE,
    VOLUME_INTERFACE,
    call,
    checksum,
    create_pool,
    create_volume,
    kernel_thin_ids,
    prop,
    recorded_thin_ids,
    snapshot,
    volume_paths,
    wait,
    write_pattern,
)

from dmd.engine import keyring

pytestmark = [pytest.mark.kernel]

KEPT = PROJECT / ".lab-results" / "reboot"
POOL = "dmdrb"  # not a name the lab's clean-up removes: it outlives its test
SIZE = 8 * MIB
SEALED_KEY = "dmd-lab:sealed"  # the description of its key in root's keyring


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def attach(image: Path, device: str | None = None) -> str:
    command = ["losetup", "--show"] + ([device, str(image)] if device else ["-f", str(image)])
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.kernel_volumes
def test_before_the_reboot(stopped_dmd: SystemDmd, tmp_path: Path) -> None:
    shutil.rmtree(KEPT, ignore_errors=True)
    KEPT.mkdir(parents=True)
    disks = {}
    for name in ("disk0.img", "disk1.img"):
        with open(KEPT / name, "wb") as image:
            image.truncate(128 * MIB)
        disks[name] = attach(KEPT / name)
    dmd = stopped_dmd
    dmd.start()
    pool = create_pool(POOL, [disks["disk0.img"]])
    small = prop(pool, POOL_INTERFACE, "DataTotal")
    (job,) = call(pool, POOL_INTERFACE, "AddDevice", "sa{sv}", disks["disk1.img"], "0")
    wait(job)  # the pool grows over a second device before the data goes in
    assert prop(pool, POOL_INTERFACE, "DataTotal") > small
    one = create_volume(pool, "one", 32 * MIB)
    two = create_volume(pool, "two", 32 * MIB)
    sums = {name: write_pattern(f"/dev/mapper/{POOL}-{name}", name.encode(), SIZE)
            for name in ("one", "two")}
    _, job = snapshot(one, "one.snap")
    wait(job)
    sums["one.snap"] = sums["one"]
    sums["one"] = write_pattern(f"/dev/mapper/{POOL}-one", b"one, later", SIZE)
    (job,) = call(two, VOLUME_INTERFACE, "Deactivate", "a{sv}", "0")
    wait(job)
    assert prop(two, VOLUME_INTERFACE, "State") == "inactive"
    # A volume renamed while it holds data, and labelled after its creation.
    old = create_volume(pool, "old", 32 * MIB)
    written = write_pattern(f"/dev/mapper/{POOL}-old", b"renamed", SIZE)
    call(old, VOLUME_INTERFACE, "Rename", "sa{sv}", "renamed", "0")
    call(old, VOLUME_INTERFACE, "SetLabels", "a{ss}a{sv}", "1", "role", "db", "0")
    assert not Path(f"/dev/mapper/{POOL}-old").exists()
    sums["renamed"] = checksum(f"/dev/mapper/{POOL}-renamed", SIZE)
    assert sums["renamed"] == written
    # A revert scheduled while its origin is open (a mount, say).
    rev = create_volume(pool, "rev", 32 * MIB)
    sums["rev"] = write_pattern(f"/dev/mapper/{POOL}-rev", b"rev, then", SIZE)
    rev_snap, job = snapshot(rev, "rev.1")
    wait(job)
    write_pattern(f"/dev/mapper/{POOL}-rev", b"rev, later", SIZE)
    subprocess.run(["udevadm", "settle", "--timeout=30"], check=False)
    rev_old = int(dmsetup("table", f"{POOL}-rev").split()[-1])
    holder = os.open(f"/dev/mapper/{POOL}-rev", os.O_RDONLY)
    try:
        (job,) = call(rev_snap, VOLUME_INTERFACE, "Revert", "a{sv}", "0")
        wait(job)
    finally:
        os.close(holder)
    assert prop(rev, VOLUME_INTERFACE, "RevertScheduled") is True
    serial = keyring.add_user_key(SEALED_KEY, KEY)
    error, (_, job) = fd_call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", [
        "sealed", 32 * MIB, {"encryption": Variant("s", "luks2"),
                             "key-description": Variant("s", SEALED_KEY), **FAST}])
    assert error is None
    wait(job)
    keyring.unlink_key(serial)
    create_encrypted(pool, "manual")
    for name in ("sealed", "manual"):
        sums[name] = write_pattern(f"/dev/mapper/{POOL}-{name}-crypt", name.encode(), SIZE)
    record = {"boot_id": boot_id(), "disks": disks, "sums": sums, "pool": pool,
              "transaction_id": prop(pool, POOL_INTERFACE, "TransactionId"),
              "thin_ids": sorted(kernel_thin_ids(POOL)), "rev_old": rev_old}
    subprocess.run(["udevadm", "settle", "--timeout=30"], check=False)
    dmd.stop()  # as at a shutdown; the devices stay up until the kernel goes
    shutil.copytree(dmd.state_dir, KEPT / "state")
    (KEPT / "before.json").write_text(json.dumps(record))


@pytest.mark.kernel_after_reboot
def test_after_the_reboot(stopped_dmd: SystemDmd) -> None:
    kept = KEPT / "before.json"
    assert kept.exists(), \
        "no pool from before the reboot: lab/run runs test_before_the_reboot in the boot before"
    record = json.loads(kept.read_text())
    assert record["boot_id"] != boot_id(), \
        "the two phases ran in one boot: lab/run runs them in two (lab/run --suite volumes)"
    assert not [line for line in dmsetup("ls").splitlines() if line.startswith(POOL)]
    for name, device in record["disks"].items():
        assert attach(KEPT / name, device) == device
    try:
        dmd = stopped_dmd
        shutil.copytree(KEPT / "state", dmd.state_dir)
        dmd.start()
        pool = record["pool"]
        for name in ("one", "one.snap"):
            assert checksum(f"/dev/mapper/{POOL}-{name}", SIZE) == record["sums"][name], name
        assert not Path(f"/dev/mapper/{POOL}-two").exists()  # it was down: it stays down
        # The scheduled revert, applied at the start: one transaction, the
        # origin's old thin id deleted (its copy was among the thin ids already).
        assert prop(pool, POOL_INTERFACE, "TransactionId") == record["transaction_id"] + 1
        assert record["rev_old"] in record["thin_ids"]
        assert sorted(kernel_thin_ids(POOL)) == \
            [t for t in record["thin_ids"] if t != record["rev_old"]] == \
            sorted(recorded_thin_ids(dmd.state_dir))
        volumes = {prop(path, VOLUME_INTERFACE, "Name"): path for path in volume_paths()}
        assert sorted(volumes) == ["manual", "one", "one.snap", "renamed", "rev", "rev.1",
                                   "sealed", "two"]
        assert checksum(f"/dev/mapper/{POOL}-rev", SIZE) == record["sums"]["rev"]
        assert checksum(f"/dev/mapper/{POOL}-rev.1", SIZE) == record["sums"]["rev"]
        assert prop(volumes["rev"], VOLUME_INTERFACE, "RevertScheduled") is False
        assert checksum(f"/dev/mapper/{POOL}-renamed", SIZE) == record["sums"]["renamed"]
        assert not Path(f"/dev/mapper/{POOL}-old").exists()
        assert prop(volumes["renamed"], VOLUME_INTERFACE, "Labels") == {"role": "db"}
        sealed, manual = volumes["sealed"], volumes["manual"]
        assert prop(sealed, VOLUME_INTERFACE, "Locked")
        assert prop(sealed, VOLUME_INTERFACE, "LockedReason") == \
            f"waiting for key {SEALED_KEY!r} in the keyring"
        assert prop(manual, VOLUME_INTERFACE, "LockedReason") == \
            "waiting for a key: Unlock with one"
        serial = keyring.add_user_key(SEALED_KEY, KEY)
        try:
            deadline = time.monotonic() + 60
            while prop(sealed, VOLUME_INTERFACE, "Locked"):
                assert time.monotonic() < deadline, "the key came and the volume stayed locked"
                time.sleep(0.2)
        finally:
            keyring.unlink_key(serial)
        assert checksum(f"/dev/mapper/{POOL}-sealed-crypt", SIZE) == record["sums"]["sealed"]
        assert prop(manual, VOLUME_INTERFACE, "Locked")
        assert unlock(manual, KEY) is None
        assert checksum(f"/dev/mapper/{POOL}-manual-crypt", SIZE) == record["sums"]["manual"]
        assert prop(volumes["two"], VOLUME_INTERFACE, "State") == "inactive"
        (job,) = call(volumes["two"], VOLUME_INTERFACE, "Activate", "a{sv}", "0")
        wait(job)
        assert checksum(f"/dev/mapper/{POOL}-two", SIZE) == record["sums"]["two"]
        dmd.stop()
    finally:
        for name in ("sealed-crypt", "manual-crypt", "sealed", "manual", "one.snap", "one",
                     "two", "renamed", "rev", "rev.1", "tpool", "tdata", "tmeta"):
            subprocess.run(["dmsetup", "remove", f"{POOL}-{name}"], capture_output=True)
        for device in record["disks"].values():
            subprocess.run(["losetup", "-d", device], check=False)
