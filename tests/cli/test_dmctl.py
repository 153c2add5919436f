"""dmctl against dmd --sim on a private bus, as a shell user would run it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dmd.cli.tables import TableSyntaxError, format_table, parse_table


def test_parse_table() -> None:
    text = "# comment\n0 100 linear /dev/loop0 0\n\n100 50 zero\n"
    assert parse_table(text) == [(0, 100, "linear", "/dev/loop0 0"), (100, 50, "zero", "")]
    assert format_table(parse_table(text)) == "0 100 linear /dev/loop0 0\n100 50 zero"


@pytest.mark.parametrize("bad", ["", "0 zero", "a 10 zero", "0 -5 zero", "# only\n"])
def test_parse_table_refuses(bad: str) -> None:
    with pytest.raises(TableSyntaxError):
        parse_table(bad)


def dmctl(dmd: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmd.cli.main", "--session", *args],
                          env=dmd.env, input=stdin, capture_output=True, text=True, timeout=60)


def ok(dmd: Any, *args: str, stdin: str | None = None) -> str:
    out = dmctl(dmd, *args, stdin=stdin)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_create_three_ways_and_read_back(dmd_session: Any, tmp_path: Path) -> None:
    ok(dmd_session, "create", "a", "--table", "0 100 zero", "-u", "UUID-A", "--label", "k=v")
    table_file = tmp_path / "t"
    table_file.write_text("0 50 zero\n50 50 error\n")
    ok(dmd_session, "create", "b", str(table_file), "--persistent")
    ok(dmd_session, "create", "c", stdin="0 8 zero\n")
    assert ok(dmd_session, "ls") == "a\t(253:0)\nb\t(253:1)\nc\t(253:2)\n"
    assert ok(dmd_session, "table", "b") == "0 50 zero\n50 50 error\n"
    info = ok(dmd_session, "info", "a")
    assert "Name:              a" in info and "UUID:              UUID-A" in info
    assert "State:             ACTIVE" in info and "Labels:            k=v" in info
    listed = json.loads(ok(dmd_session, "--json", "ls"))
    assert [d["name"] for d in listed] == ["a", "b", "c"]
    assert json.loads(ok(dmd_session, "--json", "table", "c")) == [[0, 8, "zero", ""]]
    assert json.loads(ok(dmd_session, "--json", "info", "b"))["Persistent"] is True
    assert ok(dmd_session, "status", "c") == "0 8 zero\n"
    assert ok(dmd_session, "deps", "c") == "0 dependencies\t: \n"


def test_change_verbs(dmd_session: Any) -> None:
    ok(dmd_session, "create", "a", "--table", "0 100 zero")
    ok(dmd_session, "suspend", "a", "--noflush")
    assert "SUSPENDED" in ok(dmd_session, "info", "a")
    ok(dmd_session, "resume", "a")
    ok(dmd_session, "reload", "a", "--table", "0 200 error")
    assert ok(dmd_session, "table", "a") == "0 200 error\n"
    ok(dmd_session, "rename", "a", "b")
    ok(dmd_session, "rename", "b", "--setuuid", "U-1")
    ok(dmd_session, "load", "b", "--table", "0 10 zero")
    assert "LIVE & INACTIVE" in ok(dmd_session, "info", "b")
    ok(dmd_session, "clear", "b")
    # dmd refuses a rename after a clear (the kernel bug in docs/kernel-lab.md).
    refused = dmctl(dmd_session, "rename", "b", "c")
    assert refused.returncode == 1 and "double free" in refused.stderr
    ok(dmd_session, "label", "b", "x=1", "y=2")
    doc = json.loads(ok(dmd_session, "--json", "info", "b"))
    assert (doc["Name"], doc["UUID"], doc["Labels"]) == ("b", "U-1", {"x": "1", "y": "2"})
    ok(dmd_session, "remove", "b")
    assert ok(dmd_session, "ls") == "No devices found\n"


def test_errors_are_one_line_and_exit_1(dmd_session: Any) -> None:
    missing = dmctl(dmd_session, "remove", "nosuch")
    assert missing.returncode == 1
    assert missing.stderr == "dmctl: remove nosuch: no device 'nosuch' (NotFound)\n"
    bad = dmctl(dmd_session, "create", "x", "--table", "0 zero")
    assert bad.returncode == 1 and "table line 1" in bad.stderr
    kernel = dmctl(dmd_session, "create", "x", "--table", "0 8 nosuchtarget")
    assert kernel.returncode == 1 and kernel.stderr.endswith("(Kernel)\n"), kernel.stderr
    ok(dmd_session, "create", "x", "--table", "0 8 zero")
    msg = dmctl(dmd_session, "message", "x", "0", "hello")
    assert msg.returncode == 1 and "EINVAL" in msg.stderr
    assert ok(dmd_session, "ls") == "x\t(253:0)\n"
    usage = dmctl(dmd_session, "frobnicate")
    assert usage.returncode == 2


def test_targets_version_remove_all(dmd_session: Any) -> None:
    targets = json.loads(ok(dmd_session, "--json", "targets"))
    assert {"linear", "zero", "error"} <= set(targets)
    version = json.loads(ok(dmd_session, "--json", "version"))
    assert version["driver"].count(".") == 2 and version["dmd"]
    ok(dmd_session, "create", "a", "--table", "0 8 zero")
    ok(dmd_session, "create", "b", "--table", "0 8 zero")
    assert ok(dmd_session, "remove-all-managed") == "a\nb\n"


def test_not_running_is_said_clearly(private_bus: Any) -> None:
    out = subprocess.run([sys.executable, "-m", "dmd.cli.main", "--session", "ls"],
                         env=private_bus.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "dmd is not running on the session bus" in out.stderr


def test_monitor_prints_signals(dmd_session: Any) -> None:
    monitor = subprocess.Popen(
        [sys.executable, "-m", "dmd.cli.main", "--session", "--json", "monitor"],
        env=dmd_session.env, stdout=subprocess.PIPE, text=True)
    try:
        import time
        time.sleep(1.0)  # let it subscribe
        ok(dmd_session, "create", "m", "--table", "0 8 zero")
        ok(dmd_session, "remove", "m")
        assert monitor.stdout is not None
        seen = [json.loads(monitor.stdout.readline())["signal"] for _ in range(2)]
        assert seen == ["InterfacesAdded", "InterfacesRemoved"]
    finally:
        monitor.terminate()
        monitor.wait(timeout=10)


def test_pool_and_volume_verbs(dmd_session: Any) -> None:
    from dmd.cli.volumes import parse_size
    from dmd.engine.sim import SimDM

    SimDM(dmd_session.sim).add_disk("/dev/simdisk1", 7, 1, 1024 * 2048)
    assert "tank: " in ok(dmd_session, "pool-create", "tank", "/dev/simdisk1")
    assert ok(dmd_session, "vol-create", "tank", "vm1", "20G", "--label", "app=vm") == \
        "/dev/mapper/tank-vm1\n"
    assert ok(dmd_session, "snapshot", "tank", "vm1", "vm1.snap", "--inactive") == \
        "tank/vm1.snap (inactive)\n"
    assert ok(dmd_session, "resize", "tank", "vm1", "30G") == "30.0G\n"
    listed = json.loads(ok(dmd_session, "--json", "vols", "tank"))
    assert [(v["Name"], v["State"], v["Size"]) for v in listed] == [
        ("vm1", "active", 30 << 30), ("vm1.snap", "inactive", 20 << 30)]
    assert "tank\tactive\tok\t" in ok(dmd_session, "pools")
    # What `vols` prints (POOL/VOLUME) is what every volume verb takes.
    ok(dmd_session, "activate", "tank/vm1.snap")
    ok(dmd_session, "deactivate", "--no-wait", "tank/vm1.snap")
    ok(dmd_session, "activate", "tank", "vm1.snap")
    # Names with "-", as people use them: the device doubles it, as LVM does.
    assert ok(dmd_session, "vol-create", "tank", "web-data", "1G") == \
        "/dev/mapper/tank-web--data\n"
    ok(dmd_session, "vol-delete", "tank/web-data")
    ok(dmd_session, "vol-delete", "tank", "vm1")
    assert [v["Name"] for v in json.loads(ok(dmd_session, "--json", "vols"))] == ["vm1.snap"]
    refused = dmctl(dmd_session, "pool-destroy", "tank")
    assert refused.returncode == 1 and "(Busy)" in refused.stderr
    missing = dmctl(dmd_session, "vol-delete", "tank", "nosuch")
    assert missing.returncode == 1 and "(NotFound)" in missing.stderr
    assert ok(dmd_session, "vol-create", "tank", "home", "64M", "--filesystem", "ext4") == \
        "/dev/mapper/tank-home\n"
    node = SimDM(dmd_session.sim).open_node("tank-home", os.O_RDONLY)
    try:
        found = subprocess.run(["blkid", "-p", "-o", "export", f"/dev/fd/{node}"],
                               pass_fds=(node,), capture_output=True, text=True).stdout
    finally:
        os.close(node)
    assert "TYPE=ext4" in found and "LABEL=home" in found, found
    ok(dmd_session, "snapshot", "tank", "home", "home.1")
    assert ok(dmd_session, "resize", "tank", "home", "96M", "--filesystem") == "96.0M\n"
    node = SimDM(dmd_session.sim).open_node("tank-home", os.O_RDONLY)
    try:
        found = subprocess.run(["dumpe2fs", "-h", f"/dev/fd/{node}"], pass_fds=(node,),
                               capture_output=True, text=True).stdout
    finally:
        os.close(node)
    count, size = (int(re.search(rf"^Block {what}:\s+(\d+)$", found, re.MULTILINE)[1])
                   for what in ("count", "size"))  # type: ignore[index]
    assert count * size == 96 << 20, found
    assert ok(dmd_session, "revert", "tank", "home.1") == "home: reverted\n"
    listed = {v["Name"]: v for v in json.loads(ok(dmd_session, "--json", "vols", "tank"))}
    assert listed["home"]["Size"] == 64 << 20 and not listed["home"]["RevertScheduled"]
    disks = ok(dmd_session, "disks").splitlines()
    assert "/dev/simdisk1\t1.0G\tdmd_pool\ta device of pool tank" in disks, disks
    assert ok(dmd_session, "pool-stop", "tank") == "tank: stopped\n"
    stopped = dmctl(dmd_session, "vol-create", "tank", "late", "1M")
    assert stopped.returncode == 1 and "is stopped: Start it first" in stopped.stderr
    assert ok(dmd_session, "pool-rename", "tank", "tank2") == "tank2\n"
    assert ok(dmd_session, "pool-rename", "tank2", "tank") == "tank\n"
    SimDM(dmd_session.sim).damage_metadata("/dev/simdisk1", 4 << 20, superblock=True)
    damaged = dmctl(dmd_session, "pool-start", "tank")
    assert damaged.returncode == 1 and "metadata is damaged" in damaged.stderr
    assert ok(dmd_session, "pool-repair", "tank", "--device", "/dev/simdisk1") == \
        "tank: stopped\n"
    assert ok(dmd_session, "pool-start", "tank", "--device", "/dev/simdisk1") == \
        "tank: active\n"
    bad = dmctl(dmd_session, "vol-create", "tank", "v", "lots")
    assert bad.returncode == 2 and "not a size" in bad.stderr
    job = ok(dmd_session, "pool-destroy", "tank", "--force", "--no-wait").strip()
    assert job.startswith("/org/example/DeviceMapper/jobs/")
    assert parse_size("1GB") == 10 ** 9 and parse_size("2KiB") == 2048


def test_encrypted_and_thick_volumes(dmd_session: Any, tmp_path: Path) -> None:
    from dmd.engine.sim import SimDM

    SimDM(dmd_session.sim).add_disk("/dev/simdisk1", 7, 1, 1024 * 2048)
    ok(dmd_session, "pool-create", "tank", "/dev/simdisk1", "--data-size", "64M")
    key, other = tmp_path / "key", tmp_path / "other"
    key.write_bytes(b"a key of the admin's")
    other.write_bytes(b"another key of theirs")
    cheap = ("--pbkdf-memory", "32", "--pbkdf-iterations", "4")
    assert ok(dmd_session, "vol-create", "tank", "vault", "64M", "--key-file", str(key),
              *cheap) == "/dev/mapper/tank-vault-crypt\n"
    ok(dmd_session, "lock", "tank", "vault")
    assert ok(dmd_session, "vols", "tank").rstrip().endswith("\tlocked")
    wrong = dmctl(dmd_session, "unlock", "tank", "vault", "--key-file", str(other))
    assert wrong.returncode == 1 and "(WrongKey)" in wrong.stderr
    assert ok(dmd_session, "unlock", "tank", "vault", "--key-file", "-",
              stdin="a key of the admin's") == "/dev/mapper/tank-vault-crypt\n"
    ok(dmd_session, "add-key", "tank", "vault", "--key-file", str(key), "--new-key-file",
       str(other))
    ok(dmd_session, "remove-key", "tank", "vault", "--key-file", str(key))
    ok(dmd_session, "lock", "tank", "vault")
    assert ok(dmd_session, "unlock", "tank", "vault", "--key-file", str(other)) == \
        "/dev/mapper/tank-vault-crypt\n"
    assert ok(dmd_session, "vol-create", "tank", "db", "32M", "--thick") == \
        "/dev/mapper/tank-db\n"
    listed = {v["Name"]: v for v in json.loads(ok(dmd_session, "--json", "vols", "tank"))}
    assert (listed["db"]["Thin"], listed["vault"]["Encryption"]) == (False, "luks2")
    ok(dmd_session, "vol-label", "tank/db", "role=database", "tier=")
    listed = {v["Name"]: v for v in json.loads(ok(dmd_session, "--json", "vols", "tank"))}
    assert listed["db"]["Labels"] == {"role": "database", "tier": ""}
    bad = dmctl(dmd_session, "vol-label", "tank", "db", "=nameless")
    assert bad.returncode != 0
    ok(dmd_session, "vol-label", "tank", "db")
    listed = {v["Name"]: v for v in json.loads(ok(dmd_session, "--json", "vols", "tank"))}
    assert listed["db"]["Labels"] == {}
    assert ok(dmd_session, "vol-rename", "tank", "db", "pg") == "/dev/mapper/tank-pg\n"
    unlocked = dmctl(dmd_session, "vol-rename", "tank", "vault", "safe")
    assert unlocked.returncode == 1 and "Lock it to rename it" in unlocked.stderr
    ok(dmd_session, "lock", "tank", "vault")
    ok(dmd_session, "vol-rename", "tank/vault", "safe")
    assert ok(dmd_session, "unlock", "tank", "safe", "--key-file", str(other)) == \
        "/dev/mapper/tank-safe-crypt\n"


def test_cache_verbs(dmd_session: Any) -> None:
    from dmd.engine.sim import SimDM

    sim = SimDM(dmd_session.sim)
    sim.add_disk("/dev/simdisk1", 7, 1, 1024 * 2048)
    sim.add_disk("/dev/simfast", 7, 2, 256 * 2048)
    ok(dmd_session, "pool-create", "tank", "/dev/simdisk1")
    ok(dmd_session, "vol-create", "tank", "v", "1G")
    assert ok(dmd_session, "cache-attach", "tank", "v", "/dev/simfast") == \
        "writeback cache on /dev/simfast\n"
    busy = dmctl(dmd_session, "vol-delete", "tank", "v")
    assert busy.returncode == 1 and "(Busy)" in busy.stderr
    assert ok(dmd_session, "cache-detach", "tank", "v") == "/dev/mapper/tank-v\n"
