"""dmd's Cockpit page on the real kernel: dmd on the guest's system bus,
Debian's cockpit-ws and cockpit-bridge, and headless chromium, all in the lab
VM. A pool made in the page on a loop device the page lists, a volume with
ext4 (the kernel's thin device and the filesystem checked with dmsetup and
blkid), a snapshot, a delete and a destroy, each read back from the kernel.
The host's tests (tests/cockpit) cover the rest of the page against the
simulator; this one proves the page drives the real thing."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from lab_daemon import SystemDmd
from selenium.webdriver.common.by import By

from tests.cockpit.page import (
    browsers,
    cells,
    create_volume,
    disk_box,
    fill,
    job_text,
    press,
    screenshot,
    serve_cockpit,
    text,
    texts,
    until,
)

pytestmark = [pytest.mark.kernel, pytest.mark.kernel_volumes_late]

POOL = "dmdtpweb"  # dmdtp*: the lab fixtures remove its devices after the test
SLOW = 240  # seconds: chromium, the bridge and dmd share two emulated cores


def dmsetup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dmsetup", *args], capture_output=True, text=True, timeout=60)


def mode(driver: object) -> list[str]:
    return texts(driver, f"article[data-pool='{POOL}'] .mode")


@pytest.mark.timeout(900)
def test_the_page_drives_the_kernel(system_dmd: SystemDmd,
                                    loop_device: Callable[[int], str],
                                    tmp_path: Path) -> None:
    disk = loop_device(256)
    with serve_cockpit(tmp_path, dict(os.environ)) as url, \
            browsers(emulated=True) as open_at:
        driver = open_at(url)
        until(driver, lambda d: "Connected to dmd." in text(d), "its connection", SLOW)

        # The pool, on the loop device the page lists (read by dmd from sysfs).
        until(driver, lambda d: disk_box(d, disk).get_attribute("disabled") is None,
              f"{disk} free to pick", SLOW)
        form = driver.find_element(By.ID, "new-pool")
        fill(form, name=POOL)
        disk_box(driver, disk).click()
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        until(driver, lambda d: mode(d) == ["active, ok"], "the pool made", SLOW)
        assert " thin-pool " in dmsetup("table", f"{POOL}-tpool").stdout

        # A volume with ext4: the kernel's thin device, the filesystem on it.
        create_volume(driver, POOL, name="home", size="64M", filesystem="ext4")
        until(driver, lambda d: job_text(d, "volume-create home").startswith(
            "volume-create home\ncompleted"), "the volume's job, to its end", SLOW)
        row = cells(driver, "home")
        assert row[:2] == ["home", "64 MiB"] and row[3:6] == ["—", "active", "thin"], row
        table = dmsetup("table", f"{POOL}-home").stdout
        assert table.startswith("0 131072 thin "), table
        blkid = subprocess.run(["blkid", "-o", "value", "-s", "TYPE", f"/dev/mapper/{POOL}-home"],
                               capture_output=True, text=True, timeout=60)
        assert blkid.stdout.strip() == "ext4", blkid

        # A snapshot, named in the prompt: a thin device of its own.
        press(driver, "Snapshot home")
        prompt = driver.switch_to.alert
        prompt.send_keys("home.1")
        prompt.accept()
        until(driver, lambda d: cells(d, "home.1")[3:5] == ["home", "active"], "the snapshot",
              SLOW)
        assert dmsetup("table", f"{POOL}-home.1").stdout.startswith("0 131072 thin ")
        screenshot(driver, "kernel-pool")

        # A delete: its device gone from the kernel.
        press(driver, "Delete home.1")
        driver.switch_to.alert.accept()
        until(driver, lambda d: not cells(d, "home.1"), "the snapshot gone", SLOW)
        assert dmsetup("info", f"{POOL}-home.1").returncode != 0

        # Destroy, confirmed (force: it has a volume): nothing of it left.
        press(driver, f"Destroy {POOL}")
        driver.switch_to.alert.accept()
        until(driver, lambda d: not d.find_elements(
            By.CSS_SELECTOR, f"article[data-pool='{POOL}']"), "the pool destroyed", SLOW)
        left = dmsetup("ls").stdout
        assert POOL not in left, left
        until(driver, lambda d: disk_box(d, disk).get_attribute("disabled") is None,
              f"{disk} free again", SLOW)
