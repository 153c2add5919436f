"""dmsetup as the independent witness of what the engine does in the kernel.

Devices made by the engine must read back identically through dmsetup, and
devices made by dmsetup must be listed and read correctly by the engine.
udev runs in the lab, so these tests also check what udev makes of our devices.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dmd.engine import DM, DevId, DmFlags, TargetLine
from tests.helpers import dmsetup

pytestmark = pytest.mark.kernel
P = "dmdtest-"



def dmsetup_info(name: str) -> dict[str, str]:
    out = dmsetup("info", "-c", "--noheadings", "--separator", "|", "-o",
                  "name,uuid,major,minor,attr,open,segments,events", name)
    keys = ["name", "uuid", "major", "minor", "attr", "open", "segments", "events"]
    return dict(zip(keys, out.strip().split("|"), strict=True))


def test_engine_device_reads_back_identically(clean_dm: DM,
                                              loop_device: Callable[[int], str]) -> None:
    loop = loop_device(16)
    table = [TargetLine(0, 4096, "linear", f"{loop} 0"),
             TargetLine(4096, 2048, "zero", ""),
             TargetLine(6144, 1024, "error", "")]
    clean_dm.device_create(P + "w", "DMDTEST-witness")
    clean_dm.table_load(P + "w", table)
    info = clean_dm.device_suspend(P + "w", DmFlags(0))
    st = os.stat(loop)
    expected = (f"0 4096 linear {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} 0\n"
                "4096 2048 zero \n6144 1024 error \n")
    assert dmsetup("table", P + "w") == expected
    _, ours = clean_dm.table_status(P + "w", DmFlags.DM_STATUS_TABLE)
    assert "".join(f"{t.start} {t.length} {t.target_type} {t.params}\n" for t in ours) == expected
    witnessed = dmsetup_info(P + "w")
    assert witnessed["uuid"] == "DMDTEST-witness"
    assert (int(witnessed["major"]), int(witnessed["minor"])) == info.device
    assert witnessed["attr"].startswith("L-") and witnessed["segments"] == "3"
    assert int(witnessed["events"]) == info.event_nr
    _, status = clean_dm.table_status(P + "w")
    assert dmsetup("status", P + "w") == "".join(
        f"{t.start} {t.length} {t.target_type} {t.params}\n" for t in status)


def test_udev_treats_engine_devices_like_dmsetup_ones(clean_dm: DM) -> None:
    """Our cookie flags make udev run its disk rules: by-id links appear."""
    clean_dm.device_create(P + "u", "DMDTEST-udev")
    clean_dm.table_load(P + "u", [TargetLine(0, 2048, "zero", "")])
    info = clean_dm.device_suspend(P + "u", DmFlags(0))  # waits for udev
    node = Path("/dev/mapper") / (P + "u")
    st = os.stat(node)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == info.device
    by_name = Path("/dev/disk/by-id") / f"dm-name-{P}u"
    subprocess.run(["udevadm", "settle"], check=True)
    assert by_name.exists(), "udev skipped its disk rules: wrong udev flags in event_nr"
    db = Path(f"/run/udev/data/b{info.device[0]}:{info.device[1]}").read_text()
    assert "DM_UDEV_DISABLE_DISK_RULES_FLAG=1" not in db
    clean_dm.device_rename(P + "u", DevId.name(P + "u2"))  # waits for udev
    assert (Path("/dev/mapper") / (P + "u2")).exists() and not node.exists()
    clean_dm.device_remove(P + "u2")  # waits for udev
    assert not (Path("/dev/mapper") / (P + "u2")).exists()
    assert not Path(f"/run/udev/data/b{info.device[0]}:{info.device[1]}").exists()


def test_dmsetup_devices_are_listed_and_read(clean_dm: DM) -> None:
    dmsetup("create", P + "d", "-u", "DMDTEST-by-dmsetup", "--table",
            "0 2048 zero\n2048 2048 error")
    dmsetup("create", P + "e", "--notable")
    listed = {d.name: d for d in clean_dm.list_devices()}
    assert listed[P + "d"].uuid == "DMDTEST-by-dmsetup"
    assert listed[P + "e"].uuid == ""
    info, table = clean_dm.table_status(P + "d", DmFlags.DM_STATUS_TABLE)
    assert table == [TargetLine(0, 2048, "zero", ""), TargetLine(2048, 2048, "error", "")]
    assert info.active_present and not info.suspended
    assert not clean_dm.device_info(P + "e").active_present
    dmsetup("suspend", P + "d")
    assert clean_dm.device_info(DevId.uuid("DMDTEST-by-dmsetup")).suspended
    dmsetup("resume", P + "d")
    dmsetup("rename", P + "d", P + "d2")
    assert clean_dm.device_info(DevId.uuid("DMDTEST-by-dmsetup")).name == P + "d2"


def test_engine_and_dmsetup_agree_on_versions_and_targets(clean_dm: DM) -> None:
    out = dmsetup("version")
    driver = next(line for line in out.splitlines() if line.startswith("Driver version"))
    assert driver.split(":")[1].strip() == ".".join(map(str, clean_dm.version()))
    theirs = {}
    for line in dmsetup("targets").splitlines():
        name, version = line.split()
        theirs[name] = tuple(int(x) for x in version.lstrip("v").split("."))
    ours = {t.name: t.version for t in clean_dm.list_versions()}
    assert ours == theirs
    assert clean_dm.get_target_version("zero") == theirs["zero"]


def test_dependencies_match_dmsetup_deps(clean_dm: DM,
                                         loop_device: Callable[[int], str]) -> None:
    a, b = loop_device(8), loop_device(8)
    clean_dm.device_create(P + "s")
    clean_dm.table_load(P + "s", [TargetLine(0, 16384, "striped", f"2 64 {a} 0 {b} 0")])
    clean_dm.device_suspend(P + "s", DmFlags(0))
    out = dmsetup("deps", "-o", "devno", P + "s")  # " 2 dependencies  : (7, 1) (7, 0)"
    theirs = sorted((int(a), int(b)) for a, b in re.findall(r"\((\d+), (\d+)\)", out))
    assert len(theirs) == 2
    assert sorted(clean_dm.table_deps(P + "s")) == theirs


def test_message_with_output(clean_dm: DM) -> None:
    """@stats_list is answered by dm core for any device: exercises DM_DATA_OUT."""
    clean_dm.device_create(P + "m")
    clean_dm.table_load(P + "m", [TargetLine(0, 2048, "zero", "")])
    clean_dm.device_suspend(P + "m", DmFlags(0))
    _, out = clean_dm.target_msg(P + "m", 0, "@stats_create - /1")
    assert out is not None and out.strip() == "0"
    _, listing = clean_dm.target_msg(P + "m", 0, "@stats_list")
    assert listing is not None and listing.startswith("0: 0+2048 2048")
    assert dmsetup("message", P + "m", "0", "@stats_list").strip() == listing.strip()
