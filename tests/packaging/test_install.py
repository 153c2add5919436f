"""The data files land where Debian expects them, and say what the code says."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from xml.etree import ElementTree

import pytest

from dmd.dbus import names

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def staged() -> Path:
    root = Path(tempfile.mkdtemp(prefix="dmd-install-"))
    subprocess.run([PROJECT / "scripts" / "install", "--root", str(root), "--data-only"],
                   check=True, capture_output=True)
    return root


def test_files_land_where_debian_looks(staged: Path) -> None:
    for path in [
        "usr/share/dbus-1/system.d/org.example.DeviceMapper.conf",
        "usr/share/dbus-1/system-services/org.example.DeviceMapper.service",
        "usr/share/polkit-1/actions/org.example.devicemapper.policy",
        *(f"usr/share/dbus-1/interfaces/{name}.xml" for name in (
            names.MANAGER_INTERFACE, names.DEVICE_INTERFACE, names.POOL_INTERFACE,
            names.VOLUME_INTERFACE, names.JOB_INTERFACE)),
        "etc/systemd/system/dmd.service",
        "etc/systemd/system/dmd-snapshotter.service",
        "usr/local/share/man/man8/dmd.8",
        "usr/local/share/man/man8/dmctl.8",
        "usr/local/share/man/man8/dmd-snapshotter.8",
        "usr/local/share/bash-completion/completions/dmctl",
        *(f"usr/local/share/cockpit/dmd/{name}" for name in (
            "manifest.json", "index.html", "dmd.js", "dmd.css")),
    ]:
        assert (staged / path).is_file(), path


def test_polkit_actions_are_the_ones_dmd_asks_for(staged: Path) -> None:
    tree = ElementTree.parse(staged / "usr/share/polkit-1/actions/org.example.devicemapper.policy")
    ids = {a.get("id") for a in tree.getroot().iter("action")}
    from dmd.service.auth import Action

    assert ids == {names.ACTION_PREFIX + action.value for action in Action}
    assert ids >= {names.ACTION_CREATE, names.ACTION_MODIFY, names.ACTION_REMOVE,
                   names.ACTION_MANAGE, names.ACTION_POOL, names.ACTION_VOLUME}
    for action in tree.getroot().iter("action"):
        assert action.findtext("defaults/allow_any") == "no"


def test_unit_and_activation_name_the_bus_name(staged: Path) -> None:
    unit = (staged / "etc/systemd/system/dmd.service").read_text()
    assert f"BusName={names.BUS_NAME}" in unit and "Type=dbus" in unit
    activation = (staged / "usr/share/dbus-1/system-services/"
                  "org.example.DeviceMapper.service").read_text()
    assert f"Name={names.BUS_NAME}" in activation
    assert "SystemdService=dbus-org.example.DeviceMapper.service" in activation
    assert "Alias=dbus-org.example.DeviceMapper.service" in unit


def test_unit_is_hardened_as_its_comments_say(staged: Path) -> None:
    lines = set((staged / "etc/systemd/system/dmd.service").read_text().splitlines())
    assert {"LimitCORE=0", "ProtectKernelTunables=yes", "DevicePolicy=closed",
            "DeviceAllow=/dev/mapper/control rw", "NoNewPrivileges=yes"} <= lines
    assert any(line.startswith("TasksMax=") for line in lines)
    assert any(line.startswith("MemoryMax=") for line in lines)
    # /run/udev is only read: no write access to all of /run.
    writable = {path.lstrip("-") for line in lines if line.startswith("ReadWritePaths=")
                for path in line.removeprefix("ReadWritePaths=").split()}
    assert writable == {"/run/cryptsetup"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize(("name", "program"), [("dmd.service", "/usr/local/bin/dmd"),
                                               ("dmd-snapshotter.service",
                                                "/usr/local/bin/dmd-snapshotter")])
def test_unit_verifies(tmp_path: Path, staged: Path, name: str, program: str) -> None:
    # dmd is not installed on the test machine: point ExecStart at a program
    # that exists, everything else as shipped.
    unit = (staged / "etc/systemd/system" / name).read_text().replace(program, "/bin/true")
    copy = tmp_path / name
    copy.write_text(unit)
    out = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                         text=True)
    problems = [line for line in out.stderr.splitlines() if name in line]
    assert out.returncode == 0 and not problems, out.stderr


BUS = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="org.freedesktop.DBus"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to call as another user")
def test_only_root_may_own_the_name(staged: Path) -> None:
    socket_dir = Path(tempfile.mkdtemp(prefix="dmd-policy-"))
    socket_dir.chmod(0o755)
    config = socket_dir / "bus.conf"
    config.write_text(BUS.format(
        socket=socket_dir / "bus.sock",
        policy=staged / "usr/share/dbus-1/system.d/org.example.DeviceMapper.conf"))
    bus = subprocess.Popen(["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={config}",
                            "--print-address"], stdout=subprocess.PIPE, text=True)
    try:
        assert bus.stdout is not None
        address = bus.stdout.readline().strip()

        def request(*user: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*user, "busctl", f"--address={address}", "call", "org.freedesktop.DBus",
                 "/org/freedesktop/DBus", "org.freedesktop.DBus", "RequestName", "su",
                 names.BUS_NAME, "4"], capture_output=True, text=True, timeout=30)

        as_nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        # nobody may talk to the bus (so the refusal below is about owning)...
        listed = subprocess.run(
            [*as_nobody, "busctl", f"--address={address}", "call", "org.freedesktop.DBus",
             "/org/freedesktop/DBus", "org.freedesktop.DBus", "ListNames"],
            capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0, listed.stderr
        nobody = request(*as_nobody)
        assert nobody.returncode != 0 and "Access denied" in nobody.stderr, nobody.stderr
        root = request()
        assert root.returncode == 0 and root.stdout.strip() == "u 1", root.stderr
    finally:
        bus.terminate()
        bus.wait(timeout=10)
        shutil.rmtree(socket_dir, ignore_errors=True)
