"""Host-side unit tests of the engine: validation, key handling, errors, the sim file."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import pytest

from dmd.engine import (
    DM,
    DevId,
    DmError,
    DmFlags,
    InvalidArgument,
    TargetLine,
    carries_key,
    validate_name,
    validate_table,
)
from dmd.engine.sim import SimDM
from dmd.engine.types import dev_t, major_minor
from dmd.engine.udevsync import DEFAULT_UDEV_FLAGS, NodeWatcher, UdevSync, cookie

KEY = "0123456789abcdef" * 4


@pytest.mark.parametrize("name,rule", [
    ("", "empty"), ("a" * 128, "at most 127"), ("a/b", "contains '/'"),
    ("control", "reserved"), (".", "reserved"), ("..", "reserved"),
    ("a b", "contains ' '"), ("é", "contains 'é'"),
])
def test_bad_names_say_which_rule(name: str, rule: str) -> None:
    with pytest.raises(InvalidArgument, match=rule):
        validate_name(name)


def test_longest_names_are_fine() -> None:
    assert validate_name("a" * 127) == "a" * 127
    assert DevId.uuid("U" * 128).value == "U" * 128
    with pytest.raises(InvalidArgument, match="at most 128"):
        DevId.uuid("U" * 129)
    assert validate_name("LVM-vg_lv#+-.:=@_9") == "LVM-vg_lv#+-.:=@_9"


def test_tuples_are_tables() -> None:
    assert validate_table([(0, 8, "zero", "")]) == [TargetLine(0, 8, "zero", "")]


@pytest.mark.parametrize("table,rule", [
    ([(1, 8, "zero", "")], "start at sector 0"),
    ([(0, 8, "zero", ""), (16, 8, "zero", "")], "previous line ends at 8"),
    ([(0, 0, "zero", "")], "must not be zero"),
    ([(0, -1, "zero", "")], "out of range"),
    ([(0, 1 << 64, "zero", "")], "out of range"),
    ([(0, (1 << 64) - 1, "zero", "")], "largest device"),
    ([(0, 8, "zero", ""), (8, (1 << 54) - 8, "zero", "")],
     "line 1 ends at sector 18014398509481984"),
    ([(0, True, "zero", "")], "integer"),
    ([(0, 8, "zero", "a\0b")], "NUL"),
    ([(0, 8, "x" * 16, "")], "not a valid target"),
    ([], "at least one line"),
    (["0 8 zero"], "must be"),
])
def test_bad_tables_say_which_rule(table: list[object], rule: str) -> None:
    with pytest.raises(InvalidArgument, match=rule):
        validate_table(table)  # type: ignore[arg-type]


def test_key_bearing_tables() -> None:
    assert carries_key([TargetLine(0, 8, "crypt", f"aes-xts-plain64 {KEY} 0 7:0 0")])
    assert carries_key([TargetLine(0, 8, "integrity",
                                   f"7:0 0 32 J 1 internal_hash:hmac(sha256):{KEY}")])
    assert not carries_key([TargetLine(0, 8, "integrity", "7:0 0 32 J 1 internal_hash:crc32c")])
    assert not carries_key([TargetLine(0, 8, "linear", "7:0 0")])


def test_dm_error_names_errno_command_device_and_pickles() -> None:
    err = DmError(errno.EBUSY, "DM_DEV_REMOVE", "vol")
    assert isinstance(err, OSError)
    assert (err.errno, err.command, err.device) == (errno.EBUSY, "DM_DEV_REMOVE", "vol")
    assert "EBUSY" in str(err) and "vol" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert (again.errno, again.command, again.device) == (errno.EBUSY, "DM_DEV_REMOVE", "vol")


def test_dev_t_encoding_round_trips() -> None:
    for major, minor in [(253, 0), (253, 255), (253, 256), (7, 1048575), (4095, 12)]:
        assert major_minor(dev_t(major, minor)) == (major, minor)


def test_udev_cookie_carries_primary_source_flag_and_no_semaphore() -> None:
    value = cookie()
    assert value & 0xFFFF == 0
    assert (value >> 16) & 0x0040
    assert value >> 16 == int(DEFAULT_UDEV_FLAGS)


def test_opening_a_missing_control_node_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DmError) as caught:
        DM(str(tmp_path / "control"))
    assert caught.value.errno == errno.ENOENT
    assert "control" in str(caught.value)


def test_sim_file_survives_restart_and_reboot(tmp_path: Path) -> None:
    path = tmp_path / "kernel.json"
    first = SimDM(path)
    first.device_create("keep", "UUID-keep")
    first.table_load("keep", [TargetLine(0, 8, "zero", "")], DmFlags.DM_READONLY)
    first.device_suspend("keep", DmFlags(0))
    second = SimDM(path)
    info = second.device_info("keep")
    assert info.uuid == "UUID-keep" and info.read_only and info.active_present
    second.device_create("other")
    assert {d.name for d in first.list_devices()} == {"keep", "other"}
    path.unlink()  # a reboot: the kernel forgets everything
    assert SimDM(path).list_devices() == []


def test_sim_wait_wakes_on_event() -> None:
    import threading

    sim = SimDM()
    sim.device_create("w")
    seen: list[int] = []
    waiter = threading.Thread(target=lambda: seen.append(sim.device_wait("w")[0].event_nr))
    waiter.start()
    sim.trigger_event("w")
    waiter.join(5)
    assert seen == [1]


def test_node_watcher_makes_and_drops_nodes_without_udev(tmp_path: Path) -> None:
    if not hasattr(__import__("os"), "mknod"):
        pytest.fail("os.mknod missing")
    import os

    if os.geteuid() != 0:
        pytest.fail("the test suite runs as root (block nodes need CAP_MKNOD)")
    nodes = NodeWatcher(UdevSync.NODES, tmp_path)
    nodes.appeared("vol", (253, 7))
    st = os.stat(tmp_path / "mapper" / "vol")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (253, 7)
    nodes.renamed("vol", "vol2", (253, 7))
    assert not (tmp_path / "mapper" / "vol").exists()
    nodes.disappeared("vol2", (253, 7))
    assert not (tmp_path / "mapper" / "vol2").exists()


def test_udev_monitor_messages_are_decoded() -> None:
    import socket
    import struct

    from dmd.engine.udevsync import parse_udev_message

    props = b"ACTION=change\0MAJOR=254\0MINOR=3\0DM_NAME=vol\0DM_COOKIE=6291456\0"
    header = struct.pack("=8sIIIIIIII", b"libudev\0", socket.htonl(0xFEEDCAFE), 40, 40,
                         len(props), 0, 0, 0, 0)
    assert parse_udev_message(header + props) == {
        "ACTION": "change", "MAJOR": "254", "MINOR": "3", "DM_NAME": "vol",
        "DM_COOKIE": "6291456"}
    assert parse_udev_message(b"add@/devices/virtual/block/dm-3\0ACTION=add\0") is None


def test_sim_file_appends_what_changed_and_compacts(tmp_path: Path) -> None:
    path = tmp_path / "kernel.json"
    sim = SimDM(path)
    for i in range(300):
        sim.device_create(f"d{i:04d}")
    before = path.stat().st_size
    sim.device_create("one-more")
    grown = path.stat().st_size - before
    assert 0 < grown < 400, grown  # one device's line, not the 300 others
    other = SimDM(path)
    assert len(other.list_devices()) == 301
    # Enough changes to outgrow the kernel: the file becomes one snapshot again.
    for _ in range(700):
        sim.open_device("one-more", 1)
    inode = path.stat().st_ino
    for _ in range(700):
        sim.open_device("one-more", 1)
    assert path.stat().st_ino != inode  # replaced by a snapshot
    assert len(path.read_text().splitlines()) < 700
    # The other process follows both the appends and the replacement.
    assert other.device_info("one-more").open_count == 1400
    other.device_remove("d0000")
    assert "d0000" not in {d.name for d in sim.list_devices()}


def test_sim_file_survives_a_writer_killed_mid_line(tmp_path: Path) -> None:
    path = tmp_path / "kernel.json"
    sim = SimDM(path)
    sim.device_create("kept")
    sim.device_create("second")
    with path.open("ab") as f:
        f.write(b'{"dev": "torn", "v": {"na')  # a writer died here
    reader = SimDM(path)
    assert {d.name for d in reader.list_devices()} == {"kept", "second"}
    reader.device_create("after")
    fresh = SimDM(path)
    assert {d.name for d in fresh.list_devices()} == {"kept", "second", "after"}
    assert all(line.startswith("{") and line.endswith("}")
               for line in path.read_text().splitlines())


def test_sim_lowest_free_minor_like_the_kernel() -> None:
    sim = SimDM()
    minors = {n: sim.device_create(n).device[1] for n in ("a", "b", "c", "d")}
    assert list(minors.values()) == [0, 1, 2, 3]
    sim.device_remove("b")
    sim.device_remove("c")
    assert sim.device_create("e").device[1] == 1
    sim.device_create("p", flags=DmFlags.DM_PERSISTENT_DEV, device=(253, 20))
    sim.device_remove("p")
    assert sim.device_create("f").device[1] == 2  # not 20: the lowest free
    assert sim.device_create("g").device[1] == 4
